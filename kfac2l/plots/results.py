"""Reading finished runs into pandas tables (the only input of the figures)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kfac2l.names import COLORS, LABELS, ORDER  # noqa: F401 (re-exported for the figures)
from kfac2l.runs import iter_runs


def _runs(root: Path):
    for record in iter_runs(root):
        yield record.path, record.summary


def _load_runs(root: str | Path, filename: str, keys: tuple[str, ...]) -> pd.DataFrame:
    """``filename`` (CSV, or its ``.gz`` copy) of every finished run under ``root``, with the
    summary's ``keys`` added."""
    frames = []
    for record in iter_runs(root):
        frame = record.read_csv(filename)
        if frame is None:
            continue
        for key in keys:
            frame[key] = record.summary.get(key)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_curves(root: str | Path) -> pd.DataFrame:
    """Per-epoch metrics of every finished run under ``root``, with optimiser, seed, status,
    profile and data source; columns as in metrics.csv plus those."""
    keys = ("optimizer", "seed", "status", "profile", "data_source", "lr", "damping", "experiment")
    return _load_runs(root, "metrics.csv", keys)


def load_diagnostics(root: str | Path) -> pd.DataFrame:
    """Per-iteration diagnostics (gap of eq. 4.6, true distances) of every run that recorded them."""
    return _load_runs(root, "diagnostics.csv", ("optimizer", "seed"))


def summary_table(root: str | Path) -> pd.DataFrame:
    """Per optimiser: the best training loss, median, min and max over seeds (column names say the
    statistic), median epochs run, seeds and diverged runs."""
    rows = [{"optimizer": s.get("optimizer"), "seed": s.get("seed"), "status": s.get("status"),
             "best_train_loss": s.get("best_train_loss"), "epochs_run": s.get("epochs_run"),
             "lr": s.get("lr"), "damping": s.get("damping")} for _, s in _runs(root)]
    if not rows:
        return pd.DataFrame(columns=["optimizer", "best_train_loss_median", "best_train_loss_min",
                                     "best_train_loss_max", "epochs_run_median", "seeds", "diverged"])
    frame = pd.DataFrame(rows)
    table = frame.groupby("optimizer").agg(
        best_train_loss_median=("best_train_loss", "median"), best_train_loss_min=("best_train_loss", "min"),
        best_train_loss_max=("best_train_loss", "max"), epochs_run_median=("epochs_run", "median"),
        seeds=("seed", "nunique"), diverged=("status", lambda s: int((s == "diverged").sum())),
        lr=("lr", "first"), damping=("damping", "first"),
    ).reset_index()
    table["order"] = table["optimizer"].map({k: i for i, k in enumerate(ORDER)})
    return table.sort_values("order").drop(columns="order").reset_index(drop=True)


def selection_budget(results: str | Path, profile: str, panel: str) -> str | None:
    """The budget the panel's lr/damping were selected on (``tables/<profile>/<panel>/best_settings.csv``)."""
    path = Path(results) / "tables" / profile / panel / "best_settings.csv"
    if not path.exists():
        return None
    frame = pd.read_csv(path)
    if "budget" not in frame or frame["budget"].dropna().empty:
        return None
    budget = str(frame["budget"].dropna().iloc[0])
    epochs = budget.split("max_epochs=")[1].split(",")[0] if "max_epochs=" in budget else "?"
    return f"the first {epochs} epochs of a seed-0 grid"
