"""Convert the authors' published deep linear A (Fashion-MNIST) result files into CSV.

Koroko et al.'s repository (github.com/Abdoulaye-Koroko/natural-gradients) ships its runs as
``np.save``d pickles of dicts of torch tensors under
``apps/mlp_cnn/results_ref/twolevel_kfac/F_MNIST/``. This script reads them straight from a git
mirror of that repository (``git show COMMIT:PATH``, no checkout) with a restricted unpickler that
accepts only numpy arrays and torch tensors (nothing else in a pickle is executed), and writes

  <out>/<folder>/<run>.csv       per epoch: epoch, train_loss, val_loss, train_acc, val_acc, time_s
  <out>/<folder>/settings.csv    per run: the paper's legend label, the *_params.npy values, best loss
  <out>/gap_residuals.csv.gz     per iteration, from residuals/: E(beta) - E(0) of each run

Usage (the mirror comes from the fetch tool or ``git clone --bare``):
  python scripts/import_published.py --repo /work/.mirror/Abdoulaye-Koroko+natural-gradients/repo \\
      --commit 97105b613b54915b83c627e8aa5ca6e45edc2c2d --out results/published/koroko
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import pickle
import subprocess
from pathlib import Path

import numpy as np
import torch

SOURCE = "apps/mlp_cnn/results_ref/twolevel_kfac/F_MNIST"
# Their notebook's legend for outputs_512 (apps/mlp_cnn/notebbok.ipynb:527-531: input_names -> output_names).
LABELS = {"kfac": "KFAC", "kfac_2L_ones": "NICO", "kfac_2L_span": "RESIDU", "kfac_2L_kryl": "KRY-RESIDU",
          "kfac_2L_okry": "KRY-NICO", "kfac_2L_eige": "SPECTRAL", "kfac_2L_dd_ones": "PREVIOUS",
          "sgd": "SGD", "adam": "ADAM"}
PARAM_KEYS = ("lr", "damping", "kl", "weigt_decay", "momentum", "two_level_coeff")  # their spelling


def _storage_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # NumPy 2 pickles
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,  # a tensor's (empty) backward hooks
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: only numpy arrays and torch tensors are read")
        return _ALLOWED[(module, name)]


def load_npy_dict(raw: bytes) -> dict:
    """The dict inside an ``np.save``d 0-d object array, read without executing pickle code."""
    fh = io.BytesIO(raw)
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    read_header(fh)
    obj = _Unpickler(fh).load()
    return obj[()] if isinstance(obj, np.ndarray) else obj


def _git(repo: str, *args: str) -> bytes:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True).stdout


def _floats(values) -> list[float]:
    return [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def write_run(run: dict, path: Path) -> list[float]:
    """One run's per-epoch columns as CSV; returns its training losses."""
    cols = {"train_loss": run["train_loss"], "val_loss": run["val_loss"], "train_acc": run.get("train_acc"),
            "val_acc": run.get("val_acc"), "time_s": run["times"]}
    cols = {k: _floats(v) for k, v in cols.items() if v is not None}
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["epoch", *cols])
        for e in range(len(cols["train_loss"])):
            out.writerow([e + 1, *(f"{cols[k][e]:.9g}" for k in cols)])
    return cols["train_loss"]


def convert_folder(repo: str, commit: str, folder: str, out: Path) -> None:
    names = _git(repo, "ls-tree", "--name-only", f"{commit}:{SOURCE}/{folder}").decode().split()
    runs = sorted(n[:-4] for n in names if n.endswith(".npy") and not n.endswith("_params.npy"))
    (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for name in runs:
        run = load_npy_dict(_git(repo, "show", f"{commit}:{SOURCE}/{folder}/{name}.npy"))
        losses = write_run(run, out / folder / f"{name}.csv")
        params = {}
        if f"{name}_params.npy" in names:
            params = load_npy_dict(_git(repo, "show", f"{commit}:{SOURCE}/{folder}/{name}_params.npy"))
        best = int(np.argmin(losses))
        rows.append([name, LABELS.get(name, "") if folder == "outputs_512" else "",
                     *(params.get(k, "") for k in PARAM_KEYS), len(losses), f"{losses[best]:.9g}", best + 1,
                     len(run["iteras"])])
    with (out / folder / "settings.csv").open("w", newline="") as fh:
        out_csv = csv.writer(fh)
        out_csv.writerow(["run", "label", *PARAM_KEYS, "epochs", "best_train_loss", "best_epoch", "iterations"])
        out_csv.writerows(rows)


def convert_gaps(repo: str, commit: str, out: Path) -> None:
    names = _git(repo, "ls-tree", "--name-only", f"{commit}:{SOURCE}/residuals").decode().split()
    series, iterations = {}, None
    for n in sorted(names):
        run = load_npy_dict(_git(repo, "show", f"{commit}:{SOURCE}/residuals/{n}"))
        series[n[:-4]] = _floats(run["residuals"])
        iterations = [int(i) for i in _floats(run["iterations"])]
    with gzip.open(out / "gap_residuals.csv.gz", "wt", newline="") as fh:
        out_csv = csv.writer(fh)
        out_csv.writerow(["iteration", *series])
        for k, it in enumerate(iterations):
            out_csv.writerow([it, *(f"{series[s][k]:.9g}" for s in series)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="git directory of a natural-gradients mirror")
    ap.add_argument("--commit", required=True, help="the commit to read (40 hex digits)")
    ap.add_argument("--out", default="results/published/koroko")
    ap.add_argument("--folders", nargs="*", default=None, help="default: every outputs* folder")
    args = ap.parse_args()
    out = Path(args.out)
    folders = args.folders or [n for n in _git(args.repo, "ls-tree", "--name-only", f"{args.commit}:{SOURCE}")
                               .decode().split() if n.startswith("outputs")]
    for folder in folders:
        convert_folder(args.repo, args.commit, folder, out)
    convert_gaps(args.repo, args.commit, out)


if __name__ == "__main__":
    main()
