"""Run Koroko et al.'s public code (github.com/Abdoulaye-Koroko/natural-gradients) on deep linear A,
beside our ``convention=authors``, and keep its per-epoch curves as CSV (issue 15, item 8).

Their Python files are exported from a git mirror into a temporary folder (``git show``; nothing of it is
copied into this repository) and run there unchanged except for what a CPU-only machine with a
current NumPy needs, each applied by this script and checked to hit exactly one line:

- ``apps/mlp_cnn/train_mlp.py:26`` ``torch.device("cuda")`` becomes ``torch.device("cpu")``;
- ``np.Inf`` (``utils/train_utils.py:28``, removed in NumPy 2) is aliased to ``np.inf`` before
  their modules load.

Their code seeds torch with 0 (``train_mlp.py:23``, ``initializations.py:8``) but draws the Fisher
batch's indices from NumPy's global generator, which it never seeds (``train_mlp.py:164``). Each run
here seeds that generator with ``--np-seed`` before their ``train`` starts: run-to-run variation of
their code on CPU comes from that draw only, so these runs are repeatable, and different NumPy seeds
show what the unseeded draw does to one configuration.

  python scripts/run_public_code.py --repo /work/.mirror/Abdoulaye-Koroko+natural-gradients/repo \\
      --commit 97105b613b54915b83c627e8aa5ca6e45edc2c2d --data data --np-seeds 1 2 --epochs 100 \\
      --out results/public_code/koroko_deep_linear_a

writes ``<out>/kfac,np_seed=<k>.csv`` (their result dict per epoch: epoch, train_loss, val_loss,
train_acc, val_acc, time_s), ``<out>/kfac,np_seed=<k>.log`` (their stdout) and ``<out>/runs.csv``
(one row per run, with the command, repository, commit, machine). The settings are their published
KFAC run's (``results/published/koroko/outputs_512/settings.csv``): batch 512, lr 1e-2, damping
1e-2, KL clip 1e-2, momentum 0.9, weight decay 1e-3, their default Xavier-uniform initialisation.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from import_published import load_npy_dict, write_run

from kfac2l.io import machine

URL = "https://github.com/Abdoulaye-Koroko/natural-gradients"
TREES = ("apps/mlp_cnn", "optimizers", "utils")  # what train_mlp.py imports (the mirror lacks some large files)
PATCHES = {"apps/mlp_cnn/train_mlp.py": ('device = torch.device("cuda")', 'device = torch.device("cpu")')}
SETTINGS = {"optim": "kfac", "data": "F_MNIST", "batch_size": 512, "lr": 1e-2, "damping": 1e-2, "clipping": 1e-2,
            "momentum": 0.9, "weight_decay": 1e-3, "init_params": "xavier_uniform"}
# Runs their script as __main__ after seeding NumPy's global generator (their Fisher-batch draw).
LAUNCHER = ("import sys, runpy, numpy as np, torch; np.Inf = np.inf; torch.set_num_threads(1); "
            "np.random.seed(int(sys.argv[1])); sys.argv = ['apps/mlp_cnn/train_mlp.py', *sys.argv[2:]]; "
            "runpy.run_path('apps/mlp_cnn/train_mlp.py', run_name='__main__')")


def export(repo: str, commit: str, into: Path, trees=TREES, patches=PATCHES) -> None:
    """Their Python files under ``trees`` at ``commit``, written under ``into`` (``git show``; the
    mirror may lack large data files, which the run does not read), with ``patches`` applied."""
    listing = subprocess.run(["git", "-C", repo, "ls-tree", "-r", "--name-only", commit, *trees], check=True,
                             capture_output=True, text=True).stdout.split()
    for rel in (p for p in listing if p.endswith(".py")):
        blob = subprocess.run(["git", "-C", repo, "show", f"{commit}:{rel}"], check=True, capture_output=True).stdout
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        (into / rel).write_bytes(blob)
    apply_patches(into, patches, commit)


def apply_patches(into: Path, patches: dict[str, tuple[str, str]], commit: str) -> None:
    """Replace, in each file ``into/<rel>``, its one occurrence of ``old`` by ``new``; a file where
    ``old`` occurs zero or several times (another commit) stops the script, naming file and count."""
    for rel, (old, new) in patches.items():
        text = (into / rel).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"run_public_code: expected one '{old}' in {rel} at {commit}; found {text.count(old)}")
        (into / rel).write_text(text.replace(old, new))


def link_data(data: Path, into: Path) -> Path:
    """Their reader wants ``<data_path>/F_MNIST/FashionMNIST/raw`` (torchvision layout, no download)."""
    root = into / "data"
    (root / "F_MNIST").mkdir(parents=True)
    (root / "F_MNIST" / "FashionMNIST").symlink_to((data / "FashionMNIST").resolve())
    return root


def run_one(tree: Path, data_root: Path, np_seed: int, epochs: int, deps: str | None) -> tuple[dict, str, list]:
    """One run of their train_mlp.py; returns their result dict, stdout and the command."""
    name = f"kfac_np{np_seed}"
    args = [f"--{k}={v}" for k, v in SETTINGS.items()]
    args += [f"--num_epochs={epochs}", f"--data_path={data_root}/", f"--result_name={name}"]
    cmd = [sys.executable, "-c", LAUNCHER, str(np_seed), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), deps]))}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run_public_code: their train_mlp.py failed (np seed {np_seed}):\n{proc.stderr[-2000:]}")
    result = load_npy_dict((tree / "apps/mlp_cnn/results" / f"{name}.npy").read_bytes())
    return result, proc.stdout, cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="git directory holding their commit")
    ap.add_argument("--commit", required=True)
    ap.add_argument("--data", default="data", help="folder holding FashionMNIST/raw (dataset.root of our runs)")
    ap.add_argument("--np-seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--deps", default=None, help="extra PYTHONPATH for their imports (mat4py)")
    ap.add_argument("--out", default="results/public_code/koroko_deep_linear_a")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.np_seeds:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp)
            export(args.repo, args.commit, tree)
            result, stdout, cmd = run_one(tree, link_data(Path(args.data), tree), seed, args.epochs, args.deps)
        losses = write_run(result, out / f"kfac,np_seed={seed}.csv")
        (out / f"kfac,np_seed={seed}.log").write_text(stdout)
        best = min(range(len(losses)), key=losses.__getitem__)
        rows.append({"run": f"kfac,np_seed={seed}", "np_seed": seed, "epochs": len(losses),
                     "best_train_loss": f"{losses[best]:.9g}", "best_epoch": best + 1, "repository": URL,
                     "commit": args.commit, "machine": machine().get("cpu", ""),
                     "command": shlex.join(["python", "scripts/run_public_code.py", *sys.argv[1:]])})
        print(f"[public code] np seed {seed}: best {losses[best]:.4f} at epoch {best + 1} of {len(losses)}", flush=True)
    _merge_rows(out / "runs.csv", rows)


def _merge_rows(path: Path, rows: list[dict]) -> None:
    """Add ``rows`` to ``runs.csv``, replacing earlier rows of the same run (written atomically)."""
    old = list(csv.DictReader(path.open())) if path.exists() else []
    keep = [r for r in old if r["run"] not in {n["run"] for n in rows}] + rows
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(keep, key=lambda r: int(r["np_seed"])))
    tmp.replace(path)


if __name__ == "__main__":
    main()
