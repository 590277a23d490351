"""Loading the paper's data sets into memory (see ``kfac2l.data``)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kfac2l.io import atomic_write_text

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MARTENS_URL = "http://www.cs.toronto.edu/~jmartens/"


class DataMissingError(FileNotFoundError):
    """A data file is absent and could not be downloaded."""


class DataCorruptError(ValueError):
    """A data file is present but cannot be read (truncated, corrupt, another version), or the
    data root cannot be written."""


_PRESENT = {  # what, under the root, shows that a torchvision data set is there
    "mnist": ("MNIST/raw", "*-ubyte"), "fashion_mnist": ("FashionMNIST/raw", "*-ubyte"),
    "cifar10": ("cifar-10-batches-py", "*"), "cifar100": ("cifar-100-python", "*"), "svhn": (".", "*_32x32.mat"),
}


def _present_files(name: str, root: Path) -> list[Path]:
    folder, pattern = _PRESENT[name]
    return sorted((root / folder).glob(pattern)) if (root / folder).is_dir() else []


@dataclass
class DataSplits:
    """Train and test tensors; ``source`` says where they came from (recorded in every result)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    source: str
    num_classes: int | None = None
    notes: dict = field(default_factory=dict)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def subset(self, train: int | None, test: int | None, seed: int = 0) -> "DataSplits":
        """A random subset (the quick profile); None keeps everything."""
        gen = torch.Generator().manual_seed(seed)

        def pick(x, y, n):
            if n is None or n >= x.shape[0]:
                return x, y
            idx = torch.randperm(x.shape[0], generator=gen)[:n]
            return x[idx], (y[idx] if y is not None else None)

        xt, yt = pick(self.x_train, self.y_train, train)
        xs, ys = pick(self.x_test, self.y_test, test)
        return DataSplits(self.name, xt, yt, xs, ys, self.source, self.num_classes, dict(self.notes))


class TensorBatches:
    """Shuffled mini-batches of in-memory (device-resident) tensors; the last incomplete batch is
    dropped (default) or, with ``drop_last=False``, kept as a smaller last batch (a PyTorch
    ``DataLoader``'s default, which Tselepidis et al.'s train_toy.py:165 uses)."""

    def __init__(self, x, y, batch_size: int, generator: torch.Generator, device: torch.device,
                 drop_last: bool = True):
        if batch_size > x.shape[0]:
            raise ValueError(f"batch_size={batch_size} exceeds the {x.shape[0]} training samples")
        self.x, self.y = x.to(device), (y.to(device) if y is not None else None)
        self.batch_size, self.generator, self.drop_last = batch_size, generator, drop_last

    def __len__(self) -> int:
        whole, rest = divmod(self.x.shape[0], self.batch_size)
        return whole + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self):
        perm = torch.randperm(self.x.shape[0], generator=self.generator).to(self.x.device)
        for k in range(len(self)):
            idx = perm[k * self.batch_size : (k + 1) * self.batch_size]
            yield as_float(self.x[idx]), (self.y[idx] if self.y is not None else None)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float data unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------- torchvision sets
def _torchvision(name: str, root: Path, download: bool) -> DataSplits:
    import torchvision.datasets as tvd

    cls, kind = {
        "mnist": (tvd.MNIST, "train"),
        "fashion_mnist": (tvd.FashionMNIST, "train"),
        "cifar10": (tvd.CIFAR10, "train"),
        "cifar100": (tvd.CIFAR100, "train"),
        "svhn": (tvd.SVHN, "split"),
    }[name]
    source = "torchvision"
    try:
        if name == "fashion_mnist":
            source = _stage_debian_fashion_mnist(root) or source
    except PermissionError as err:
        raise DataCorruptError(f"data root {root} cannot be written ({err}); set paths.data (or dataset.root) "
                               "to a writable folder") from None
    try:
        if kind == "split":
            train, test = cls(str(root), split="train", download=download), cls(str(root), split="test", download=download)
        else:
            train, test = cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except PermissionError as err:
        raise DataCorruptError(f"data root {root} cannot be written or read ({err}); set paths.data (or "
                               "dataset.root) to a writable folder") from None
    except (RuntimeError, urllib.error.URLError, OSError, ValueError, EOFError) as err:
        present = _present_files(name, root)
        if present and not isinstance(err, urllib.error.URLError):
            files = ", ".join(str(p) for p in present[:4])
            raise DataCorruptError(f"data set {name!r} is present but cannot be read ({type(err).__name__}: {err}); "
                                   f"files: {files}; delete them to download afresh") from None
        raise DataMissingError(_missing_message(name, root, err)) from None
    xs, ys = [], []
    for ds in (train, test):
        data = ds.data if isinstance(ds.data, np.ndarray) else ds.data.numpy()
        x = torch.as_tensor(np.ascontiguousarray(data))
        if x.dim() == 3:  # MNIST-like (N, 28, 28) -> (N, 1, 28, 28)
            x = x.unsqueeze(1)
        elif x.shape[-1] == 3:  # CIFAR (N, 32, 32, 3) -> (N, 3, 32, 32); SVHN is already (N, 3, 32, 32)
            x = x.permute(0, 3, 1, 2).contiguous()
        labels = getattr(ds, "targets", None)
        if labels is None:
            labels = ds.labels
        xs.append(x)
        ys.append(torch.as_tensor(np.asarray(labels), dtype=torch.long))
    classes = {"cifar100": 100}.get(name, 10)
    return DataSplits(name, xs[0], ys[0], xs[1], ys[1], source, classes)


def _stage_debian_fashion_mnist(root: Path) -> str | None:
    """Copy Debian's gzipped IDX files (package dataset-fashion-mnist) into torchvision's layout."""
    raw = root / "FashionMNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    marker = raw / "SOURCE"  # remembers that the files were staged from Debian's package
    if all((raw / n).exists() for n in names):
        return marker.read_text().strip() if marker.exists() else None
    if not all((DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in names):
        return None
    raw.mkdir(parents=True, exist_ok=True)
    source = f"debian:{DEBIAN_FASHION_MNIST} (package dataset-fashion-mnist)"
    # Several runs may stage at once (a joblib sweep's first jobs): every process writes its own
    # temporary files and renames them atomically, and the marker lands before any data file, so a
    # process that sees all four files never reads a partial one or a missing marker.
    atomic_write_text(marker, source + "\n")
    for n in names:
        tmp = raw / f".{n}.{os.getpid()}.tmp"
        with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(raw / n)
    return source


def _missing_message(name: str, root: Path, err: Exception) -> str:
    where = {
        "mnist": f"{root}/MNIST/raw/ (the four IDX files)",
        "fashion_mnist": f"{root}/FashionMNIST/raw/ (the four IDX files), or install Debian's dataset-fashion-mnist",
        "cifar10": f"{root}/cifar-10-batches-py/ (from cifar-10-python.tar.gz)",
        "cifar100": f"{root}/cifar-100-python/ (from cifar-100-python.tar.gz)",
        "svhn": f"{root}/train_32x32.mat and {root}/test_32x32.mat",
    }[name]
    urls = {
        "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "svhn": "http://ufldl.stanford.edu/housenumbers/",
    }[name]
    return (f"data set {name!r} not found and not downloadable ({type(err).__name__}: {err}). "
            f"Put it under {where}; download it from {urls} (dataset.download=true fetches it where the "
            f"network allows).")


# ----------------------------------------------------------------------------- MATLAB sets
MAT_FILES = {
    # name: (file, key, transpose, first n rows kept)
    "curves": ("digs3pts_1.mat", "bdata", False, None),
    "faces": ("newfaces_rot_single.mat", "newfaces_single", True, 103500),
}


def _mat(name: str, root: Path, download: bool, md5: str | None, split_seed: int) -> DataSplits:
    import scipy.io

    filename, key, transpose, keep = MAT_FILES[name]
    path = root / filename
    url = MARTENS_URL + filename
    if not path.exists() and download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            urllib.request.urlretrieve(url, tmp)
            tmp.replace(path)
        except (urllib.error.URLError, OSError):
            pass
    if not path.exists():
        raise DataMissingError(f"data file {filename} for {name!r} not found at {path} and not downloadable; "
                               f"download it from {url} and put it at {path}")
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if md5 and digest != md5:
        raise DataCorruptError(f"{path} has md5 {digest}, expected {md5}: the file is corrupted or a different version")
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError as err:
        raise DataCorruptError(f"{path} is a MATLAB v7.3 file, which scipy cannot read; re-save it as v7 ({err})") from None
    except (ValueError, TypeError, OSError, scipy.io.matlab.MatReadError) as err:
        raise DataCorruptError(f"{path} exists but is not a readable MATLAB file ({type(err).__name__}: {err}); "
                               f"delete it to download afresh from {url}") from None
    if key not in mat:
        raise DataCorruptError(f"{path} has no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
    data = np.asarray(mat[key], dtype=np.float32)
    if transpose:
        data = data.T
    if keep:
        data = data[:keep]
    x = torch.from_numpy(np.ascontiguousarray(data))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    n_train = int(round(0.8 * x.shape[0]))
    return DataSplits(name, x[perm[:n_train]], None, x[perm[n_train:]], None, f"file:{filename} md5={digest}",
                      notes={"md5": digest})


# ----------------------------------------------------------------------------- synthetic CURVES
def synthetic_curves(n: int, seed: int = 0, size: int = 28) -> torch.Tensor:
    """A stand-in for CURVES: smooth curves (quadratic Bezier through three random points) drawn on
    a size x size canvas with a Gaussian pen, intensities in [0, 1]; shape (n, size * size)."""
    gen = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, 2, generator=gen) * (size - 5) + 2
    t = torch.linspace(0, 1, 64).view(1, -1, 1)
    # Bezier whose curve passes through the middle point at t = 1/2
    control = 2 * pts[:, 1] - 0.5 * (pts[:, 0] + pts[:, 2])
    curve = (1 - t) ** 2 * pts[:, None, 0] + 2 * (1 - t) * t * control[:, None] + t**2 * pts[:, None, 2]
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).float().view(1, 1, -1, 2)
    images = []
    for chunk in curve.split(500):  # bounded memory: (500, 64, size*size) distances at a time
        dist2 = ((chunk.unsqueeze(2) - grid) ** 2).sum(-1).amin(1)
        images.append(torch.exp(-dist2 / 0.8).clamp(0, 1))
    return torch.cat(images)


def _synthetic(split_seed: int, n: int = 20000) -> DataSplits:
    x = synthetic_curves(n, seed=split_seed)
    n_train = int(0.8 * n)
    return DataSplits("curves_synthetic", x[:n_train], None, x[n_train:], None,
                      "SYNTHETIC stand-in for CURVES (not the paper's data)")


# ----------------------------------------------------------------------------- TKO toy problem
TKO_TRAIN, TKO_TEST, TKO_FEATURES = 25000, 2500, 10


def tko_toy(seed: int = 0, n_train: int = TKO_TRAIN, n_test: int = TKO_TEST,
            features: int = TKO_FEATURES) -> DataSplits:
    """The binary toy problem of Tselepidis, Kohler & Orvieto (2020), drawn as their train_toy.py
    draws it (docs/protocol.md, "convention=tko"): a bias-free linear teacher R^features -> R with
    Kaiming-uniform weights (fan-in, ReLU gain), X ~ N(0, I) from the same generator, labels
    1[sigmoid(teacher(X)) > 0.5]; the first ``n_train`` rows train, the rest test.

    ``seed`` is their --seed (the run's seed): teacher and data come from a generator seeded with
    seed + 1, as theirs. Their teacher is an nn.Linear, whose constructor draws PyTorch's default
    initialisation before their Kaiming re-initialisation; that first draw is made and discarded
    here so that the stream, hence the data, is theirs (tests/fixtures/tko_toy_*.json)."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    weight = torch.empty(1, features)
    weight.uniform_(generator=gen)  # the discarded constructor draw (same count of uniforms)
    torch.nn.init.kaiming_uniform_(weight, mode="fan_in", nonlinearity="relu", generator=gen)
    x = torch.randn(n_train + n_test, features, generator=gen)
    y = (torch.sigmoid(torch.nn.functional.linear(x, weight)) > 0.5).float()  # (N, 1), as their BCE targets
    return DataSplits("tko_toy", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                      f"generated: TKO toy problem, teacher and data seed {int(seed) + 1} (their --seed {int(seed)})",
                      num_classes=2)


DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "curves", "faces", "curves_synthetic", "tko_toy")


def load_dataset(name: str, root: str | Path = "data", download: bool = True, md5: str | None = None,
                 split_seed: int = 0, mnist_autoencoder_split: bool = False, num_samples: int = 20000) -> DataSplits:
    """Load ``name`` (one of ``DATASETS``) from ``root``.

    mnist_autoencoder_split: use MNIST's train set split 50000/10000 at random (the MNIST
    auto-encoder problem) instead of the standard train/test split.
    num_samples: size of the synthetic CURVES stand-in (20000 like CURVES).
    tko_toy: generated (``tko_toy``) with ``split_seed`` as their --seed (the run's seed).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    root = Path(root)
    if name in MAT_FILES:
        return _mat(name, root, download, md5, split_seed)
    if name == "curves_synthetic":
        return _synthetic(split_seed, num_samples)
    if name == "tko_toy":
        return tko_toy(split_seed)
    splits = _torchvision(name, root, download)
    if mnist_autoencoder_split:
        perm = torch.randperm(splits.x_train.shape[0], generator=torch.Generator().manual_seed(split_seed))
        x = splits.x_train[perm]
        y = splits.y_train[perm]
        n_train = round(x.shape[0] * 5 / 6)  # 50000 / 10000 on the real 60000 images
        splits = DataSplits(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], splits.source,
                            splits.num_classes)
    return splits
