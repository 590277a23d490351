"""Gather the runs of an experiment and choose the best setting per optimiser.

    python -m kfac2l.select --experiment deep_linear_a [--profile quick] [--runs results/runs]

Reads every ``summary.json`` under ``<runs>/<profile>/<experiment>``, builds one pandas table, and
picks per optimiser the setting with the lowest best training loss among non-diverged runs (the
paper's rule). Writes ``<tables>/<profile>/<experiment>/runs.csv``, ``best_settings.csv`` and
``best_settings.yaml`` (read by ``python -m kfac2l.train ... use_best=true``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from kfac2l.io import atomic_write_csv, atomic_write_text

COLUMNS = ["optimizer", "lr", "damping", "seed", "status", "best_train_loss", "best_epoch", "epochs_run",
           "profile", "data_source", "run_dir"]


def gather(root: str | Path) -> pd.DataFrame:
    """One row per run directory below ``root`` with a complete summary.json."""
    rows = []
    for path in sorted(Path(root).rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if not summary.get("complete"):
            continue
        summary["run_dir"] = str(path.parent)
        rows.append({c: summary.get(c) for c in COLUMNS})
    return pd.DataFrame(rows, columns=COLUMNS)


def best_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimiser, the (lr, damping) whose mean best training loss over seeds is lowest;
    diverged runs and runs without a finite loss are excluded."""
    ok = runs[(runs["status"] == "completed") & runs["best_train_loss"].notna()].copy()
    if ok.empty:
        return pd.DataFrame(columns=["optimizer", "lr", "damping", "best_train_loss", "runs"])
    ok["damping_key"] = ok["damping"].fillna(-1.0)
    grouped = (ok.groupby(["optimizer", "lr", "damping_key"], dropna=False)
               .agg(best_train_loss=("best_train_loss", "mean"), runs=("best_train_loss", "size"))
               .reset_index())
    idx = grouped.groupby("optimizer")["best_train_loss"].idxmin()
    best = grouped.loc[idx].rename(columns={"damping_key": "damping"})
    best["damping"] = best["damping"].where(best["damping"] >= 0, None)
    return best.sort_values("best_train_loss").reset_index(drop=True)


def read_selection(table_dir: str | Path) -> dict:
    """optimizer -> {lr, damping, best_train_loss} from ``best_settings.yaml`` ({} if absent)."""
    path = Path(table_dir) / "best_settings.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def write_selection(best: pd.DataFrame, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out_dir / "best_settings.csv", best)
    mapping = {r.optimizer: {"lr": float(r.lr), "damping": (None if pd.isna(r.damping) else float(r.damping)),
                             "best_train_loss": float(r.best_train_loss)} for r in best.itertuples()}
    atomic_write_text(out_dir / "best_settings.yaml", yaml.safe_dump(mapping, sort_keys=True))
    return out_dir / "best_settings.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--runs", default="results/runs", help="root of the run directories")
    parser.add_argument("--tables", default="results/tables", help="where selection tables are written")
    args = parser.parse_args(argv)
    root = Path(args.runs) / args.profile / args.experiment
    runs = gather(root)
    if runs.empty:
        print(f"kfac2l.select: no complete run under {root}", file=sys.stderr)
        return 1
    out = Path(args.tables) / args.profile / args.experiment
    atomic_write_csv(out / "runs.csv", runs)
    runs = runs[runs["seed"] == runs["seed"].min()]  # the grid's seed; final seeded runs do not select
    best = best_settings(runs)
    path = write_selection(best, out)
    diverged = (runs["status"] == "diverged").groupby(runs["optimizer"]).sum()
    best["diverged_cells"] = best["optimizer"].map(diverged).fillna(0).astype(int)
    print(best.to_string(index=False))
    print(f"\nselection written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
