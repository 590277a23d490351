"""Run Tselepidis, Kohler & Orvieto's public code (github.com/ntselepidis/KFAC-Pytorch, ``train_toy.py``)
on their toy problem beside our ``convention=tko``, and keep its per-epoch curves as CSV (issue 17, item 3).

Their Python files are exported from a git mirror into a temporary folder (``git show``; nothing of
theirs is copied into this repository) and ``train_toy.py`` runs there as ``__main__`` in a
subprocess with one thread, unchanged: no line of theirs is patched (``PATCHES`` is empty; the
checked mechanism of ``run_public_code.export`` would apply and verify one). What a current CPU
machine needs is passed around their code, not into it:

- ``--device cpu`` (their default is ``cuda``, utils/get_args.py:25);
- ``--solver approx`` (pi-damped inverses, optimizers/kfac.py:104-116): their default ``symeig``
  calls ``torch.symeig`` (kfac.py:95-103, gkfac.py:148-153), which current torch no longer has;
- ``tensorboardX`` (train_toy.py:6), their only logger, is not installed here: the launcher puts a
  stand-in ``SummaryWriter`` in ``sys.modules`` whose ``add_scalar`` prints each scalar (tag, their
  0-based epoch, the value in full float precision, seconds since the writer was made, i.e. since
  just before their epoch loop, train_toy.py:202-205, and the process's peak resident and virtual
  memory, VmHWM and VmPeak) as one ``kfac2l-scalar`` line on stdout;
- tqdm's bars (train_toy.py:58, 111) are switched off (``TQDM_DISABLE=1``) so that stderr ends with
  the error of a failed run.

Every other setting is their default, passed explicitly (utils/get_args.py:32-54): batch 64, lr 1e-2,
momentum 0.9, weight decay 3e-3, damping 1e-3, KL clip 1e-2, T_cov 10, T_inv 100, omega_1 = omega_2 = 1,
ReduceLROnPlateau on the test loss (factor 0.1, patience 10); ``--depth 62`` (the paper's 64 linear
layers; their default is 0). Optimisers by our names: ``kfac`` (their KFAC), ``previous`` (their
``gkfac``, the two-level K-FAC that is our PREVIOUS), ``sgd`` (torch.optim.SGD, utils/optim_utils.py:5-9).

Seeds: our run's ``seed`` is their ``--seed`` (as ``dataset=tko_toy`` maps it, docs/protocol.md): their
teacher and data come from ``seed + 1`` (train_toy.py:29-30), the student's initial weights and the
data order from ``seed`` (train_toy.py:148, 165, 178-179). So ``--seeds 1 2 3`` here pairs with our
``seed=1,2,3``.

Their training loss per epoch is the mean of the mini-batch losses seen during the epoch, before
each step (train_toy.py:88, 100: 391 batches, the last of 40 samples), as ours is under
``convention=tko`` (``convention.last_batch=keep``); the
test loss the mean of the per-batch means (train_toy.py:131). Their code is fragile (issue 17): its
two-level run can stop on its own assertion ``vg_sum > 0`` (gkfac.py:213-214) and its memory grows
from epoch to epoch. Each run therefore runs under an address-space limit (``--mem-gb``,
``RLIMIT_AS``) and a wall-clock limit (``--timeout-per-epoch``), and a failure is a result row
(status ``aborted (assertion)``, ``out of memory``, ``timeout`` or ``failed (...)``, with the last
lines of stderr), never the end of the script.

  nice -n 19 python scripts/run_tko_code.py --repo /work/.mirror/ntselepidis+KFAC-Pytorch/repo \\
      --commit 2ff652f --optimizers kfac previous sgd --seeds 1 2 3 --epochs 5

writes ``<out>/<optimizer>,seed=<k>.csv`` (per complete epoch, 1-based: epoch, train_loss,
train_accuracy, test_loss, test_accuracy (fractions), lr, wall_time (seconds since their epoch loop
began), peak_rss_mb and peak_vm_mb (peak resident and virtual memory so far)),
``<out>/<optimizer>,seed=<k>.log`` (their stdout and stderr) and ``<out>/runs.csv`` (one row per
run: status, epochs completed, mean training loss over epochs 3-5, peak memory, the last lines of
stderr, repository, commit, command, machine; rows of earlier invocations are kept unless rerun).
The default ``--out`` is ``results/public_code/tko_toy``, which ``kfac2l.evidence_tko.fidelity_table``
(docs/report.md, section C6) reads beside our ``final/paper/tko_toy``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from run_public_code import export

from kfac2l.evidence_tko import FIDELITY_EPOCHS, mean_over_epochs
from kfac2l.io import atomic_write_csv, atomic_write_text, machine

URL = "https://github.com/ntselepidis/KFAC-Pytorch"
TREES = ("train_toy.py", "models", "optimizers", "utils")   # what train_toy.py imports
PATCHES: dict[str, tuple[str, str]] = {}                    # none needed: see the module docstring
THEIR_NAME = {"kfac": "kfac", "previous": "gkfac", "sgd": "sgd"}
SETTINGS = {"batch_size": 64, "learning_rate": 1e-2, "momentum": 0.9, "weight_decay": 3e-3, "damping": 1e-3,
            "kl_clip": 1e-2, "TCov": 10, "TInv": 100, "omega_1": 1.0, "omega_2": 1.0, "solver": "approx",
            "lr_sched": "plateau", "device": "cpu"}
SCALAR = "kfac2l-scalar"
# their tensorboard tags (train_toy.py:56, 100-101, 134-135) -> our column names
TAGS = {"train/lr": "lr", "train/loss": "train_loss", "train/acc": "train_accuracy", "test/loss": "test_loss",
        "test/acc": "test_accuracy"}
PERCENT = ("train_accuracy", "test_accuracy")                # their accuracies are in percent
LAUNCHER = f"""
import sys, time, types, runpy, torch
torch.set_num_threads(1)


def peaks_mb():  # this process's peak resident (VmHWM) and virtual (VmPeak, what RLIMIT_AS bounds) memory
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return [int(status[key].split()[0]) / 1024 for key in ("VmHWM", "VmPeak")]


class SummaryWriter:  # stands in for tensorboardX's (not installed): every scalar to stdout
    def __init__(self, *args, **kwargs):
        self.t0 = time.perf_counter()

    def add_scalar(self, tag, value, step):
        print("{SCALAR}", tag, step, repr(float(value)), repr(time.perf_counter() - self.t0), *peaks_mb(), sep="\\t",
              flush=True)

sys.modules["tensorboardX"] = types.ModuleType("tensorboardX")
sys.modules["tensorboardX"].SummaryWriter = SummaryWriter
sys.argv = ["train_toy.py", *sys.argv[1:]]
runpy.run_path("train_toy.py", run_name="__main__")
"""
OOM_SIGNS = ("MemoryError", "can't allocate memory", "Cannot allocate memory", "std::bad_alloc", "out of memory",
             "failed to map segment")  # the last: torch's libraries do not fit under the limit (about 3 GB)
TAIL_LINES = 3


def parse_scalars(stdout: str) -> pd.DataFrame:
    """Per complete epoch (one whose test accuracy was logged, the last scalar of an epoch,
    train_toy.py:135): epoch (1-based), train_loss, train_accuracy, test_loss, test_accuracy
    (fractions), lr, wall_time, peak_rss_mb and peak_vm_mb (MB so far), from the stand-in writer's
    ``kfac2l-scalar`` lines of ``stdout``."""
    epochs: dict[int, dict] = {}
    for line in stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 7 or parts[0] != SCALAR or parts[1] not in TAGS:
            continue
        row = epochs.setdefault(int(parts[2]) + 1, {"epoch": int(parts[2]) + 1})
        name = TAGS[parts[1]]
        row[name] = float(parts[3]) / (100 if name in PERCENT else 1)
        if name == "test_accuracy":
            row["wall_time"], row["peak_rss_mb"], row["peak_vm_mb"] = map(float, parts[4:])
    columns = ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "wall_time", "peak_rss_mb",
               "peak_vm_mb"]
    complete = [r for _, r in sorted(epochs.items()) if "wall_time" in r]
    return pd.DataFrame(complete, columns=columns)


def classify(returncode: int, stderr: str, timed_out: bool) -> str:
    """The status of one run of their script: ``completed``, ``timeout`` (our wall-clock limit),
    ``out of memory`` (a memory error under the address-space limit, or killed by SIGKILL, which is
    what the kernel's OOM killer sends), ``aborted (assertion)`` (one of their ``assert``s), or
    ``failed (exit N)`` / ``failed (signal N)``."""
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "completed"
    if any(sign in stderr for sign in OOM_SIGNS) or returncode == -signal.SIGKILL:  # SIGKILL: OOM killer (or a person)
        return "out of memory"
    if "AssertionError" in stderr:
        return "aborted (assertion)"
    return f"failed (signal {-returncode})" if returncode < 0 else f"failed (exit {returncode})"


def stderr_tail(stderr: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ``stderr``, joined by `` | `` (one CSV cell)."""
    return " | ".join([x.strip() for x in stderr.splitlines() if x.strip()][-lines:])


def _limit_memory(gigabytes: float):
    """A ``preexec_fn`` setting the child's address-space limit (RLIMIT_AS) to ``gigabytes``."""
    limit = int(gigabytes * 2**30)
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def wait_bounded(proc: subprocess.Popen, timeout: float) -> tuple[int, bool]:
    """Wait for ``proc`` (the leader of its own session) at most ``timeout`` seconds, then kill its
    process group; returns (exit code, timed out)."""
    try:
        return proc.wait(timeout), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(), True
    except BaseException:  # interrupted: take the child along
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise


def their_command(optimizer: str, seed: int, epochs: int, depth: int) -> list[str]:
    """Their train_toy.py's arguments for one run (utils/get_args.py names)."""
    args = {**SETTINGS, "optimizer": THEIR_NAME[optimizer], "seed": seed, "epoch": epochs, "depth": depth}
    return [f"--{k}={v}" for k, v in args.items()]


def run_one(repo: str, commit: str, optimizer: str, seed: int, args) -> tuple[pd.DataFrame, dict, str]:
    """One bounded run of their train_toy.py in a fresh export; its per-epoch frame, its runs.csv
    fields and its log (stdout, then stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        export(repo, commit, tree, TREES, PATCHES)
        with open(tree / "stdout.txt", "w") as out, open(tree / "stderr.txt", "w") as err:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *their_command(optimizer, seed, args.epochs,
                                                                                  args.depth)],
                                    cwd=tree, env=env, stdout=out, stderr=err, start_new_session=True,
                                    preexec_fn=_limit_memory(args.mem_gb))
            code, timed_out = wait_bounded(proc, args.epochs * args.timeout_per_epoch + 60)
            seconds = time.monotonic() - start
        stdout, stderr = (tree / "stdout.txt").read_text(), (tree / "stderr.txt").read_text()
    frame = parse_scalars(stdout)
    status = classify(code, stderr, timed_out)
    peaks = {k: f"{frame[k].max():.0f}" if len(frame) else "" for k in ("peak_rss_mb", "peak_vm_mb")}
    fields = {"status": status, "epochs_completed": len(frame), "epochs_requested": args.epochs,
              "mean_train_loss_3_5": _g(mean_over_epochs(frame, FIDELITY_EPOCHS)),
              "last_train_loss": _g(frame["train_loss"].iloc[-1]) if len(frame) else "", "exit_code": code,
              **peaks, "mem_limit_gb": args.mem_gb, "seconds": round(seconds, 1),
              "stderr_tail": "" if status == "completed" else stderr_tail(stderr)}
    return frame, fields, f"{stdout}\n--- stderr ---\n{stderr}"


def _g(x: float) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.9g}"


def merge_runs(path: Path, rows: list[dict]) -> pd.DataFrame:
    """``runs.csv`` with ``rows`` added, replacing earlier rows of the same run; written atomically."""
    new = pd.DataFrame(rows)
    if path.exists():
        old = pd.read_csv(path, dtype=str, keep_default_na=False)
        new = pd.concat([old[~old["run"].isin(set(new["run"]))], new.astype(str)], ignore_index=True)
    order = {o: i for i, o in enumerate(THEIR_NAME)}
    new = new.sort_values(["optimizer", "seed"], key=lambda c: c.map(order) if c.name == "optimizer" else
                          c.astype(int)).reset_index(drop=True)
    atomic_write_csv(path, new)
    return new


def resolve(repo: str, commit: str) -> str:
    """The full hash of ``commit`` in ``repo``, or one line naming what is wrong."""
    if not Path(repo).exists():
        raise SystemExit(f"run_tko_code: --repo {repo} does not exist (a git mirror of {URL})")
    found = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"run_tko_code: --commit {commit} is not a commit of {repo}")
    return found.stdout.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help=f"git directory holding their commit ({URL})")
    ap.add_argument("--commit", default="2ff652f")
    ap.add_argument("--optimizers", nargs="+", choices=list(THEIR_NAME), default=list(THEIR_NAME))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="their --seed = our seed")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--depth", type=int, default=62, help="their --depth: hidden blocks (linear layers - 2)")
    ap.add_argument("--mem-gb", type=float, default=6.0, help="address-space limit of each run (GiB)")
    ap.add_argument("--timeout-per-epoch", type=float, default=300.0, help="seconds per epoch (+60 s to start)")
    ap.add_argument("--out", default="results/public_code/tko_toy")
    args = ap.parse_args(argv)
    for name in ("epochs", "mem_gb", "timeout_per_epoch"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    if args.depth < 0:
        ap.error(f"--depth must be 0 or more (hidden blocks); got {args.depth}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    commit = resolve(args.repo, args.commit)
    out = Path(args.out)
    command = shlex.join(["python", "scripts/run_tko_code.py", *(sys.argv[1:] if argv is None else argv)])
    host = machine()
    for optimizer in args.optimizers:
        for seed in args.seeds:
            run = f"{optimizer},seed={seed}"
            frame, fields, log = run_one(args.repo, commit, optimizer, seed, args)
            atomic_write_csv(out / f"{run}.csv", frame)
            atomic_write_text(out / f"{run}.log", log)
            merge_runs(out / "runs.csv", [{"run": run, "optimizer": optimizer, "their_optimizer": THEIR_NAME[optimizer],
                                          "seed": seed, "depth": args.depth, **fields, "repository": URL,
                                          "commit": commit, "torch": host.get("torch", ""),
                                          "machine": host.get("cpu", ""), "command": command}])
            print(f"[their code] {run}: {fields['status']}, {fields['epochs_completed']}/{args.epochs} epochs, "
                  f"mean training loss epochs 3-5 {fields['mean_train_loss_3_5'] or '-'}, {fields['seconds']} s, "
                  f"peak {fields['peak_rss_mb']} MB", flush=True)


if __name__ == "__main__":
    main()
