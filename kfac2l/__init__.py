"""kfac2l: KFAC and two-level KFAC natural-gradient methods (Koroko et al.), with references."""

from importlib.metadata import PackageNotFoundError, version

from kfac2l.curvature.spaces import CoarseSpace, register_coarse_space
from kfac2l.optim import KFAC, OPTIMIZERS, ExactNGD, PreviousKFAC, TwoLevelKFAC, make_optimizer

try:  # one place: pyproject.toml
    __version__ = version("kfac2l")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["KFAC", "TwoLevelKFAC", "PreviousKFAC", "ExactNGD", "make_optimizer", "OPTIMIZERS", "CoarseSpace",
           "register_coarse_space", "__version__"]
