"""Do the committed results still reproduce at this commit? ``python -m kfac2l.recheck``

For one committed run per (arm, optimiser, commit, kind of machine) under
``results/final/<profile>/`` it reruns the first ``--epochs`` epochs (default 2) from the run's
own ``config.yaml`` and the lr and damping its ``summary.json`` records, in a temporary folder,
with the run's thread count, and compares the per-epoch training and test losses with the
committed ``metrics.csv`` **bit for bit** (the float values as written, no tolerance). It prefers
a run without diagnostics (faster; diagnostics do not change a trajectory, which the tests check)
and the lowest such seed. ``--optimizers`` and ``--seeds`` check every run they select instead
(e.g. the runs a reading turns on: ``--only deep_linear_a --optimizers kfac --seeds 2``).

``--record FILE`` writes what was checked and each outcome as JSON (the code's commit, this
machine, the date, one entry per run): committed under ``results/recheck/``, such records are the
source of the report's ``recheck`` table.

A mismatch prints both values. ``summary.json`` carries the CPU model, torch's CPU capability and
the torch version of the machine that produced the run: a run made on another kind of machine
(other SIMD kernels, other rounding) is listed as not comparable here and not rerun; a run made
before that field existed is rerun and, if it differs, reported as not attributable (a change of
code or another machine). Exit code 0 when every run made on this kind of machine matches, 1
otherwise, 2 when there is nothing to check.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from kfac2l.io import atomic_write_json, git_commit, machine
from kfac2l.runs import RunRecord, iter_runs

COMPARED = ("train_loss", "test_loss")


@dataclass
class Check:
    """The outcome of one rerun."""

    run: Path
    epochs: int
    mismatches: list[str]
    machine: str

    @property
    def ok(self) -> bool:
        return not self.mismatches


def machine_key(machine: dict | None) -> str | None:
    """The part of a machine record that decides float rounding on the CPU (torch's SIMD capability
    and version; a CUDA device where one was used); None when the run recorded no machine."""
    if not machine:
        return None
    return " ".join(str(machine.get(k)) for k in ("cpu_capability", "torch", "cuda_device") if machine.get(k))


def pick_runs(root: Path) -> list[RunRecord]:
    """One complete run per (arm folder, optimiser, commit it was made with, machine kind): no
    diagnostics first, then the lowest seed; so every code version and every kind of machine that
    made committed runs is rechecked (where this machine is of that kind)."""
    chosen: dict[tuple, RunRecord] = {}
    for record in iter_runs(root):
        key = (record.path.parent.parent, record.summary.get("optimizer"), str(record.summary.get("git_commit")),
               str(machine_key(record.summary.get("machine"))))
        opts = record.summary.get("options") or {}
        rank = (bool(opts.get("diagnostics")), int(record.summary.get("seed", 0)))
        best = chosen.get(key)
        if best is None or rank < (bool((best.summary.get("options") or {}).get("diagnostics")),
                                   int(best.summary.get("seed", 0))):
            chosen[key] = record
    return [chosen[k] for k in sorted(chosen, key=lambda k: tuple(map(str, k)))]


def select_runs(root: Path, arms=None, optimizers=None, seeds=None) -> list[RunRecord]:
    """The runs to check: ``pick_runs``' representatives, or, when ``optimizers`` or ``seeds`` is
    given, every run they select; in the arm folders ``arms`` only, where given."""
    every = optimizers is not None or seeds is not None
    return [r for r in (iter_runs(root) if every else pick_runs(root))
            if (not arms or r.path.parent.parent.name in arms)
            and (optimizers is None or r.summary.get("optimizer") in optimizers)
            and (seeds is None or int(r.summary.get("seed", -1)) in seeds)]


def rerun_config(record: RunRecord, epochs: int, out_root: Path, data_root: str | None):
    """The run's resolved config with its recorded lr/damping, ``epochs`` epochs, no diagnostics."""
    cfg = OmegaConf.load(record.path / "config.yaml")
    s = record.summary
    overrides = {"use_best": False, "optimizer.lr": s["lr"], "optimizer.damping": s.get("damping"),
                 "profile.max_epochs": epochs, "profile.patience": epochs + 1, "diagnostics": False,
                 "exact_reference": False, "reference_fisher_batch": None, "paths.runs": str(out_root), "progress": False,
                 "logger.wandb": False, "checkpoint.every": 0}
    if data_root is not None:
        overrides["dataset.root"] = data_root
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def check_run(record: RunRecord, epochs: int = 2, data_root: str | None = None) -> Check:
    """Rerun ``epochs`` epochs of ``record`` and compare its per-epoch losses bit for bit."""
    from kfac2l.train import train

    committed = record.read_csv("metrics.csv")
    epochs = min(epochs, len(committed))
    threads = torch.get_num_threads()
    torch.set_num_threads(int(record.summary.get("torch_threads") or 1))
    try:
        with tempfile.TemporaryDirectory(prefix="kfac2l-recheck-") as tmp:
            cfg = rerun_config(record, epochs, Path(tmp), data_root)
            train(cfg, Path(tmp) / "run")
            fresh = pd.read_csv(Path(tmp) / "run" / "metrics.csv")
    finally:
        torch.set_num_threads(threads)
    mismatches = []
    if len(fresh) < epochs:  # the rerun stopped earlier (diverged or stopped early where the run went on)
        mismatches.append(f"the rerun stopped after epoch {len(fresh)}, the committed run went on to epoch {epochs}")
    for epoch in range(min(epochs, len(fresh))):
        for col in COMPARED:
            old, new = committed[col].iloc[epoch], fresh[col].iloc[epoch]
            if not (old == new or (pd.isna(old) and pd.isna(new))):
                mismatches.append(f"epoch {epoch + 1} {col}: committed {old!r}, now {new!r}")
    return Check(record.path, epochs, mismatches, record.summary.get("machine", {}).get("cpu", "not recorded"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/final", help="folder of committed runs")
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", default=None, help="dataset.root for the reruns (default: the runs' own)")
    parser.add_argument("--only", nargs="*", default=None, help="arm folders to check (e.g. deep_linear_a)")
    parser.add_argument("--optimizers", nargs="*", default=None, help="check every run of these optimisers")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="check every run of these seeds")
    parser.add_argument("--record", default=None, help="write the outcomes as JSON to this file")
    args = parser.parse_args(argv)
    root = Path(args.results) / args.profile
    records = select_runs(root, args.only, args.optimizers, args.seeds)
    if not records:
        print(f"kfac2l.recheck: no complete runs under {root}", file=sys.stderr)
        return 2
    here = machine_key(machine())
    counts = {"same": 0, "DIFFERENT": 0, "other machine": 0, "different, machine not recorded": 0}
    entries = []
    for record in records:
        label = f"{record.path.relative_to(root)} ({record.summary.get('git_commit', '?')[:7]})"
        made_on = machine_key(record.summary.get("machine"))
        if made_on is not None and made_on != here:  # other SIMD kernels or torch: other rounding
            counts["other machine"] += 1
            print(f"other machine  {label}: made on {made_on}, this one {here}: not comparable here", flush=True)
            entries.append(_entry(record, root, "other machine", 0))
            continue
        check = check_run(record, args.epochs, args.data)
        outcome = "same" if check.ok else "DIFFERENT" if made_on else "different, machine not recorded"
        counts[outcome] += 1
        entries.append(_entry(record, root, outcome, check.epochs))
        print(f"{outcome}  {label}: {check.epochs} epochs", flush=True)
        for line in check.mismatches:
            print(f"    {line}  [run made on: {check.machine}]")
    print(f"on this machine ({here}): {counts['same']} runs reproduce bit for bit, {counts['DIFFERENT']} made on this "
          f"kind of machine do not, {counts['other machine']} were made on another kind (not comparable here), "
          f"{counts['different, machine not recorded']} without a machine record differ (a code change or another "
          "machine: not attributable)")
    if args.record:
        atomic_write_json(args.record, {
            "commit": git_commit(), "profile": args.profile, "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "epochs": args.epochs, "selection": {"arms": args.only, "optimizers": args.optimizers, "seeds": args.seeds},
            "counts": counts, "runs": entries})
    return 1 if counts["DIFFERENT"] else 0


def _entry(record: RunRecord, root: Path, outcome: str, epochs: int) -> dict:
    """One run's outcome as recorded by ``--record``; ``epochs`` of its committed ``epochs_run``."""
    s = record.summary
    return {"run": str(record.path.relative_to(root)), "optimizer": s.get("optimizer"), "seed": s.get("seed"),
            "made_with": s.get("git_commit"), "made_on": machine_key(s.get("machine")), "outcome": outcome,
            "epochs": epochs, "epochs_run": s.get("epochs_run")}


if __name__ == "__main__":
    sys.exit(main())
