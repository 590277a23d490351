"""The one reader and writer of run records (everything else goes through here).

A run directory holds ``summary.json`` (status, identity, hyper-parameters, best loss, provenance),
``metrics.csv`` (one row per epoch, rewritten every epoch), ``config.yaml``, with diagnostics
``diagnostics.csv``, and for every run whose optimiser KL-clips ``kl_clip.csv.gz`` (per iteration:
the clip factor nu and the product it reads). Every file is written atomically and readable by the group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from kfac2l.io import atomic_write_csv, atomic_write_json

KL_CLIP_COLUMNS = ["iteration", "nu", "kl_product"]
METRIC_COLUMNS = ["epoch", "iterations", "train_loss", "test_loss", "test_accuracy", "wall_time"]
COMPLETE_STATUSES = ("completed", "diverged")


@dataclass
class RunRecord:
    """A run directory and its parsed summary."""

    path: Path
    summary: dict

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))

    def read_csv(self, name: str) -> pd.DataFrame | None:
        """``name`` (or its gzipped copy ``name.gz``, as committed for large diagnostics), or None."""
        for path in (self.path / name, self.path / f"{name}.gz"):
            if path.exists():
                return pd.read_csv(path)
        return None


def read_summary(run_dir: str | Path) -> dict | None:
    """The parsed ``summary.json`` of ``run_dir``, or None when absent or unreadable."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return summary if isinstance(summary, dict) else None


def iter_runs(root: str | Path, complete_only: bool = True) -> Iterator[RunRecord]:
    """Every run directory below ``root`` (sorted), skipping superseded archives."""
    for path in sorted(Path(root).rglob("summary.json")):
        if ".superseded" in path.parts:
            continue
        summary = read_summary(path.parent)
        if summary is None:
            continue
        record = RunRecord(path.parent, summary)
        if record.complete or not complete_only:
            yield record


def write_summary(run_dir: str | Path, summary: dict) -> None:
    atomic_write_json(Path(run_dir) / "summary.json", summary)


def write_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    atomic_write_csv(Path(run_dir) / "metrics.csv", pd.DataFrame(rows, columns=METRIC_COLUMNS))


def write_diagnostics(run_dir: str | Path, rows: list[dict]) -> None:
    """Per-iteration diagnostics (0-dim tensors are read here, once per write)."""
    if not rows:
        return
    frame = pd.DataFrame([{k: (float(v) if torch.is_tensor(v) else v) for k, v in r.items()} for r in rows])
    if "dist_kfac" in frame and "dist_two_level" in frame:
        frame["distance_ratio"] = frame["dist_two_level"] / frame["dist_kfac"]
    atomic_write_csv(Path(run_dir) / "diagnostics.csv", frame)


def write_kl_clip(run_dir: str | Path, rows: list) -> None:
    """Per-iteration KL-clip record (iteration, nu, kl_product), gzipped; nothing without rows."""
    if not rows:
        return
    frame = pd.DataFrame([[float(v) for v in r] for r in rows], columns=KL_CLIP_COLUMNS)
    frame["iteration"] = frame["iteration"].astype(int)
    atomic_write_csv(Path(run_dir) / "kl_clip.csv.gz", frame)
