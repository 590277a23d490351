"""kfac2l: KFAC and two-level KFAC natural-gradient methods (Koroko et al.), with references."""

from kfac2l.optim import KFAC, OPTIMIZERS, ExactNGD, TwoLevelKFAC, make_optimizer

__version__ = "0.1.0"
__all__ = ["KFAC", "TwoLevelKFAC", "ExactNGD", "make_optimizer", "OPTIMIZERS", "__version__"]
