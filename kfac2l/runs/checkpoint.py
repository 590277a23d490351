"""Checkpoints of a run: written atomically, read with ``torch.load(..., weights_only=True)``.

A checkpoint holds the model, the optimiser (base and preconditioner, see their ``state_dict``),
the data-order generator, the metrics so far, the early-stopping state and, for a checkpoint
taken mid-epoch (on SIGTERM/SIGUSR2), the position in the epoch. Nothing in it is executable:
a results folder may come from someone else.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from kfac2l.io import atomic_write

CHECKPOINT = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt, or not a kfac2l checkpoint)."""


def save_checkpoint(run_dir: str | Path, state: dict) -> Path:
    """Write ``state`` to ``<run_dir>/checkpoint.pt`` atomically; the previous checkpoint stays in
    place if the write fails (the OSError names the path)."""
    path = Path(run_dir) / CHECKPOINT
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    atomic_write(path, lambda fh: fh.write(data))
    return path


def load_checkpoint(run_dir: str | Path) -> dict | None:
    """The checkpoint of ``run_dir`` (None if there is none); CheckpointError if unreadable."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "identity_id" not in state:
        raise CheckpointError(f"checkpoint {path} is not a kfac2l run checkpoint")
    return state


def remove_checkpoint(run_dir: str | Path) -> None:
    (Path(run_dir) / CHECKPOINT).unlink(missing_ok=True)
