"""Configuration of one training run: validation (every value checked before any data are loaded),
the optimiser options a config resolves to (registry, convention preset, selection table), the run's
identity and budget. A bad value raises ``ConfigError`` with one line naming it and the valid choices.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kfac2l.distributed import BACKENDS, placement_from_env
from kfac2l.models import INITS, MODELS
from kfac2l.optim import REGISTRY, TWO_LEVEL, make_optimizer
from kfac2l.optim.scheduler import scheduler_problem
from kfac2l.optim.step import TASKS, mixed_precision
from kfac2l.select import read_selection

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
    """The selection table ``use_best=true`` reads for this profile and experiment."""
    return Path(cfg.paths.tables) / cfg.profile.name / cfg.experiment.name / "best_settings.yaml"


def as_dict(node) -> dict:
    """A config node as a plain (resolved) dict; {} for None."""
    return dict(OmegaConf.to_container(node, resolve=True) or {}) if node is not None else {}


def convention_options(cfg: DictConfig, name: str) -> dict:
    """The optimiser options the convention preset sets for ``name`` (run options override them);
    options a registry name fixes (e.g. PREVIOUS's additive correction) are left to the name."""
    groups = as_dict(cfg.convention.get("options"))
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
    opts.update(as_dict(cfg.optimizer.options))
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
        reference = reference_batch(cfg)
        if reference is not None:  # only when set: older identities stay valid
            opts["reference_fisher_batch"] = reference
    elif cfg.diagnostics or cfg.exact_reference:
        raise ConfigError(f"diagnostics do not apply to optimizer {name!r}; valid: diagnostics=false")
    opts.setdefault("weight_decay", 1e-3)
    return float(lr), opts


def reference_batch(cfg: DictConfig) -> int | None:
    """``reference_fisher_batch``: the samples of the exact reference's own Fisher batch, drawn
    apart from the optimiser's (which it leaves unchanged), or None (the reference uses the
    optimiser's Fisher batch). ConfigError unless an integer >= 1 with exact_reference=true."""
    size = cfg.get("reference_fisher_batch")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"reference_fisher_batch={size!r}; valid: an integer >= 1 (samples of the exact reference's "
                          "own Fisher batch) or null (the optimiser's Fisher batch)")
    if not cfg.exact_reference:
        raise ConfigError(f"reference_fisher_batch={size} sizes the exact reference's own Fisher batch but "
                          "exact_reference=false; valid: exact_reference=true, or reference_fisher_batch=null")
    return size


def max_epochs(cfg: DictConfig) -> int:
    """The epoch budget: the profile's, or the experiment's when the profile leaves it null."""
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
    budget = {"max_epochs": max_epochs(cfg), "patience": int(cfg.profile.patience)}
    if not early_stopping(cfg):
        budget["early_stopping"] = False
    data = {"train_subset": cfg.profile.train_subset, "test_subset": cfg.profile.test_subset}
    if last_batch(cfg) != "drop":
        data["last_batch"] = last_batch(cfg)
    return {
        "experiment": experiment,
        "model": {"name": cfg.model.name, "init": cfg.model.init, "options": as_dict(cfg.model.options)},
        "dataset": dataset,
        "data": data,
        "budget": budget,
        "profile": profile,
        "optimizer": {"name": cfg.optimizer.name, "lr": lr, "options": opts},
        "convention": cfg.convention.name,
        "seed": int(cfg.seed),
        "divergence": as_dict(cfg.divergence),
        **distributed_identity(cfg),
    } | ({} if cfg.get("precision", "float32") == "float32" else {"precision": cfg.precision})


def scheduler_spec(cfg: DictConfig) -> dict | None:
    """``experiment.scheduler`` as a dict (``kfac2l.optim.scheduler``), None when absent or null."""
    spec = cfg.experiment.get("scheduler")
    return None if spec is None else as_dict(spec)


FISHER_BATCHES = ("resampled", "minibatch")


def fisher_batch(cfg: DictConfig) -> str:
    """``convention.fisher_batch``: 'resampled' (default: fisher_fraction * B samples drawn from the
    mini-batch) or 'minibatch' (the mini-batch itself, Tselepidis et al.'s code)."""
    return str(cfg.convention.get("fisher_batch", "resampled"))


LAST_BATCHES = ("drop", "keep")


def last_batch(cfg: DictConfig) -> str:
    """``convention.last_batch``: 'drop' (default: an epoch's last incomplete mini-batch is left
    out, every step sees B samples) or 'keep' (it is a step of its own, a PyTorch DataLoader's
    default, as in Tselepidis et al.'s train_toy.py:165: 391 steps of which the last has 40 samples)."""
    return str(cfg.convention.get("last_batch", "drop"))


def early_stopping(cfg: DictConfig) -> bool:
    """``convention.early_stopping``: stop after ``profile.patience`` epochs without a lower
    training loss (default true, the paper's protocol), or false: run every epoch of the budget
    (Tselepidis et al.'s train_toy.py:205-211 has no stopping rule). ConfigError unless a boolean."""
    value = cfg.convention.get("early_stopping", True)
    if not isinstance(value, bool):
        raise ConfigError(f"convention.early_stopping={value!r}; valid: true, false")
    return value


def distributed_options(cfg: DictConfig) -> dict | None:
    """The validated ``distributed`` settings of a data-parallel run (docs/distributed.md); None
    when it is off (or the key is absent)."""
    opts = as_dict(cfg.get("distributed"))
    enabled = opts.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"distributed.enabled={enabled!r}; valid: true, false")
    if not enabled:
        return None
    opts.setdefault("backend", "auto")
    opts.setdefault("sync_batchnorm", False)
    opts.setdefault("timeout_s", 1800)
    _choice("distributed.backend", opts["backend"], BACKENDS)
    if not isinstance(opts["sync_batchnorm"], bool):
        raise ConfigError(f"distributed.sync_batchnorm={opts['sync_batchnorm']!r}; valid: true, false")
    timeout = opts["timeout_s"]
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise ConfigError(f"distributed.timeout_s={timeout!r}; valid: an integer >= 1")
    if cfg.optimizer.name == "ngd" or cfg.exact_reference:
        what = "optimizer=ngd" if cfg.optimizer.name == "ngd" else "exact_reference=true"
        raise ConfigError(f"{what} needs the whole Fisher batch on one process (Woodbury on its Gram matrix); "
                          "valid: distributed.enabled=false, or a KFAC-family optimiser without exact_reference")
    if placement_from_env() is None:
        raise ConfigError("distributed.enabled=true but this process was started neither by torchrun (RANK, "
                          "WORLD_SIZE) nor as a SLURM task (SLURM_PROCID, SLURM_NTASKS); valid: torchrun ... or "
                          "launcher=slurm_ddp (docs/distributed.md), or distributed.enabled=false")
    return opts


def distributed_identity(cfg: DictConfig) -> dict:
    """What data parallelism adds to the run identity (nothing when it is off): the number of
    processes and SyncBatchNorm change BatchNorm's statistics, and the rounding of every sum."""
    opts = distributed_options(cfg)
    if opts is None:
        return {}
    return {"distributed": {"world_size": placement_from_env().world, "sync_batchnorm": opts["sync_batchnorm"]}}


def validate(cfg: DictConfig) -> tuple[float, dict]:
    """Check every value before any data are loaded or directory is written; ConfigError names the
    bad value and the valid choices or range. Returns (lr, optimiser options)."""
    known = {"model", "dataset", "optimizer", "profile", "search", "launcher", "logger", "paths", "experiment",
             "convention", "seed", "device", "diagnostics", "exact_reference", "reference_fisher_batch", "use_best",
             "progress", "checkpoint", "divergence", "distributed", "precision"}
    extra = sorted(set(cfg.keys()) - known)
    if extra:
        raise ConfigError(f"unknown top-level key(s) {extra}; valid: {', '.join(sorted(known))}")
    _choice("model", cfg.model.name, list(MODELS))
    _choice("model.init", cfg.model.init, INITS)
    _choice("task", cfg.experiment.task, list(TASKS))
    _choice("convention.fisher_batch", fisher_batch(cfg), FISHER_BATCHES)
    _choice("convention.last_batch", last_batch(cfg), LAST_BATCHES)
    early_stopping(cfg)
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
        raise ConfigError(f"divergence={as_dict(div)}; valid: factor > 1 and epochs an integer >= 1")
    _choice("progress", str(cfg.progress), ["auto", "True", "False", "true", "false"])
    try:
        mixed_precision(cfg.get("precision", "float32"), resolve_device(cfg.device))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    distributed_options(cfg)
    reference_batch(cfg)
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


def resolve_device(name: str) -> torch.device:
    """The torch device ``device=`` names (auto: CUDA when available); ConfigError otherwise."""
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
