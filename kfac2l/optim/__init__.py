"""Optimisers and preconditioners built from ``kfac2l.curvature``."""

from kfac2l.optim.preconditioner import KFAC, CurvaturePreconditioner, ExactNGD, PreviousKFAC, TwoLevelKFAC
from kfac2l.optim.registry import OPTIMIZERS, REGISTRY, TWO_LEVEL, Optimizer, make_optimizer, valid_options

__all__ = [
    "KFAC",
    "TwoLevelKFAC",
    "PreviousKFAC",
    "ExactNGD",
    "CurvaturePreconditioner",
    "Optimizer",
    "make_optimizer",
    "valid_options",
    "OPTIMIZERS",
    "REGISTRY",
    "TWO_LEVEL",
]
