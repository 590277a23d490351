"""Make tests/fixtures/tko_toy_<seed>.json by running Tselepidis, Kohler & Orvieto's own data
generator (github.com/ntselepidis/KFAC-Pytorch, train_toy.py, function ``generate_data``) on CPU.

Their code is executed from a checkout exported outside this repository, never copied in:

    git -C <mirror> archive 2ff652f | tar -x -C /tmp/tko-KFAC-Pytorch
    python scripts/tko_fixtures.py --their /tmp/tko-KFAC-Pytorch --commit 2ff652f... --seeds 0 1 2

``generate_data`` is taken from their train_toy.py by name (``ast``) and run with their
``SimpleMLP`` and an ``args`` of (seed, device='cpu'), after their own ``torch.manual_seed(seed)``
(train_toy.py:148) and with their sizes (train_toy.py:151-155). The student network of
train_toy.py:178 is built too, so that our Kaiming initialisation can be compared with theirs.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import sys
from pathlib import Path

import numpy as np
import torch

N_TRAIN, D_IN, D_OUT = 25000, 10, 1  # train_toy.py:151-155
ROWS = 5                              # first rows of X kept (to 1e-6)
STUDENT_DEPTH = 62


def their_generate_data(their: Path):
    """The function ``generate_data`` of their train_toy.py, compiled alone (the rest of the
    script parses the command line and trains)."""
    tree = ast.parse((their / "train_toy.py").read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "generate_data"]
    sys.path.insert(0, str(their))
    from models.cifar import SimpleMLP

    namespace = {"torch": torch, "SimpleMLP": SimpleMLP}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(their / "train_toy.py"), "exec"), namespace)
    return namespace, SimpleMLP


def pack_labels(y: torch.Tensor) -> str:
    """0/1 labels -> base64 of numpy.packbits (big-endian bit order)."""
    return base64.b64encode(np.packbits(y.reshape(-1).numpy().astype(np.uint8)).tobytes()).decode()


def fixture(seed: int, their: Path, commit: str, command: str) -> dict:
    namespace, SimpleMLP = their_generate_data(their)
    namespace["args"] = argparse.Namespace(seed=seed, device="cpu")
    torch.manual_seed(seed)  # train_toy.py:148
    x, y = namespace["generate_data"](N_TRAIN + N_TRAIN // 10, D_IN, D_OUT)
    student = SimpleMLP(D_IN, D_OUT, d_h=D_IN, n_h=STUDENT_DEPTH, bias=False, batch_norm=True, activation=None,
                        seed=seed)  # train_toy.py:178
    weights = [m.weight.detach() for m in student.modules() if type(m) is torch.nn.Linear]
    return {
        "source": {"repository": "github.com/ntselepidis/KFAC-Pytorch", "commit": commit,
                   "function": "train_toy.py:generate_data (lines 27-44), SimpleMLP models/cifar/simple_mlp.py",
                   "command": command, "device": "cpu", "torch": torch.__version__},
        "seed": seed,
        "n_train": N_TRAIN,
        "n_test": N_TRAIN // 10,
        "x_shape": list(x.shape),
        "x_first_rows": [[round(float(v), 6) for v in row] for row in x[:ROWS]],
        "x_sum": float(x.double().sum()),
        "labels_packbits_base64": pack_labels(y),
        "positives_train": int(y[:N_TRAIN].sum()),
        "positives_test": int(y[N_TRAIN:].sum()),
        "student": {"depth": STUDENT_DEPTH, "linear_layers": len(weights),
                    "first_weight": [[round(float(v), 6) for v in row] for row in weights[0]],
                    "last_weight": [round(float(v), 6) for v in weights[-1].reshape(-1)],
                    "weight_sums": [round(float(w.double().sum()), 6) for w in weights]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--their", type=Path, required=True, help="exported checkout of ntselepidis/KFAC-Pytorch")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures")
    args = parser.parse_args()
    command = "python scripts/tko_fixtures.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        path = args.out / f"tko_toy_{seed}.json"
        path.write_text(json.dumps(fixture(seed, args.their, args.commit, command), indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()
