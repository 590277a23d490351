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
                   true F_bullet-distances of the KFAC and two-level steps to the exact NG step and
                   the rank of its Fisher batch (reference_fisher_batch=N: a batch of N samples of
                   its own; docs/library.md)
  kl_clip.csv.gz   (optimisers with a KL clip) per iteration: the clip factor nu and the product
                   it reads

A run holds an exclusive lock on ``<run>/.lock`` (``fcntl.flock``, released when its process
ends, even on SIGKILL) while it trains: a second process given the same directory (a relaunch while
the first is still going, e.g. joblib workers that outlived a signalled parent, or a double
submission) reports it and skips it instead of training the same run twice at once.

Relaunching the same command: a complete run with the same identity is skipped; an interrupted
one resumes from its checkpoint and ends with the same per-epoch losses as an uninterrupted run;
a run with another identity in the same directory is reported (what differs) and moved to
``.superseded/`` before the new one starts. A diverged run is recorded as diverged and never
raises, so a sweep goes on.

Validation and option resolution live in ``kfac2l.config``, the epoch loop in ``kfac2l.loop``; this
module keeps ``train`` (run, resume or skip), the Hydra main and the command line, and re-exports the
names other modules and the tests import from it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kfac2l.config import (
    CONFIGS,
    ConfigError,
    best_settings_path,
    convention_options,
    fisher_batch,
    max_epochs,
    optimizer_options,
    run_identity,
    run_name,
    validate,
)
from kfac2l.loop import Interrupted, Run, StopRequest, evaluate, fisher_seed, prepare, start_parallel
from kfac2l.runs import identity_diff, identity_id, read_summary
from kfac2l.runs.checkpoint import CheckpointError, load_checkpoint

__all__ = ["CONFIGS", "ConfigError", "Interrupted", "Run", "StopRequest", "best_settings_path", "check_group_choices",
           "cli", "convention_options", "evaluate", "fisher_batch", "fisher_seed", "main", "max_epochs", "optimizer_options",
           "prepare", "run_identity", "run_name", "train", "validate"]

OUR_FILES = ("summary.json", "metrics.csv", "diagnostics.csv", "kl_clip.csv.gz", "config.yaml", "checkpoint.pt")


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
    parallel = start_parallel(cfg)  # None unless distributed.enabled
    previous = read_summary(out_dir)
    if previous is not None and previous.get("identity_id") == ident and previous.get("complete"):
        print(f"[kfac2l] {out_dir} is complete (identity {ident}); skipped", file=sys.stderr)
        return previous
    lock = _lock(out_dir) if parallel is None or parallel.rank == 0 else None
    if lock is False:
        return previous or {"status": "running elsewhere"}
    if parallel is None:
        resumed = _claim(out_dir, previous, identity, ident)
    else:  # process 0 claims the directory; then every process reads the checkpoint it left
        resumed = _claim(out_dir, previous, identity, ident) if parallel.rank == 0 else None
        parallel.barrier()
        if parallel.rank != 0:
            resumed = _resume_point(out_dir, ident)
    run = Run(cfg, out_dir, identity, ident, (lr, opts), parallel)
    if resumed is not None:
        run.restore(resumed, previous)
    try:
        return run.execute()
    finally:
        if lock:
            lock.close()  # releases the flock


def _lock(out_dir: Path):
    """An open file holding an exclusive lock on ``out_dir/.lock``, or False when another process
    holds it (that process's pid is in the file, and is reported)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / ".lock", "a+")  # noqa: SIM115 (held open for the run's duration)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        print(f"[kfac2l] {out_dir} is being trained by another process (pid {holder}); skipped", file=sys.stderr)
        return False
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def _claim(out_dir: Path, previous: dict | None, identity: dict, ident: str) -> dict | None:
    """Make ``out_dir`` this run's: archive a run of another identity, or return the checkpoint of
    an interrupted run of this identity (None when there is nothing to resume)."""
    if previous is not None and previous.get("identity_id") != ident:
        diff = identity_diff(previous.get("identity"), identity)
        dest = _archive(out_dir, previous)
        print(f"[kfac2l] {out_dir} held a run with another identity ({'; '.join(diff) or 'no identity recorded'});"
              f" moved to {dest}; running anew", file=sys.stderr)
        return None
    return _resume_point(out_dir, ident)


def _resume_point(out_dir: Path, ident: str) -> dict | None:
    """The checkpoint in ``out_dir`` of this identity, or None (absent, unreadable, another one)."""
    try:
        resumed = load_checkpoint(out_dir)
    except CheckpointError as err:
        print(f"[kfac2l] {err}; the run restarts from epoch 1", file=sys.stderr)
        return None
    if resumed is not None and resumed["identity_id"] != ident:
        print(f"[kfac2l] {out_dir}: checkpoint of another identity ignored; restarting", file=sys.stderr)
        return None
    return resumed


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


GROUPS = ("model", "dataset", "optimizer", "profile", "search", "launcher", "logger", "paths", "experiment",
          "convention", "distributed")


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
