"""One training run: ``python -m kfac2l.train experiment=... optimizer=... [profile=quick]``.

Everything is validated and built (data, model, optimiser) before the first step; a bad name,
an option that does not apply or a missing data file stops the run with a message that names it.
A run writes, atomically, into its own directory:

  metrics.csv      one row per epoch: epoch, iterations, train_loss, test_loss, test_accuracy, wall_time
  summary.json     status (completed | diverged | failed | interrupted), best loss and epoch,
                   epochs run, resolved hyper-parameters, git commit, profile, data source;
                   complete = true for completed and diverged runs (the others rerun)
  config.yaml      the resolved configuration
  diagnostics.csv  (diagnostics=true) per iteration: gap (4.6), and with exact_reference=true the
                   true F_bullet-distances of the KFAC and two-level steps to the exact NG step

A diverged run (non-finite loss, loss 1e3 x above its start, or a numerical failure) is recorded
as diverged and never raises, so a sweep goes on. A directory whose summary.json is complete is
skipped, so relaunching a sweep only runs what is missing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kfac2l.data import DataSplits, TensorBatches, load_dataset
from kfac2l.data.core import as_float
from kfac2l.io import atomic_write_csv, atomic_write_json, atomic_write_text, git_commit
from kfac2l.models import MODELS, build_model
from kfac2l.optim import REGISTRY, make_optimizer
from kfac2l.optim.step import get_task, training_step
from kfac2l.select import read_selection

DIVERGENCE_FACTOR = 1e3


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
        raise ConfigError(f"unknown {label} {value!r}; valid choices: {', '.join(map(str, valid))}")


def best_settings_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.tables) / cfg.profile.name / cfg.experiment.name / "best_settings.yaml"


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
            raise ConfigError(f"{path} has no selected setting for optimizer {name!r} (has {sorted(best)})")
        lr, damping = best[name]["lr"], best[name].get("damping")
    opts = dict(OmegaConf.to_container(cfg.optimizer.options, resolve=True) or {})
    curvature = REGISTRY[name].preconditioner is not None
    if damping is not None:
        if not curvature:
            raise ConfigError(f"optimizer.damping={damping} does not apply to optimizer {name!r} "
                              f"(it has no curvature); use search=grid_lr / search=small_lr for {name}")
        opts["damping"] = float(damping)
    elif curvature:
        raise ConfigError(f"optimizer {name!r} needs optimizer.damping")
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
        raise ConfigError(f"diagnostics do not apply to optimizer {name!r}")
    opts.setdefault("weight_decay", 1e-3)
    return float(lr), opts


def prepare(cfg: DictConfig):
    """Validate and build data, model and optimiser; raises ConfigError/DataMissingError early."""
    _choice("model", cfg.model.name, list(MODELS))
    task = get_task(cfg.experiment.task)
    lr, opts = optimizer_options(cfg)
    ds = cfg.dataset
    data = load_dataset(ds.name, root=ds.root, download=ds.download, md5=ds.md5, split_seed=ds.split_seed,
                        mnist_autoencoder_split=ds.mnist_autoencoder_split,
                        num_samples=ds.get("num_samples", 20000))
    data = data.subset(cfg.profile.train_subset, cfg.profile.test_subset, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, init=cfg.model.init, seed=cfg.seed,
                        **OmegaConf.to_container(cfg.model.options, resolve=True))
    _check_fit(cfg.model.name, model, data, task)
    if cfg.experiment.batch_size > data.x_train.shape[0]:
        raise ConfigError(f"experiment.batch_size={cfg.experiment.batch_size} exceeds the "
                          f"{data.x_train.shape[0]} training samples of {data.name}")
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
        if out.shape[-1] != data.num_classes:
            raise ConfigError(f"model {model_name!r} has {out.shape[-1]} outputs but dataset {data.name!r} "
                              f"has {data.num_classes} classes (set model.options.num_classes)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model, task, x, y, device, batch: int = 1024) -> tuple[float, float | None]:
    """Mean test loss and accuracy (classification) in eval mode."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    for k in range(0, x.shape[0], batch):
        xb = as_float(x[k : k + batch].to(device))
        out = model(xb)
        target = xb if task.autoencoder else y[k : k + batch].to(device)
        total += task.loss(out, target).item() * xb.shape[0]
        if not task.autoencoder:
            correct += (out.argmax(1) == target).sum().item()
        n += xb.shape[0]
    model.train()
    return total / max(n, 1), (None if task.autoencoder else correct / max(n, 1))


def completed_summary(out_dir: Path) -> dict | None:
    """The summary of a finished run in ``out_dir`` (complete = true), else None."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return summary if summary.get("complete") else None


def train(cfg: DictConfig, out_dir: Path) -> dict:
    """Run one training and write its files into ``out_dir``; returns the summary."""
    out_dir = Path(out_dir)
    done = completed_summary(out_dir)
    if done is not None:
        lr, opts = optimizer_options(cfg)
        # a 'best' run is reused only if the selection has not changed since it ran
        if (done.get("lr"), done.get("damping")) == (lr, opts.get("damping")):
            print(f"[kfac2l] {out_dir} is complete; skipped", file=sys.stderr)
            return done
        print(f"[kfac2l] {out_dir} ran another setting; rerunning", file=sys.stderr)
    task, data, model, lr, opts = prepare(cfg)
    device = _device(cfg.device)
    model.to(device)
    optimizer = make_optimizer(cfg.optimizer.name, model, lr=lr, **opts)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = TensorBatches(data.x_train, data.y_train, cfg.experiment.batch_size, gen, device)
    max_epochs = cfg.profile.max_epochs or cfg.experiment.epochs
    show = sys.stderr.isatty() if cfg.progress == "auto" else bool(cfg.progress)
    summary = {
        "experiment": cfg.experiment.name, "optimizer": cfg.optimizer.name, "lr": lr,
        "damping": opts.get("damping"), "options": {k: v for k, v in opts.items() if k != "damping"},
        "seed": cfg.seed, "batch_size": cfg.experiment.batch_size, "profile": cfg.profile.name,
        "data_source": data.source, "dataset": data.name, "train_samples": int(data.x_train.shape[0]),
        "device": str(device), "git_commit": git_commit(), "max_epochs": max_epochs,
    }
    wandb_run = _wandb_init(cfg, summary, out_dir)
    rows, diag_rows = [], []
    status, error, finished = "completed", None, False
    best, best_epoch, start_loss, since_best, iterations = math.inf, 0, None, 0, 0
    t0 = time.perf_counter()
    try:
        for epoch in tqdm(range(1, max_epochs + 1), desc=f"{cfg.optimizer.name}", disable=not show):
            losses = []
            for x, y in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not show):
                losses.append(training_step(model, optimizer, task, x, y, cfg.profile.fisher_fraction))
                iterations += 1
                if opts.get("diagnostics"):
                    diag_rows.append({"iteration": iterations, **optimizer.preconditioner.diagnostic_tensors})
            train_loss = torch.stack(losses).mean().item()  # one synchronisation per epoch
            if start_loss is None:
                start_loss = losses[0].item()
            test_loss, test_acc = evaluate(model, task, data.x_test, data.y_test, device)
            rows.append({"epoch": epoch, "iterations": iterations, "train_loss": train_loss,
                         "test_loss": test_loss, "test_accuracy": test_acc,
                         "wall_time": time.perf_counter() - t0})
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in rows[-1].items() if v is not None}, step=epoch)
            if not math.isfinite(train_loss) or train_loss > DIVERGENCE_FACTOR * max(start_loss, 1e-12):
                status = "diverged"
                break
            if train_loss < best:
                best, best_epoch, since_best = train_loss, epoch, 0
            else:
                since_best += 1
                if since_best >= cfg.profile.patience:
                    break
        finished = True
    except Exception as err:
        # a numerical failure mid-run is a divergence; anything else is a bug: recorded, re-raised
        status, error = ("diverged" if _numerical(err) else "failed"), f"{type(err).__name__}: {err}"
        if status == "failed":
            raise
    finally:
        if not finished and status == "completed":  # interrupted (e.g. Ctrl-C, job time limit)
            status = "interrupted"
        _write_results(out_dir, rows, diag_rows)
        summary.update({
            "status": status, "error": error, "best_train_loss": best if math.isfinite(best) else None,
            "best_epoch": best_epoch, "epochs_run": len(rows), "iterations": iterations,
            "final_train_loss": rows[-1]["train_loss"] if rows else None,
            "wall_time": time.perf_counter() - t0, "complete": status in ("completed", "diverged"),
        })
        atomic_write_json(out_dir / "summary.json", summary)
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            wandb_run.finish(exit_code=0 if status == "completed" else 1)
    return summary


def _numerical(err: Exception) -> bool:
    """Whether an exception is a numerical breakdown (NaN/inf, singular or unconverged linear algebra)."""
    if isinstance(err, (torch.linalg.LinAlgError, FloatingPointError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(w in text for w in ("nan", "inf", "singular", "converge"))


def _write_results(out_dir: Path, rows: list[dict], diag_rows: list[dict]) -> None:
    cols = ["epoch", "iterations", "train_loss", "test_loss", "test_accuracy", "wall_time"]
    atomic_write_csv(out_dir / "metrics.csv", pd.DataFrame(rows, columns=cols))
    if diag_rows:
        frame = pd.DataFrame([{k: (float(v) if torch.is_tensor(v) else v) for k, v in r.items()} for r in diag_rows])
        if "dist_kfac" in frame and "dist_two_level" in frame:
            frame["distance_ratio"] = frame["dist_two_level"] / frame["dist_kfac"]
        atomic_write_csv(out_dir / "diagnostics.csv", frame)


def _wandb_init(cfg: DictConfig, summary: dict, out_dir: Path):
    if not cfg.logger.wandb:
        return None
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    name = f"{cfg.optimizer.name} lr={summary['lr']:g}" + (
        f" damping={summary['damping']:g}" if summary["damping"] is not None else "")
    return wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.experiment.name,
                      name=name, dir=str(out_dir), config=OmegaConf.to_container(cfg, resolve=True),
                      reinit="finish_previous" if hasattr(wandb, "Settings") else True)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = train(cfg, out_dir)
    print(f"[kfac2l] {summary['optimizer']} on {summary['experiment']}: {summary['status']}, best train loss "
          f"{summary['best_train_loss']} at epoch {summary['best_epoch']} -> {out_dir}")
    return summary["best_train_loss"]


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(f"kfac2l: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
