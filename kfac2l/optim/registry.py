"""One registry of optimisers by name (the paper's legend names in lower case).

``make_optimizer(name, model, lr=..., damping=..., ...)`` returns an ``Optimizer``: a base
torch optimiser (SGD with momentum 0.9 and weight decay, or Adam) plus, for the natural-gradient
family, a preconditioner applied to the gradients before the base step. As in the paper's runs,
weight decay is added by the base optimiser after preconditioning and KL-clipping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kfac2l.names import TWO_LEVEL  # noqa: F401 (re-exported)
from kfac2l.optim.preconditioner import KFAC, CurvaturePreconditioner, ExactNGD, PreviousKFAC, TwoLevelKFAC


@dataclass(frozen=True)
class OptimizerSpec:
    """How a registry name is built: preconditioner class and its fixed options."""

    preconditioner: type | None
    fixed: dict = field(default_factory=dict)
    base: str = "sgd"


REGISTRY: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(None),
    "adam": OptimizerSpec(None, base="adam"),
    "kfac": OptimizerSpec(KFAC),
    "nico": OptimizerSpec(TwoLevelKFAC, {"coarse_space": "nicolaides"}),
    "spectral": OptimizerSpec(TwoLevelKFAC, {"coarse_space": "spectral"}),
    "residu": OptimizerSpec(TwoLevelKFAC, {"coarse_space": "residual"}),
    "kry-nico": OptimizerSpec(TwoLevelKFAC, {"coarse_space": "krylov-nicolaides"}),
    "kry-residu": OptimizerSpec(TwoLevelKFAC, {"coarse_space": "krylov-residual"}),
    "previous": OptimizerSpec(PreviousKFAC, {"coarse_space": "nicolaides", "correction": "additive"}),
    "taylor": OptimizerSpec(TwoLevelKFAC, {"coarse_space": "taylor"}),
    "ngd": OptimizerSpec(ExactNGD),
    # any registered coarse space, e.g. one of yours: make_optimizer("two-level", model, coarse_space="gradient")
    "two-level": OptimizerSpec(TwoLevelKFAC),
}

OPTIMIZERS = tuple(REGISTRY)

_COMMON = {"lr", "weight_decay", "momentum", "nesterov"}
_CURVATURE = {"damping", "kl_clip", "kl_clip_form", "diagnostics", "exact_reference", "reference_fisher_batch",
              "exclude", "warn_skipped"}
_KFAC = {"damping_mode", "ema_decay", "ema_count", "freeze_factors", "cov_interval", "inv_interval"}
_TWO_LEVEL = {"coarse_space", "correction", "coarse_scale", "taylor_order", "krylov_start", "coarse_options",
              "eigenbasis"}
_ADAM = {"lr", "weight_decay", "betas", "eps"}


def valid_options(name: str) -> set[str]:
    """The keyword options ``make_optimizer`` accepts for ``name``."""
    spec = _spec(name)
    if spec.base == "adam":
        return set(_ADAM)
    if spec.preconditioner is None:
        return set(_COMMON)
    opts = _COMMON | _CURVATURE
    if issubclass(spec.preconditioner, KFAC):
        opts |= _KFAC
    if issubclass(spec.preconditioner, TwoLevelKFAC):
        opts |= _TWO_LEVEL - set(spec.fixed)
    return opts


def _spec(name: str) -> OptimizerSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return REGISTRY[name]


class Optimizer:
    """A base torch optimiser with an optional curvature preconditioner in front of it.

    ``grad_scaler``: a ``torch.amp.GradScaler`` for float16 training (docs/mixed_precision.md);
    the loss must then be backpropagated as ``grad_scaler.scale(loss)`` (``training_step`` does).
    ``step`` unscales the gradients before preconditioning and KL-clipping, and a step whose
    gradients are not finite changes nothing: no base step, no curvature state change.
    """

    def __init__(self, name: str, base: torch.optim.Optimizer, preconditioner: CurvaturePreconditioner | None,
                 grad_scaler: torch.amp.GradScaler | None = None):
        self.name = name
        self.base = base
        self.preconditioner = preconditioner
        self.grad_scaler = grad_scaler

    @property
    def lr(self) -> float:
        return self.base.param_groups[0]["lr"]

    def needs_curvature(self) -> bool:
        """Whether this step needs a Fisher batch (``update_curvature``) before ``step``."""
        return self.preconditioner is not None and self.preconditioner.needs_curvature()

    def update_curvature(self, output, likelihood="categorical", targets=None, generator=None, batch=None) -> None:
        """The preconditioner's ``update_curvature`` (nothing for plain optimisers)."""
        if self.preconditioner is not None:
            self.preconditioner.update_curvature(output, likelihood, targets, generator, batch)

    @property
    def reference_fisher_batch(self) -> int | None:
        """Samples of the exact reference's own Fisher batch (``training_step`` draws it and hands it
        to ``update_reference``); None: the reference uses the optimiser's Fisher batch."""
        return getattr(self.preconditioner, "reference_fisher_batch", None)

    def update_reference(self, output, likelihood="categorical", targets=None, generator=None) -> None:
        """The preconditioner's ``update_reference`` (the exact reference's own Fisher batch)."""
        self.preconditioner.update_reference(output, likelihood, targets, generator)

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Precondition (if any) and take the base step; with ``grad_scaler`` see the class doc."""
        if self.grad_scaler is not None:
            return self._scaled_step(self.grad_scaler)
        if self.preconditioner is not None:
            self.preconditioner.lr = self.lr
            self.preconditioner.step()
        self.base.step()

    def _scaled_step(self, scaler: torch.amp.GradScaler) -> None:
        """unscale_, then precondition or ``skip`` by GradScaler's own test (a non-finite unscaled
        gradient), then ``scaler.step`` (which skips the base step on the same test) and ``update``.
        Reading the test is one host synchronisation: the one ``GradScaler.step`` makes anyway
        (torch/amp/grad_scaler.py ``_maybe_opt_step``), made a little earlier."""
        scaler.unscale_(self.base)
        if self.preconditioner is not None:
            if _all_finite(self.base):
                self.preconditioner.lr = self.lr
                self.preconditioner.step()
            else:
                self.preconditioner.skip()
        scaler.step(self.base)
        scaler.update()

    @property
    def diagnostics(self) -> dict[str, float]:
        return self.preconditioner.diagnostics if self.preconditioner is not None else {}

    def state_dict(self) -> dict:
        """Base optimiser and preconditioner state (for checkpoints; loads with weights_only=True)."""
        pre = self.preconditioner.state_dict() if self.preconditioner is not None else None
        state = {"name": self.name, "base": self.base.state_dict(), "preconditioner": pre}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"optimizer state is for {state.get('name')!r}, not {self.name!r}")
        self.base.load_state_dict(state["base"])
        if self.preconditioner is not None:
            self.preconditioner.load_state_dict(state["preconditioner"])
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])


def _all_finite(base: torch.optim.Optimizer) -> bool:
    """Whether every gradient of ``base``'s parameters is finite (after ``GradScaler.unscale_``:
    the test GradScaler applies; reading it synchronises with the device)."""
    grads = [p.grad for group in base.param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True


def make_optimizer(name: str, model: nn.Module, lr: float, reduce=None, **options) -> Optimizer:
    """Build the optimiser ``name`` (one of ``OPTIMIZERS``) for ``model``.

    Common options: weight_decay (1e-3), momentum (0.9) and nesterov (False), SGD-based only.
    Curvature options: damping (required), kl_clip, kl_clip_form, diagnostics, exact_reference,
    reference_fisher_batch, and for the KFAC family damping_mode, ema_decay, ema_count, freeze_factors, cov_interval,
    inv_interval; two-level: correction, coarse_scale, taylor_order, krylov_start, coarse_options
    (those a name fixes cannot be overridden); all curvature optimisers: exclude, warn_skipped.
    ``reduce``: data-parallel training (``kfac2l.distributed``), the preconditioner's sum over
    processes (``CurvaturePreconditioner``); ignored by optimisers without curvature.
    """
    spec = _spec(name)
    allowed = valid_options(name) - {"lr"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"option(s) {unknown} do not apply to optimizer {name!r}; valid options: {sorted(allowed)}"
        )
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be > 0")
    weight_decay = options.pop("weight_decay", 1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.base == "adam":
        base = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **options)
        return Optimizer(name, base, None)
    momentum = options.pop("momentum", 0.9)
    nesterov = bool(options.pop("nesterov", False))
    base = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if spec.preconditioner is None:
        return Optimizer(name, base, None)
    if "damping" not in options:
        raise ValueError(f"optimizer {name!r} needs a damping value (damping=...)")
    pre = spec.preconditioner(model, lr=lr, **spec.fixed, **options, **({"reduce": reduce} if reduce else {}))
    return Optimizer(name, base, pre)
