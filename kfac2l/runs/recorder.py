"""A run in progress: what it has done so far (``Progress``, everything a checkpoint holds besides
model and optimiser) and the writer of its record files (``RunRecorder``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kfac2l.runs.records import write_diagnostics, write_kl_clip, write_metrics, write_summary


@dataclass
class Progress:
    """Epochs, iterations, metrics and early-stopping state of a run."""

    epoch: int = 1                 # the epoch in progress (or next to start)
    batch: int = 0                 # batches of that epoch already done (mid-epoch checkpoint)
    epoch_losses: list = field(default_factory=list)
    epoch_data_state: torch.Tensor | None = None  # data generator state at the start of `epoch`
    iterations: int = 0
    rows: list = field(default_factory=list)
    diag_rows: list = field(default_factory=list)
    kl_rows: list = field(default_factory=list)  # per iteration: (iteration, nu, kl_product) of the KL clip
    best: float = math.inf
    best_epoch: int = 0
    since_best: int = 0
    start_loss: float | None = None
    above: int = 0                 # consecutive epochs above the divergence threshold
    elapsed: float = 0.0

    def state(self) -> dict:
        """A plain dict (tensors, numbers, lists) for the checkpoint; diagnostics become floats."""
        self.diag_rows = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in r.items()} for r in self.diag_rows]
        self.read_kl_rows()
        out = dict(self.__dict__)
        out["epoch_losses"] = [float(v) for v in self.epoch_losses]
        return out

    def read_kl_rows(self) -> None:
        """The KL-clip rows still held as device tensors (this epoch's) as floats: one transfer."""
        start = next((k for k, r in enumerate(self.kl_rows) if torch.is_tensor(r[1])), len(self.kl_rows))
        if start == len(self.kl_rows):
            return
        fresh = self.kl_rows[start:]
        values = torch.stack([torch.stack([nu, product]) for _, nu, product in fresh]).tolist()
        self.kl_rows[start:] = [[float(r[0]), *v] for r, v in zip(fresh, values)]

    def load(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class RunRecorder:
    """Writes a run's summary.json, metrics.csv and diagnostics.csv (atomically) from its progress."""

    def __init__(self, out_dir: Path, summary: dict):
        self.out_dir = Path(out_dir)
        self.summary = summary

    def write(self, progress: Progress, status: str, error: str | None = None, reason: str | None = None) -> dict:
        write_metrics(self.out_dir, progress.rows)
        write_diagnostics(self.out_dir, progress.diag_rows)
        write_kl_clip(self.out_dir, progress.kl_rows)
        self.summarise(progress, status, error, reason)
        write_summary(self.out_dir, self.summary)
        return self.summary

    def summarise(self, progress: Progress, status: str, error: str | None = None, reason: str | None = None) -> dict:
        """Bring the summary up to date with ``progress`` (nothing written)."""
        self.summary.update({
            "status": status, "error": error, "divergence_reason": reason,
            "best_train_loss": progress.best if math.isfinite(progress.best) else None,
            "best_epoch": progress.best_epoch, "epochs_run": len(progress.rows), "iterations": progress.iterations,
            "final_train_loss": progress.rows[-1]["train_loss"] if progress.rows else None,
            "wall_time": progress.elapsed, "complete": status in ("completed", "diverged"),
        })
        return self.summary
