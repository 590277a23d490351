"""Atomic result files and provenance."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pandas as pd


def _file_mode() -> int:
    """0666 minus the process umask (what ``open`` would give), at least readable by the group:
    ``mkstemp`` alone creates 0600 files, unreadable in a shared results folder."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o666 & ~mask) | 0o440


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(fh)`` on a temporary binary file next to ``path``, flush it to disk, then
    ``os.replace`` it onto ``path``: a reader sees the old file or the new one, never half of one.
    On failure (e.g. a full disk) the temporary file is removed, the old file is left in place and
    the error names the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    data = text.encode()
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """A CSV written atomically; a path ending in ``.gz`` is gzip-compressed (pandas reads both)."""
    path = Path(path)
    if path.suffix == ".gz":
        import gzip

        data = gzip.compress(frame.to_csv(index=False, float_format="%.7g").encode(), mtime=0)
        atomic_write(path, lambda fh: fh.write(data))
        return
    atomic_write_text(path, frame.to_csv(index=False))


def git_commit() -> str | None:
    """The current git commit of the kfac2l checkout, with '+dirty' if tracked files outside
    ``results/`` are modified (result files are outputs: a run that rewrites the committed
    results does not make the code dirty), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                               cwd=top, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    """What can change float results across machines: CPU model, torch's CPU capability (the SIMD
    kernels it dispatches to), torch version, and the CUDA device when one is used."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info
