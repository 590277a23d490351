"""Tiny data files in the real formats (IDX, torchvision CIFAR/SVHN layouts, MATLAB .mat)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io

RNG = np.random.default_rng(0)


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 | {1: 0x01, 3: 0x03}[array.ndim]
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        fh.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, folder: str, n_train: int = 160, n_test: int = 32) -> None:
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = RNG.integers(0, 10, n)
        images = RNG.integers(0, 256, (n, 28, 28))
        images[:, :3, :3] = labels[:, None, None] * 25  # learnable signal
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def write_cifar(root: Path, classes: int = 10, n: int = 40) -> None:
    if classes == 10:
        base, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        base, files, key = root / "cifar-100-python", ["train", "test"], "fine_labels"
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    base.mkdir(parents=True, exist_ok=True)
    for f in files:
        entry = {"data": RNG.integers(0, 256, (n, 3072)).astype(np.uint8), key: list(RNG.integers(0, classes, n))}
        with open(base / f, "wb") as fh:
            pickle.dump(entry, fh)
    with open(base / meta[0], "wb") as fh:
        pickle.dump(meta[1], fh)


def write_svhn(root: Path, n: int = 40) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        scipy.io.savemat(root / f"{split}_32x32.mat", {
            "X": RNG.integers(0, 256, (32, 32, 3, n)).astype(np.uint8),
            "y": RNG.integers(1, 11, (n, 1)).astype(np.uint8),
        })


def write_curves(root: Path, n: int = 100) -> None:
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "digs3pts_1.mat", {"bdata": RNG.random((n, 784))})


def write_faces(root: Path, n: int = 100) -> None:
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "newfaces_rot_single.mat", {"newfaces_single": RNG.random((625, n)).astype(np.float32)})


def write_all(root: Path) -> None:
    write_mnist_like(root, "MNIST")
    write_mnist_like(root, "FashionMNIST")
    write_cifar(root, 10)
    write_cifar(root, 100)
    write_svhn(root)
    write_curves(root)
    write_faces(root)
