"""kfac2l: KFAC and two-level KFAC natural-gradient methods (Koroko et al.), with references."""

from importlib.metadata import PackageNotFoundError, version

from kfac2l.optim import KFAC, OPTIMIZERS, ExactNGD, TwoLevelKFAC, make_optimizer

try:  # one place: pyproject.toml
    __version__ = version("kfac2l")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["KFAC", "TwoLevelKFAC", "ExactNGD", "make_optimizer", "OPTIMIZERS", "__version__"]
