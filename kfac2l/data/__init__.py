"""Data sets of the paper by name: torchvision image sets, CURVES and FACES (MATLAB files), and an
explicitly requested synthetic CURVES stand-in.

``load_dataset(name, root, ...)`` returns a ``DataSplits`` of in-memory tensors (inputs scaled to
[0, 1], no normalisation, no augmentation, as in docs/protocol.md) plus where the data came from.
When a file is missing and cannot be downloaded, ``DataMissingError`` names the file, where to put
it and the URL, before any training starts.
"""

from __future__ import annotations

from kfac2l.data.core import DATASETS, DataCorruptError, DataMissingError, DataSplits, TensorBatches, load_dataset

__all__ = ["DATASETS", "DataCorruptError", "DataMissingError", "DataSplits", "TensorBatches", "load_dataset"]
