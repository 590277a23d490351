"""The epoch loop of one training run (``Run``): data, model and optimiser prepared from a validated
config, early stopping, divergence, checkpoints, stop signals (SIGTERM/SIGUSR2) and wandb."""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kfac2l.config import (
    ConfigError,
    as_dict,
    distributed_options,
    early_stopping,
    fisher_batch,
    last_batch,
    max_epochs,
    resolve_device,
    scheduler_spec,
    validate,
)
from kfac2l.data import DataSplits, TensorBatches, load_dataset
from kfac2l.data.core import as_float
from kfac2l.io import atomic_write_text, git_commit, machine
from kfac2l.models import MODELS, build_model
from kfac2l.optim import make_optimizer
from kfac2l.optim.preconditioner import UnpreconditionedWarning
from kfac2l.optim.scheduler import make_scheduler
from kfac2l.optim.step import get_task, mixed_precision, training_step
from kfac2l.runs.checkpoint import remove_checkpoint, save_checkpoint
from kfac2l.runs.recorder import Progress, RunRecorder


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
    model = build_model(cfg.model.name, init=cfg.model.init, seed=cfg.seed, **as_dict(cfg.model.options))
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


def reference_seed(seed: int, iteration: int) -> int:
    """Seed of the generator of the exact reference's own Fisher batch (``reference_fisher_batch``)
    at ``iteration``: a function of (seed, iteration) only, apart from the Fisher batch's."""
    return (fisher_seed(seed, iteration) + 0x9E3779B97F4A7C15) % (2**63 - 1)


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


class Run:
    """One training run: data, model, optimiser and generators built from a validated config; the
    epoch loop with early stopping, divergence, checkpoints and signals; its files written by a
    ``RunRecorder``."""

    def __init__(self, cfg: DictConfig, out_dir: Path, identity: dict, ident: str, validated: tuple[float, dict],
                 parallel=None):
        self.cfg, self.out_dir, self.ident = cfg, out_dir, ident
        self.parallel, self.leader = parallel, parallel is None or parallel.rank == 0
        self.task, self.data, self.model, lr, self.opts = prepare(cfg, validated)
        self.device = resolve_device(cfg.device) if parallel is None else parallel.device
        self.model.to(self.device)
        reduce = None
        if parallel is not None:  # DDP for the gradients, the all-reduce hook for the curvature
            self.model = parallel.wrap(self.model, distributed_options(cfg)["sync_batchnorm"])
            reduce = parallel.reduce
        with warnings.catch_warnings():  # recorded in the summary instead
            warnings.simplefilter("ignore", UnpreconditionedWarning)
            self.optimizer = make_optimizer(cfg.optimizer.name, self.model, lr=lr, reduce=reduce, **self.opts)
        self.autocast, self.optimizer.grad_scaler = mixed_precision(cfg.get("precision", "float32"), self.device)
        self.scheduler = make_scheduler(scheduler_spec(cfg), self.optimizer.base)
        self.resample = fisher_batch(cfg) == "resampled"
        self.early_stopping = early_stopping(cfg)
        pre = self.optimizer.preconditioner
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.fisher_gen = torch.Generator(device=self.device)
        # the reference batch's own draws: the Fisher batch and the trajectory do not depend on them
        self.reference_gen = torch.Generator(device=self.device) if self.opts.get("reference_fisher_batch") else None
        self.progress = Progress()
        data, opts = self.data, self.opts
        self.recorder = (RunRecorder if self.leader else _Follower)(out_dir, {
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
        if parallel is not None:
            self.summary["distributed"] = {"world_size": parallel.world, "backend": parallel.backend}

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
        """Save the checkpoint (process 0 of a data-parallel run only)."""
        if not self.leader:
            return
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
            if self.reference_gen is not None:
                self.reference_gen.manual_seed(reference_seed(cfg.seed, p.iterations))
            if self.parallel is None:
                losses.append(training_step(self.model, self.optimizer, self.task, x, y, cfg.profile.fisher_fraction,
                                            self.fisher_gen, autocast=self.autocast, resample=self.resample,
                                            reference_generator=self.reference_gen))
            else:  # this process's shards; the returned loss is the whole mini-batch's
                losses.append(self.parallel.training_step(self.optimizer, self.task, x, y, cfg.profile.fisher_fraction,
                                                          self.fisher_gen, autocast=self.autocast,
                                                          resample=self.resample))
            p.iterations += 1
            self._record_step(p)
            if self._stopping(stop):
                p.batch, p.epoch_losses, p.elapsed = k + 1, losses, time.perf_counter() - t_start
                raise Interrupted
        if p.start_loss is None:
            p.start_loss = losses[0].item()
        loss = torch.stack(losses).mean().item()  # one synchronisation per epoch
        p.read_kl_rows()
        return loss

    def _stopping(self, stop: StopRequest) -> bool:
        """Whether a stop signal has arrived (on any process of a data-parallel run: all of them
        then stop after the same iteration)."""
        if self.parallel is None:
            return stop.signum is not None
        return self.parallel.any(stop.signum is not None)

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
        exhausted, unless ``convention.early_stopping`` is false) or None."""
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
            if self.early_stopping and p.since_best >= self.cfg.profile.patience:
                return "stop"
        return None

    def execute(self) -> dict:
        """Train until the budget, early stopping or divergence; checkpoint every
        ``checkpoint.every`` epochs and on SIGTERM/SIGUSR2; returns the summary."""
        cfg, p = self.cfg, self.progress
        wandb_run = None
        if self.leader:
            atomic_write_text(self.out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            wandb_run = _wandb_init(cfg, self.summary, self.out_dir, self.ident)
        batches = TensorBatches(self.data.x_train, self.data.y_train, cfg.experiment.batch_size, self.data_gen,
                                self.device, drop_last=last_batch(cfg) == "drop")
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
                    if self._stopping(stop):
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
                if status in ("completed", "diverged") and not cfg.checkpoint.keep and self.leader:
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


class _Follower(RunRecorder):
    """The recorder of a process other than 0 of a data-parallel run: keeps the summary, writes nothing."""

    def write(self, progress: Progress, status: str, error: str | None = None, reason: str | None = None) -> dict:
        return self.summarise(progress, status, error, reason)


def start_parallel(cfg: DictConfig):
    """This process's ``kfac2l.distributed.DataParallel`` when ``distributed.enabled`` (the process
    group joined, the device chosen), else None."""
    opts = distributed_options(cfg)
    if opts is None:
        return None
    from kfac2l.distributed import init_from_env

    return init_from_env(opts["backend"], str(cfg.device), opts["timeout_s"])


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
