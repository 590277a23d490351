"""Gather the runs of an experiment and choose the best setting per optimiser.

    python -m kfac2l.select --experiment deep_linear_a [--profile quick] [--runs results/runs]
                            [--tables DIR] [--max-epochs N]

Reads every complete ``summary.json`` under ``<runs>/<profile>/<experiment>`` (through
``kfac2l.runs``), builds one pandas table, and picks per optimiser the setting with the lowest
best training loss among completed runs (the paper's rule). Runs of different budgets (maximum
epochs, patience, data subset, batch size) are never mixed: select refuses, naming them, unless
``--max-epochs`` picks one. Writes ``runs.csv``, ``best_settings.csv`` and ``best_settings.yaml``
(read by ``python -m kfac2l.train ... use_best=true``) into ``<tables>/<profile>/<experiment>``;
by default ``<tables>`` is ``<runs>``, i.e. next to the runs it read, never the committed tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from kfac2l.io import atomic_write_csv, atomic_write_text
from kfac2l.runs import iter_runs

COLUMNS = ["optimizer", "lr", "damping", "seed", "status", "best_train_loss", "best_epoch", "epochs_run",
           "max_epochs", "budget", "convention", "profile", "data_source", "identity_id", "git_commit", "run_dir"]


class SelectionError(ValueError):
    """Runs that cannot be compared (mixed budgets)."""


def _budget(summary: dict) -> str:
    ident = summary.get("identity") or {}
    budget = ident.get("budget") or {"max_epochs": summary.get("max_epochs")}
    data = ident.get("data") or {}
    batch = (ident.get("experiment") or {}).get("batch_size", summary.get("batch_size"))
    stopping = "" if budget.get("early_stopping", True) else ",early_stopping=false"  # absent: on (older runs)
    return (f"max_epochs={budget.get('max_epochs')},patience={budget.get('patience')}{stopping},"
            f"train_subset={data.get('train_subset')},batch_size={batch}")


def gather(root: str | Path) -> pd.DataFrame:
    """One row per run directory below ``root`` with a complete summary.json."""
    rows = []
    for record in iter_runs(root):
        row = {c: record.summary.get(c) for c in COLUMNS}
        row["budget"], row["run_dir"] = _budget(record.summary), str(record.path)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def best_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimiser, the (lr, damping) whose mean best training loss over seeds is lowest;
    diverged runs and runs without a finite loss are excluded. Refuses mixed budgets."""
    budgets = sorted(runs["budget"].dropna().unique()) if "budget" in runs else []
    if len(budgets) > 1:
        raise SelectionError(f"runs of {len(budgets)} budgets cannot be compared: {budgets}; "
                             "select one with --max-epochs or separate the run folders")
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
    if budgets:
        best["budget"] = budgets[0]
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
    parser.add_argument("--tables", default=None, help="where the tables go (default: the --runs root)")
    parser.add_argument("--max-epochs", type=int, default=None, help="use only runs of this epoch budget")
    args = parser.parse_args(argv)
    root = Path(args.runs) / args.profile / args.experiment
    runs = gather(root)
    if runs.empty:
        print(f"kfac2l.select: no complete run under {root}", file=sys.stderr)
        return 1
    if args.max_epochs is not None:
        runs = runs[runs["max_epochs"] == args.max_epochs]
        if runs.empty:
            print(f"kfac2l.select: no complete run with max_epochs={args.max_epochs} under {root}", file=sys.stderr)
            return 1
    counts = runs.groupby("status").size().to_dict()
    print(f"read {len(runs)} complete runs under {root} ({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
          f"budgets: {sorted(runs['budget'].unique())}; commits: {sorted(runs['git_commit'].dropna().unique())}")
    out = Path(args.tables or args.runs) / args.profile / args.experiment
    grid = runs[runs["seed"] == runs["seed"].min()]  # the grid's seed; final seeded runs do not select
    try:
        best = best_settings(grid)
    except SelectionError as err:
        print(f"kfac2l.select: {err}", file=sys.stderr)
        return 2
    atomic_write_csv(out / "runs.csv", runs)
    path = write_selection(best, out)
    diverged = (grid["status"] == "diverged").groupby(grid["optimizer"]).sum()
    best["diverged_cells"] = best["optimizer"].map(diverged).fillna(0).astype(int)
    print(best.to_string(index=False))
    print(f"\nselection written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
