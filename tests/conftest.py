import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


import pytest  # noqa: E402
from fixtures import write_all  # noqa: E402


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Small data files in the real formats (tests/fixtures.py), written once per session."""
    root = tmp_path_factory.mktemp("data")
    write_all(root)
    return root
