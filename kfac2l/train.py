"""One training run: ``python -m kfac2l.train experiment=... optimizer=... [profile=quick]``.

Everything is validated before any data are loaded; a bad value stops the run with one line
``kfac2l: <what is wrong>; valid: <choices or range>`` and exit code 2. A run writes, atomically,
into its own directory (``kfac2l.runs``):

  summary.json     status (completed | diverged | failed | interrupted | running), the run's
                   identity and its id, best loss and epoch, epochs run, hyper-parameters,
                   convention, init, git commit, profile, data source, resumed_from_epoch
  metrics.csv      one row per epoch (rewritten every epoch)
  config.yaml      the resolved configuration
  checkpoint.pt    the last checkpoint (every ``checkpoint.every`` epochs and on SIGTERM/SIGUSR2)
  diagnostics.csv  (diagnostics=true) per iteration: gap (4.6), and with exact_reference=true the
                   true F_bullet-distances of the KFAC and two-level steps to the exact NG step
  kl_clip.csv.gz   (optimisers with a KL clip) per iteration: the clip factor nu and the product
                   it reads

Relaunching the same command: a complete run with the same identity is skipped; an interrupted
one resumes from its checkpoint and ends with the same per-epoch losses as an uninterrupted run;
a run with another identity in the same directory is reported (what differs) and moved to
``.superseded/`` before the new one starts. A diverged run is recorded as diverged and never
raises, so a sweep goes on.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kfac2l.data import DataSplits, TensorBatches, load_dataset
from kfac2l.data.core import as_float
from kfac2l.io import atomic_write_text, git_commit, machine
from kfac2l.models import INITS, MODELS, build_model
from kfac2l.optim import REGISTRY, TWO_LEVEL, make_optimizer
from kfac2l.optim.preconditioner import UnpreconditionedWarning
from kfac2l.optim.scheduler import make_scheduler, scheduler_problem
from kfac2l.optim.step import TASKS, get_task, training_step
from kfac2l.runs import identity_diff, identity_id, read_summary
from kfac2l.runs.checkpoint import CheckpointError, load_checkpoint, remove_checkpoint, save_checkpoint
from kfac2l.runs.recorder import Progress, RunRecorder
from kfac2l.select import read_selection

OUR_FILES = ("summary.json", "metrics.csv", "diagnostics.csv", "kl_clip.csv.gz", "config.yaml", "checkpoint.pt")


def run_name(use_best, lr, damping, seed) -> str:
    """Run directory name: the swept values, or 'best' when they come from the selection table."""
    if str(use_best).lower() == "true":
        return f"best,seed={seed}"
    return f"lr={lr},damping={damping},seed={seed}"


if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", run_name)


class ConfigError(ValueError):
    """A configuration that cannot run."""


def _choice(label: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {label} {value!r}; valid: {', '.join(map(str, valid))}")


def best_settings_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.tables) / cfg.profile.name / cfg.experiment.name / "best_settings.yaml"


def _container(node) -> dict:
    return dict(OmegaConf.to_container(node, resolve=True) or {}) if node is not None else {}


def convention_options(cfg: DictConfig, name: str) -> dict:
    """The optimiser options the convention preset sets for ``name`` (run options override them);
    options a registry name fixes (e.g. PREVIOUS's additive correction) are left to the name."""
    groups = _container(cfg.convention.get("options"))
    spec = REGISTRY[name]
    opts = {}
    if spec.preconditioner is not None:
        opts.update(groups.get("curvature") or {})
    if name == "sgd":
        opts.update(groups.get("sgd") or {})
    if name == "kfac":
        opts.update(groups.get("kfac") or {})
    if name in TWO_LEVEL:
        opts.update(groups.get("two_level") or {})
    return {k: v for k, v in opts.items() if k not in spec.fixed}


def optimizer_options(cfg: DictConfig) -> tuple[float, dict]:
    """(lr, options for make_optimizer) from the config, validated against the registry."""
    name = cfg.optimizer.name
    _choice("optimizer", name, list(REGISTRY))
    lr, damping = cfg.optimizer.lr, cfg.optimizer.damping
    if cfg.use_best:
        path = best_settings_path(cfg)
        if not path.exists():
            raise ConfigError(f"use_best=true but {path} does not exist; run `python -m kfac2l.select` first")
        best = read_selection(path.parent)
        if name not in best:
            raise ConfigError(f"{path} has no selected setting for optimizer {name!r}; valid: {', '.join(sorted(best))}")
        lr, damping = best[name]["lr"], best[name].get("damping")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ConfigError(f"optimizer.lr={lr!r} is not a learning rate; valid: a number > 0")
    opts = convention_options(cfg, name)
    opts.update(_container(cfg.optimizer.options))
    curvature = REGISTRY[name].preconditioner is not None
    if damping is not None:
        if not curvature:
            raise ConfigError(f"optimizer.damping={damping} does not apply to optimizer {name!r} "
                              f"(it has no curvature); valid: optimizer.damping=null (search=grid_lr / small_lr)")
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping > 0:
            raise ConfigError(f"optimizer.damping={damping!r} is not a damping; valid: a number > 0")
        opts["damping"] = float(damping)
    elif curvature:
        raise ConfigError(f"optimizer {name!r} needs optimizer.damping; valid: a number > 0")
    if curvature:
        if cfg.experiment.kl_clip is not None:
            opts.setdefault("kl_clip", float(cfg.experiment.kl_clip))
        if name != "ngd":
            opts.setdefault("cov_interval", int(cfg.profile.curvature_interval))
            opts.setdefault("inv_interval", int(cfg.profile.curvature_interval))
        if cfg.diagnostics or cfg.exact_reference:
            opts["diagnostics"] = True
            opts["exact_reference"] = bool(cfg.exact_reference)
    elif cfg.diagnostics or cfg.exact_reference:
        raise ConfigError(f"diagnostics do not apply to optimizer {name!r}; valid: diagnostics=false")
    opts.setdefault("weight_decay", 1e-3)
    return float(lr), opts


def max_epochs(cfg: DictConfig) -> int:
    return int(cfg.profile.max_epochs or cfg.experiment.epochs)


def run_identity(cfg: DictConfig, lr: float, opts: dict) -> dict:
    """Every setting that can change this run's result (see ``kfac2l.runs.identity``)."""
    ds = cfg.dataset
    dataset = {"name": ds.name, "split_seed": ds.split_seed, "mnist_autoencoder_split": ds.mnist_autoencoder_split,
               "md5": ds.md5}
    if "num_samples" in ds:
        dataset["num_samples"] = ds.num_samples
    experiment = {"name": cfg.experiment.name, "task": cfg.experiment.task, "batch_size": int(cfg.experiment.batch_size)}
    profile = {"name": cfg.profile.name, "fisher_fraction": float(cfg.profile.fisher_fraction)}
    # settings added later enter the identity only when used: older identities stay valid
    if scheduler_spec(cfg) is not None:
        experiment["scheduler"] = scheduler_spec(cfg)
    if fisher_batch(cfg) != "resampled":
        profile["fisher_batch"] = fisher_batch(cfg)
    return {
        "experiment": experiment,
        "model": {"name": cfg.model.name, "init": cfg.model.init, "options": _container(cfg.model.options)},
        "dataset": dataset,
        "data": {"train_subset": cfg.profile.train_subset, "test_subset": cfg.profile.test_subset},
        "budget": {"max_epochs": max_epochs(cfg), "patience": int(cfg.profile.patience)},
        "profile": profile,
        "optimizer": {"name": cfg.optimizer.name, "lr": lr, "options": opts},
        "convention": cfg.convention.name,
        "seed": int(cfg.seed),
        "divergence": _container(cfg.divergence),
    }


def scheduler_spec(cfg: DictConfig) -> dict | None:
    """``experiment.scheduler`` as a dict (``kfac2l.optim.scheduler``), None when absent or null."""
    spec = cfg.experiment.get("scheduler")
    return None if spec is None else _container(spec)


FISHER_BATCHES = ("resampled", "minibatch")


def fisher_batch(cfg: DictConfig) -> str:
    """``convention.fisher_batch``: 'resampled' (default: fisher_fraction * B samples drawn from the
    mini-batch) or 'minibatch' (the mini-batch itself, Tselepidis et al.'s code)."""
    return str(cfg.convention.get("fisher_batch", "resampled"))


def validate(cfg: DictConfig) -> tuple[float, dict]:
    """Check every value before any data are loaded or directory is written; ConfigError names the
    bad value and the valid choices or range. Returns (lr, optimiser options)."""
    known = {"model", "dataset", "optimizer", "profile", "search", "launcher", "logger", "paths", "experiment",
             "convention", "seed", "device", "diagnostics", "exact_reference", "use_best", "progress",
             "checkpoint", "divergence"}
    extra = sorted(set(cfg.keys()) - known)
    if extra:
        raise ConfigError(f"unknown top-level key(s) {extra}; valid: {', '.join(sorted(known))}")
    _choice("model", cfg.model.name, list(MODELS))
    _choice("model.init", cfg.model.init, INITS)
    _choice("task", cfg.experiment.task, list(TASKS))
    _choice("convention.fisher_batch", fisher_batch(cfg), FISHER_BATCHES)
    problem = scheduler_problem(scheduler_spec(cfg))
    if problem:
        raise ConfigError(problem)
    for key, value in (("seed", cfg.seed), ("experiment.batch_size", cfg.experiment.batch_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer; valid: an integer")
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed} is negative; valid: an integer >= 0")
    if cfg.experiment.batch_size < 1:
        raise ConfigError(f"experiment.batch_size={cfg.experiment.batch_size}; valid: an integer >= 1")
    for key, value in (("profile.max_epochs", cfg.profile.max_epochs), ("experiment.epochs", cfg.experiment.epochs),
                       ("profile.patience", cfg.profile.patience),
                       ("profile.curvature_interval", cfg.profile.curvature_interval),
                       ("checkpoint.every", cfg.checkpoint.every)):
        minimum = 0 if key == "checkpoint.every" else 1
        if value is None and key == "profile.max_epochs":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{key}={value!r}; valid: an integer >= {minimum}"
                              + (" (or null for the experiment's epochs)" if key == "profile.max_epochs" else ""))
    for key, value in (("profile.train_subset", cfg.profile.train_subset),
                       ("profile.test_subset", cfg.profile.test_subset)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r}; valid: an integer >= 1 or null (everything)")
    frac = cfg.profile.fisher_fraction
    if not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ConfigError(f"profile.fisher_fraction={frac!r}; valid: a number in (0, 1]")
    div = cfg.divergence
    if not isinstance(div.factor, (int, float)) or not div.factor > 1 or not isinstance(div.epochs, int) or div.epochs < 1:
        raise ConfigError(f"divergence={_container(div)}; valid: factor > 1 and epochs an integer >= 1")
    _choice("progress", str(cfg.progress), ["auto", "True", "False", "true", "false"])
    _device(cfg.device)
    _check_writable_root(Path(str(cfg.dataset.root)), "dataset.root")
    lr, opts = optimizer_options(cfg)
    try:  # the optimiser's own checks (option names, values), on a throw-away model
        probe = make_optimizer(cfg.optimizer.name, torch.nn.Linear(2, 2), lr=lr, **opts)
        if probe.preconditioner is not None:
            probe.preconditioner.remove()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return lr, opts


def _check_writable_root(root: Path, key: str) -> None:
    """An existing folder is fine (read-only shared data folders hold their files); a folder that
    does not exist yet must be creatable, or nothing could ever be put there."""
    if root.exists():
        if not root.is_dir():
            raise ConfigError(f"{key}={root} is not a folder; valid: a folder (created if absent)")
        return
    parent = root
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={root} does not exist and cannot be created ({parent} is not writable); "
                          "valid: a writable folder")


def prepare(cfg: DictConfig, validated: tuple[float, dict] | None = None):
    """Validate (unless ``validated`` = ``validate(cfg)`` is passed) and build data, model and
    optimiser options; raises ConfigError/DataMissingError early."""
    lr, opts = validated if validated is not None else validate(cfg)
    task = get_task(cfg.experiment.task)
    ds = cfg.dataset
    data = load_dataset(ds.name, root=ds.root, download=ds.download, md5=ds.md5, split_seed=ds.split_seed,
                        mnist_autoencoder_split=ds.mnist_autoencoder_split,
                        num_samples=ds.get("num_samples", 20000))
    data = data.subset(cfg.profile.train_subset, cfg.profile.test_subset, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, init=cfg.model.init, seed=cfg.seed, **_container(cfg.model.options))
    _check_fit(cfg.model.name, model, data, task)
    if cfg.experiment.batch_size > data.x_train.shape[0]:
        raise ConfigError(f"experiment.batch_size={cfg.experiment.batch_size} exceeds the "
                          f"{data.x_train.shape[0]} training samples of {data.name}; "
                          f"valid: 1..{data.x_train.shape[0]}")
    return task, data, model, lr, opts


def _check_fit(model_name: str, model, data: DataSplits, task) -> None:
    spec = MODELS[model_name]
    n_in = math.prod(data.sample_shape)
    if math.prod(spec.input_shape) != n_in or (len(spec.input_shape) > 1 and spec.input_shape != data.sample_shape):
        raise ConfigError(f"model {model_name!r} expects inputs of shape {spec.input_shape} but dataset "
                          f"{data.name!r} has samples of shape {data.sample_shape}")
    if task.autoencoder != (spec.task == "autoencoder"):
        raise ConfigError(f"model {model_name!r} is a {spec.task} model; task {task.name!r} does not fit it")
    if not task.autoencoder and data.num_classes is not None:
        with torch.no_grad():
            out = model.eval()(data.x_train[:2].float())
        model.train()
        expected = task.outputs or data.num_classes
        if out.shape[-1] != expected:
            raise ConfigError(f"model {model_name!r} has {out.shape[-1]} outputs but task {task.name!r} on dataset "
                              f"{data.name!r} needs {expected} (set model.options.num_classes)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available here; valid: auto, cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r} is not supported; valid: auto, cpu, cuda, cuda:N")
    return device


@torch.no_grad()
def evaluate(model, task, x, y, device, batch: int = 1024) -> tuple[float, float | None]:
    """Mean test loss and accuracy (classification: ``task.predict``, argmax or sigmoid > 0.5) in eval mode."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    for k in range(0, x.shape[0], batch):
        xb = as_float(x[k : k + batch].to(device))
        out = model(xb)
        target = xb if task.autoencoder else y[k : k + batch].to(device)
        total += task.loss(out, target).item() * xb.shape[0]
        if not task.autoencoder:
            correct += (task.predict(out) == target).sum().item()
        n += xb.shape[0]
    model.train()
    return total / max(n, 1), (None if task.autoencoder else correct / max(n, 1))


def fisher_seed(seed: int, iteration: int) -> int:
    """Seed of the Fisher-batch generator at ``iteration``: a function of (seed, iteration) only."""
    return (int(seed) * 1_000_003 + int(iteration) * 7919 + 12345) % (2**63 - 1)


class StopRequest:
    """SIGTERM / SIGUSR2 (SLURM time limit, preemption, scancel): finish the current iteration,
    checkpoint, mark the run interrupted, then hand the signal to the previous handler (submitit
    requeues the job) or exit with 128 + signal."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        if __import__("threading").current_thread() is __import__("threading").main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def forward(self) -> None:
        handler = self.previous.get(self.signum)
        if callable(handler):
            handler(self.signum, None)
        raise SystemExit(128 + int(self.signum))


class Interrupted(Exception):
    """Raised inside the loop after a stop request has been checkpointed."""


def _archive(out_dir: Path, old: dict) -> Path:
    """Move this directory's run files to ``<parent>/.superseded/<name>.<old id>`` (nothing lost)."""
    tag = old.get("identity_id") or time.strftime("%Y%m%dT%H%M%S")
    dest = out_dir.parent / ".superseded" / f"{out_dir.name}.{tag}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in OUR_FILES:
        if (out_dir / name).exists():
            shutil.move(str(out_dir / name), str(dest / name))
    return dest


def train(cfg: DictConfig, out_dir: Path) -> dict:
    """Run, resume or skip one training in ``out_dir`` (see the module docstring); returns the summary."""
    out_dir = Path(out_dir)
    lr, opts = validate(cfg)
    identity = run_identity(cfg, lr, opts)
    ident = identity_id(identity)
    previous = read_summary(out_dir)
    if previous is not None and previous.get("identity_id") == ident and previous.get("complete"):
        print(f"[kfac2l] {out_dir} is complete (identity {ident}); skipped", file=sys.stderr)
        return previous
    resumed = _claim(out_dir, previous, identity, ident)
    run = Run(cfg, out_dir, identity, ident, (lr, opts))
    if resumed is not None:
        run.restore(resumed, previous)
    return run.execute()


def _claim(out_dir: Path, previous: dict | None, identity: dict, ident: str) -> dict | None:
    """Make ``out_dir`` this run's: archive a run of another identity, or return the checkpoint of
    an interrupted run of this identity (None when there is nothing to resume)."""
    if previous is not None and previous.get("identity_id") != ident:
        diff = identity_diff(previous.get("identity"), identity)
        dest = _archive(out_dir, previous)
        print(f"[kfac2l] {out_dir} held a run with another identity ({'; '.join(diff) or 'no identity recorded'});"
              f" moved to {dest}; running anew", file=sys.stderr)
        return None
    try:
        resumed = load_checkpoint(out_dir)
    except CheckpointError as err:
        print(f"[kfac2l] {err}; the run restarts from epoch 1", file=sys.stderr)
        return None
    if resumed is not None and resumed["identity_id"] != ident:
        print(f"[kfac2l] {out_dir}: checkpoint of another identity ignored; restarting", file=sys.stderr)
        return None
    return resumed


class Run:
    """One training run: data, model, optimiser and generators built from a validated config; the
    epoch loop with early stopping, divergence, checkpoints and signals; its files written by a
    ``RunRecorder``."""

    def __init__(self, cfg: DictConfig, out_dir: Path, identity: dict, ident: str, validated: tuple[float, dict]):
        self.cfg, self.out_dir, self.ident = cfg, out_dir, ident
        self.task, self.data, self.model, lr, self.opts = prepare(cfg, validated)
        self.device = _device(cfg.device)
        self.model.to(self.device)
        with warnings.catch_warnings():  # recorded in the summary instead
            warnings.simplefilter("ignore", UnpreconditionedWarning)
            self.optimizer = make_optimizer(cfg.optimizer.name, self.model, lr=lr, **self.opts)
        self.scheduler = make_scheduler(scheduler_spec(cfg), self.optimizer.base)
        self.resample = fisher_batch(cfg) == "resampled"
        pre = self.optimizer.preconditioner
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.fisher_gen = torch.Generator(device=self.device)
        self.progress = Progress()
        data, opts = self.data, self.opts
        self.recorder = RunRecorder(out_dir, {
            "experiment": cfg.experiment.name, "optimizer": cfg.optimizer.name, "lr": lr,
            "damping": opts.get("damping"), "options": {k: v for k, v in opts.items() if k != "damping"},
            "seed": cfg.seed, "batch_size": cfg.experiment.batch_size, "profile": cfg.profile.name,
            "convention": cfg.convention.name, "init": cfg.model.init,
            "data_source": data.source, "dataset": data.name, "train_samples": int(data.x_train.shape[0]),
            "device": str(self.device), "torch_threads": torch.get_num_threads(), "git_commit": git_commit(),
            "machine": machine(),
            "max_epochs": max_epochs(cfg), "identity": identity, "identity_id": ident,
            "resumed_from_epoch": None, "resumes": 0,
            "plain_gradient_modules": len(pre.skipped_modules) if pre is not None else 0,
            "pid": os.getpid(), "host": socket.gethostname(),
        })

    @property
    def summary(self) -> dict:
        return self.recorder.summary

    def restore(self, state: dict, previous: dict | None) -> None:
        """Continue from a checkpoint of this identity."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(_to_device(state["optimizer"], self.device))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.data_gen.set_state(state["data_generator"])
        self.progress.load(state["progress"])
        p = self.progress
        self.summary["resumes"] = int((previous or {}).get("resumes") or 0) + 1
        self.summary["resumed_from_epoch"] = p.epoch - (0 if p.batch else 1)
        print(f"[kfac2l] {self.out_dir}: resuming after epoch {self.summary['resumed_from_epoch']}"
              + (f" (+{p.batch} batches)" if p.batch else ""), file=sys.stderr)

    def checkpoint(self) -> None:
        state = {
            "identity_id": self.ident, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "data_generator": self.data_gen.get_state(), "progress": self.progress.state(),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        save_checkpoint(self.out_dir, state)

    def _epoch(self, epoch: int, batches, stop, show: bool, t_start: float) -> float:
        """Train one epoch (or its rest, after a mid-epoch checkpoint); the epoch's training loss.
        Raises ``Interrupted`` after the current iteration when a stop signal has arrived."""
        p, cfg = self.progress, self.cfg
        if p.batch == 0:
            p.epoch_data_state, p.epoch_losses = self.data_gen.get_state(), []
        else:  # the same permutation as before the interruption, its first p.batch batches skipped
            self.data_gen.set_state(p.epoch_data_state)
        losses = [torch.tensor(v) for v in p.epoch_losses]
        for k, (x, y) in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not show)):
            if k < p.batch:
                continue
            self.fisher_gen.manual_seed(fisher_seed(cfg.seed, p.iterations))
            losses.append(training_step(self.model, self.optimizer, self.task, x, y, cfg.profile.fisher_fraction,
                                        self.fisher_gen, resample=self.resample))
            p.iterations += 1
            self._record_step(p)
            if stop.signum is not None:
                p.batch, p.epoch_losses, p.elapsed = k + 1, losses, time.perf_counter() - t_start
                raise Interrupted
        if p.start_loss is None:
            p.start_loss = losses[0].item()
        loss = torch.stack(losses).mean().item()  # one synchronisation per epoch
        p.kl_rows = [[float(v) for v in r] for r in p.kl_rows]
        return loss

    def _record_step(self, p: Progress) -> None:
        """Keep this step's diagnostics and KL-clip factor as device tensors (read once per epoch)."""
        pre = self.optimizer.preconditioner
        if pre is None:
            return
        diag = pre.diagnostic_tensors
        if self.opts.get("diagnostics"):
            p.diag_rows.append({"iteration": p.iterations, **diag})
        if "kl_scale" in diag:
            p.kl_rows.append((p.iterations, diag["kl_scale"], diag["kl_product"]))

    def _after_epoch(self, epoch: int, train_loss: float, t_start: float, wandb_run) -> str | None:
        """Record the epoch; 'diverged' (with the reason in ``self.reason``), 'stop' (patience
        exhausted) or None."""
        p = self.progress
        test_loss, test_acc = evaluate(self.model, self.task, self.data.x_test, self.data.y_test, self.device)
        p.elapsed = time.perf_counter() - t_start
        p.rows.append({"epoch": epoch, "iterations": p.iterations, "train_loss": train_loss, "test_loss": test_loss,
                       "test_accuracy": test_acc, "wall_time": p.elapsed})
        p.epoch, p.batch, p.epoch_losses = epoch + 1, 0, []
        if self.scheduler is not None:
            self.scheduler.step(p.rows[-1])
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in p.rows[-1].items() if v is not None}, step=epoch)
        self.reason = _divergence(self.cfg, self.task, self.data, p, train_loss)
        if self.reason is not None:
            return "diverged"
        if train_loss < p.best:
            p.best, p.best_epoch, p.since_best = train_loss, epoch, 0
        else:
            p.since_best += 1
            if p.since_best >= self.cfg.profile.patience:
                return "stop"
        return None

    def execute(self) -> dict:
        """Train until the budget, early stopping or divergence; checkpoint every
        ``checkpoint.every`` epochs and on SIGTERM/SIGUSR2; returns the summary."""
        cfg, p = self.cfg, self.progress
        atomic_write_text(self.out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        wandb_run = _wandb_init(cfg, self.summary, self.out_dir, self.ident)
        batches = TensorBatches(self.data.x_train, self.data.y_train, cfg.experiment.batch_size, self.data_gen,
                                self.device)
        show = sys.stderr.isatty() if str(cfg.progress) == "auto" else str(cfg.progress).lower() == "true"
        status, error, self.reason = "running", None, None
        t_start = time.perf_counter() - p.elapsed
        limit = max_epochs(cfg)
        with StopRequest() as stop:
            try:
                self.recorder.write(p, status)
                for epoch in tqdm(range(p.epoch, limit + 1), desc=cfg.optimizer.name, disable=not show,
                                  initial=p.epoch - 1, total=limit):
                    train_loss = self._epoch(epoch, batches, stop, show, t_start)
                    outcome = self._after_epoch(epoch, train_loss, t_start, wandb_run)
                    if outcome == "diverged":
                        status = "diverged"
                    if outcome is not None:
                        break
                    if stop.signum is not None:
                        raise Interrupted
                    self.recorder.write(p, status)
                    if cfg.checkpoint.every and epoch % cfg.checkpoint.every == 0:
                        self.checkpoint()
                if status == "running":
                    status = "completed"
            except Interrupted:
                status = "interrupted"
                self.checkpoint()
            except KeyboardInterrupt:
                status = "interrupted"
                raise
            except Exception as err:
                # a numerical failure mid-run is a divergence; anything else is a bug: recorded, re-raised
                status, error = ("diverged" if _numerical(err) else "failed"), f"{type(err).__name__}: {err}"
                self.reason = "numerical failure" if status == "diverged" else None
                if status == "failed":
                    raise
            finally:
                if status == "running":
                    status = "interrupted"
                self.recorder.write(p, status, error, self.reason)
                if status in ("completed", "diverged") and not cfg.checkpoint.keep:
                    remove_checkpoint(self.out_dir)
                if wandb_run is not None:
                    wandb_run.summary.update({k: v for k, v in self.summary.items() if isinstance(v, (int, float, str))})
                    wandb_run.finish(exit_code=0 if status == "completed" else 1)
            if status == "interrupted" and stop.signum is not None:
                print(f"[kfac2l] {self.out_dir}: signal {stop.signum}; checkpointed after {p.iterations} iterations",
                      file=sys.stderr)
                stop.__exit__()
                stop.forward()
        return self.summary


def _divergence(cfg, task, data: DataSplits, progress: Progress, train_loss: float) -> str | None:
    """Why the run has diverged, or None: a non-finite epoch loss, or ``divergence.epochs``
    consecutive epochs above ``divergence.factor`` x max(chance level, first mini-batch loss)."""
    if not math.isfinite(train_loss):
        return f"non-finite training loss ({train_loss}) at epoch {len(progress.rows)}"
    chance = math.log(data.num_classes) if (not task.autoencoder and data.num_classes) else 0.0
    reference = max(chance, progress.start_loss or 0.0, 1e-12)
    threshold = cfg.divergence.factor * reference
    progress.above = progress.above + 1 if train_loss > threshold else 0
    if progress.above >= cfg.divergence.epochs:
        return (f"training loss above {cfg.divergence.factor:g} x {reference:.4g} = {threshold:.4g} "
                f"for {progress.above} epochs (last {train_loss:.4g})")
    return None


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _numerical(err: Exception) -> bool:
    """Whether an exception is a numerical breakdown (NaN/inf, singular or unconverged linear algebra)."""
    if isinstance(err, (torch.linalg.LinAlgError, FloatingPointError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(w in text for w in ("nan", "inf", "singular", "converge"))


def _wandb_init(cfg: DictConfig, summary: dict, out_dir: Path, ident: str):
    """A wandb run whose id is the run identity: a resumed run continues the same wandb run."""
    if not cfg.logger.wandb:
        return None
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    name = f"{cfg.optimizer.name} lr={summary['lr']:g}" + (
        f" damping={summary['damping']:g}" if summary["damping"] is not None else "") + f" seed={cfg.seed}"
    return wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.experiment.name,
                      name=name, dir=str(out_dir), id=f"kfac2l-{ident}", resume="allow",
                      config=OmegaConf.to_container(cfg, resolve=True),
                      reinit="finish_previous" if hasattr(wandb, "Settings") else True)


def _remove_if_empty(out_dir: Path, stop: Path) -> None:
    """Remove ``out_dir`` and its empty parents up to ``stop`` if they hold nothing but Hydra's files."""
    hydra_dir = out_dir / ".hydra"
    try:
        if hydra_dir.is_dir() and not [p for p in out_dir.iterdir() if p.name not in (".hydra", "train.log")]:
            shutil.rmtree(out_dir)
            parent = out_dir.parent
            while (parent == stop or stop in parent.parents) and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    except OSError:
        pass


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train(cfg, out_dir)
    except (ConfigError, CheckpointError) as err:
        _remove_if_empty(out_dir, Path(cfg.paths.runs).resolve())
        print(f"kfac2l: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        from kfac2l.data import DataCorruptError, DataMissingError

        if isinstance(err, (DataMissingError, DataCorruptError)):
            _remove_if_empty(out_dir, Path(cfg.paths.runs).resolve())
            print(f"kfac2l: {err}", file=sys.stderr)
            sys.exit(2)
        raise
    print(f"[kfac2l] {summary['optimizer']} on {summary['experiment']}: {summary['status']}, best train loss "
          f"{summary['best_train_loss']} at epoch {summary['best_epoch']} -> {out_dir}")
    return summary["best_train_loss"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("model", "dataset", "optimizer", "profile", "search", "launcher", "logger", "paths", "experiment",
          "convention")


def check_group_choices(argv: list[str]) -> str | None:
    """One line naming a config-group choice that does not exist (``optimizer=kfak``) and the valid
    ones, or None: checked before Hydra, whose own message is a multi-line traceback."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        valid = sorted(p.stem for p in (CONFIGS / key).glob("*.yaml") if not p.stem.startswith("_"))
        for choice in value.split(","):
            if choice.strip() and choice.strip() not in valid:
                return f"unknown {key} {choice.strip()!r}; valid: {', '.join(valid)}"
    return None


def cli() -> None:
    """Command-line entry: group choices checked first (one line, exit 2), then Hydra."""
    problem = check_group_choices(sys.argv[1:])
    if problem:
        print(f"kfac2l: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
