"""Preconditioners: KFAC, two-level KFAC and the exact regularised natural gradient.

A preconditioner is separate from the base optimiser. Each training step:

    out = model(x_fisher)                         # a forward pass with gradients enabled
    pre.update_curvature(out, likelihood=...)     # sampled targets, captures abar and g per layer
    loss = criterion(model(x), y); loss.backward()
    pre.step()                                    # .grad of Linear/Conv2d layers := step direction
    base_optimizer.step()                         # SGD with momentum / weight decay, lr

Other parameters (BatchNorm, ...) keep their plain gradient.
"""

from __future__ import annotations

import numbers
import warnings
from collections import Counter

import torch
from torch import nn

from kfac2l.curvature.basis import block_gram, prolong, restrict, restrict64
from kfac2l.curvature.coarse import CORRECTIONS, kronecker_coarse_operator, nicolaides_sums, solve_coarse
from kfac2l.curvature.exact import (
    gram_spectrum,
    natural_gradient,
    numerical_rank,
    rank_above_damping,
)
from kfac2l.curvature.fisher import (
    FisherShard,
    LayerGroup,
    capture_groups,
    coarse_operator,
    fisher_norm_sq,
    fisher_product_and_projections,
    kfac_residual,
    layered_dot,
    per_sample_projections,
    project,
)
from kfac2l.curvature.kronecker import DAMPING_MODES, DampedKronecker, DiagonalBlocks, FactorState, batch_factors
from kfac2l.curvature.layers import (
    ForwardCapture,
    check_untied,
    grad_matrix,
    preconditioned_layers,
    skipped_modules,
    write_grad_matrix,
)
from kfac2l.curvature.likelihood import LIKELIHOODS, sample_targets, summed_nll
from kfac2l.curvature.spaces import COARSE_SPACES, KRYLOV_STARTS, BasisContext, make_coarse_space

KL_CLIP_FORMS = ("unscaled", "lr_squared")
EIGENBASIS = ("auto", "always", "never")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _in_parameter_dtype(modules, per_module):
    """Captured activations / output gradients of an autocast pass (bfloat16, float16), one list
    of calls per module, cast to the dtype of their layer's weight, so that factors and Fisher
    products are formed in it."""
    return [[t if t is None or t.dtype == m.weight.dtype else t.to(m.weight.dtype) for t in calls]
            for m, calls in zip(modules, per_module)]


class UnpreconditionedWarning(UserWarning):
    """Modules with parameters that keep their plain gradient (not Linear/Conv2d, or excluded)."""


EMA_COUNTS = ("refreshes", "iterations")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {tuple(choices)}")


class CurvaturePreconditioner:
    """Common machinery: layer capture, the Fisher mini-batch, gradients in and out, KL-clipping.

    Args:
        model: the network; its nn.Linear and nn.Conv2d layers are preconditioned.
        damping: lambda of F_bullet = F + lambda I (2.17), > 0.
        lr: learning rate used by KL-clipping only (kept in sync by ``kfac2l.optim.Optimizer``).
        kl_clip: kappa; if set, the step zeta is scaled by nu (applied before the base optimiser's lr).
        kl_clip_form: 'unscaled' (default) nu = min(1, sqrt(kappa / sum_i |<zeta_i, grad_i>|)),
            the form of the authors' code (natural-gradients@97105b6 optimizers/kfac.py:136-146, which sums per
            parameter tensor, weight and bias apart), for which the protocol's kappa values were tuned;
            'lr_squared' nu = min(1, sqrt(kappa / (lr^2 |<zeta, grad>|))) (Martens & Grosse 2015,
            kfac-pytorch, e.g. KFAC-Pytorch@2ff652f optimizers/kfac.py:144-154), with the same kappa
            a much weaker clip at lr < 1.
        diagnostics: record the last step's diagnostics (see ``diagnostics``).
        exact_reference: with diagnostics, also compute the exact natural gradient on the Fisher
            batch and the true F_bullet-distances to it.
        reference_fisher_batch: with ``exact_reference``, the number of samples of a Fisher batch
            of the reference's own, given every step to ``update_reference`` (``training_step``
            draws it): the exact step, its metric (the distances, cosines and rank) come from that
            batch; the optimiser's step, and the gap (4.6), from the optimiser's Fisher batch as
            before. None (default): the reference uses the optimiser's Fisher batch.
        exclude: layers left out (module names as fnmatch patterns, or module types); they keep
            their plain gradient, like every module that is not Linear/Conv2d.
        warn_skipped: warn once (``UnpreconditionedWarning``) listing the modules with parameters
            that keep their plain gradient (also in ``skipped_modules``).
        reduce: data-parallel training (``kfac2l.distributed``): a callable that sums a tensor over
            the processes, in place, and returns it; every sum over the Fisher batch (Kronecker
            factors, Fisher-vector products, coarse operator and right-hand side) goes through it,
            and ``update_curvature`` is then told the size of the whole Fisher batch. None (default):
            one process, nothing communicated.
    """

    needs_factors = True

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        lr: float = 1.0,
        kl_clip: float | None = None,
        kl_clip_form: str = "unscaled",
        diagnostics: bool = False,
        exact_reference: bool = False,
        reference_fisher_batch: int | None = None,
        exclude=(),
        warn_skipped: bool = True,
        reduce=None,
    ):
        _check_choice("kl_clip_form", kl_clip_form, KL_CLIP_FORMS)
        if reduce is not None and exact_reference:
            raise ValueError("exact_reference=true needs the whole Fisher batch on one process; "
                             "valid: exact_reference=false with distributed training")
        _check_reference_batch(reference_fisher_batch, exact_reference)
        if not damping > 0:
            raise ValueError(f"damping={damping!r} must be > 0")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip={kl_clip!r} must be > 0 or None")
        self.model = model
        self.exclude = tuple(exclude)
        self.layers = preconditioned_layers(model, self.exclude)
        if not self.layers:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to precondition"
                             + (f" outside exclude={list(self.exclude)}" if self.exclude else ""))
        check_untied(model, self.layers)
        self.skipped_modules = skipped_modules(model, self.exclude)
        if self.skipped_modules and warn_skipped:
            counts = Counter(kind for _, kind in self.skipped_modules)
            warnings.warn(f"kfac2l: {len(self.skipped_modules)} module(s) with parameters keep their plain gradient "
                          f"({', '.join(f'{k} x{n}' for k, n in counts.items())}); see .skipped_modules",
                          UnpreconditionedWarning, stacklevel=3)
        self.modules = [m for _, m in self.layers]
        self.capture = ForwardCapture(self.modules, armed=self._capturing, root=model)
        self.damping = float(damping)
        self.lr = float(lr)
        self.kl_clip = kl_clip
        self.kl_clip_form = kl_clip_form
        self.track_diagnostics = bool(diagnostics or exact_reference)
        self.exact_reference = bool(exact_reference)
        self.reference_fisher_batch = None if reference_fisher_batch is None else int(reference_fisher_batch)
        self._reference_groups: list[LayerGroup] | None = None
        self._reference_step = -1
        self.reduce = reduce
        self.steps = 0
        self.groups: list[LayerGroup] | None = None
        self.group_indices: list[list[int]] | None = None  # layer grouping, kept across steps
        self._batch_step = -1
        self._uncommitted = False  # a Fisher batch taken but not yet folded into the state
        self._diag: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- Fisher batch
    def needs_curvature(self) -> bool:
        """Whether the coming ``step()`` needs ``update_curvature`` to have been called first."""
        return True

    def _wants_fisher_batch(self) -> bool:
        """Capture forward passes only while this step still needs its Fisher batch."""
        return self._batch_step != self.steps and self.needs_curvature()

    def _capturing(self) -> bool:
        """Capture while this step still needs its Fisher batch or its reference batch."""
        wants_reference = self.reference_fisher_batch is not None and self._reference_step != self.steps
        return wants_reference or self._wants_fisher_batch()

    def update_curvature(
        self,
        output: torch.Tensor,
        likelihood: str = "categorical",
        targets: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        batch: int | None = None,
    ) -> None:
        """Capture abar_i and g_i on the batch that produced ``output`` (eqs. 2.25-2.27, A2).

        Targets are sampled from the model's predictive distribution unless given; the summed
        negative log-likelihood is differentiated with respect to each layer's output. On a step
        that needs no curvature (``needs_curvature()`` is False, e.g. KFAC between two factor
        refreshes) this does nothing, so calling it every step costs no extra backward pass.
        With ``reduce`` (data-parallel training) ``output`` is this process's shard of the Fisher
        batch and ``batch`` the size of the whole batch.
        """
        _check_choice("likelihood", likelihood, LIKELIHOODS)
        if self._batch_step != self.steps and not self.needs_curvature():
            self.capture.clear()
            return
        with self._autocast_off():
            self._take_fisher_batch(output, likelihood, targets, generator, batch)

    def _take_fisher_batch(self, output, likelihood, targets, generator, batch) -> None:
        again = " (this step's Fisher batch was already taken)" if self._batch_step == self.steps else ""
        self.groups = self._captured_groups(output, likelihood, targets, generator, self._shard(batch),
                                            "update_curvature", again)
        self.group_indices = [list(g.indices) for g in self.groups]
        self._batch_step = self.steps
        self._uncommitted = True  # folded into the curvature state by step(), not by skip()

    def update_reference(
        self,
        output: torch.Tensor,
        likelihood: str = "categorical",
        targets: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """This step's reference batch (``reference_fisher_batch``): abar_i and g_i captured on the
        batch that produced ``output``, targets sampled from the model unless given, as in
        ``update_curvature``. ``step()`` computes the exact reference, the distances and cosines to
        it and its rank on this batch; it changes nothing else (the step uses the Fisher batch of
        ``update_curvature``). Call it before or after ``update_curvature``, each right after its own
        forward pass (each takes the latest captured pass)."""
        _check_choice("likelihood", likelihood, LIKELIHOODS)
        if self.reference_fisher_batch is None:
            raise RuntimeError("update_reference needs a preconditioner built with reference_fisher_batch=<samples> "
                               "(and exact_reference=True)")
        again = " (this step's reference batch was already taken)" if self._reference_step == self.steps else ""
        with self._autocast_off():
            self._reference_groups = self._captured_groups(output, likelihood, targets, generator, FisherShard(),
                                                           "update_reference", again)
        self._reference_step = self.steps

    def _captured_groups(self, output, likelihood, targets, generator, shard: FisherShard, caller: str, again: str):
        """Layer groups of the latest captured forward pass (which produced ``output``), with the
        output gradients of the summed negative log-likelihood of sampled (or given) targets."""
        outputs = self.capture.outputs
        missing = [name for (name, _), o in zip(self.layers, outputs) if o is None]
        if missing:
            raise RuntimeError(
                f"no forward pass with gradients enabled was captured for layer(s) {missing}{again}; "
                f"call {caller} on the output of model(x) computed under torch.enable_grad(); a layer whose "
                "weight is used functionally rather than called (e.g. nn.MultiheadAttention.out_proj) never is: "
                "leave it out with exclude=[name]"
            )
        self.capture.check_inputs([name for name, _ in self.layers])
        output = output.float() if output.dtype in LOW_PRECISION else output
        if targets is None:
            targets = sample_targets(output, likelihood, generator)
        nll = summed_nll(output, targets, likelihood)
        inputs = [xs[:] for xs in self.capture.inputs]  # as captured (a recomputing backward cannot add calls)
        calls = [out for layer in outputs for out in layer]  # a shared layer: one output per call
        flat = torch.autograd.grad(nll, calls, retain_graph=True, allow_unused=True)
        flat = iter([go if go is not None else torch.zeros_like(out) for out, go in zip(calls, flat)])
        grads = [[next(flat) for _ in xs] for xs in inputs]  # each call's own output gradient
        inputs, grads = _in_parameter_dtype(self.modules, inputs), _in_parameter_dtype(self.modules, grads)
        groups = capture_groups(self.modules, inputs, grads, shard)
        self.capture.clear()
        return groups

    def _autocast_off(self):
        """Full precision inside the preconditioner even when called under ``torch.autocast``."""
        return torch.autocast(self.modules[0].weight.device.type, enabled=False)

    def _shard(self, batch: int | None):
        """The part of the Fisher batch this process captured (all of it without ``reduce``)."""
        if self.reduce is None:
            return FisherShard(batch) if batch is not None else FisherShard()
        if batch is None:
            raise ValueError("a preconditioner with reduce= (distributed) needs batch= in update_curvature: "
                             "the size of the whole Fisher batch over all processes")
        return FisherShard(int(batch), self.reduce)

    def _on_fisher_batch(self) -> None:
        pass

    def _fresh_groups(self) -> list[LayerGroup]:
        if self.groups is None or self._batch_step != self.steps:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a Fisher batch from update_curvature() in the "
                "same step (it uses the Fisher-vector product)"
            )
        return self.groups

    # ----------------------------------------------------------------- gradients
    def _gather(self) -> list[torch.Tensor]:
        return [
            torch.stack([grad_matrix(self.modules[i]) for i in indices]).unsqueeze(1)
            for indices in self.group_indices
        ]

    def _scatter(self, zeta: list[torch.Tensor]) -> None:
        for indices, z in zip(self.group_indices, zeta):
            for row, i in enumerate(indices):
                write_grad_matrix(self.modules[i], z[row, 0])

    def _kl_clip(self, zeta: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scale zeta by nu (see ``kl_clip_form``); no host synchronisation."""
        if self.kl_clip is None:
            return zeta
        if self.kl_clip_form == "unscaled":
            per_layer = [(z * g).flatten(2).sum(-1).abs() for z, g in zip(zeta, grads)]
            vg = sum(v.sum() for v in per_layer)
            nu = torch.sqrt(self.kl_clip / vg).clamp(max=1.0)
        else:
            vg = layered_dot(zeta, grads).sum().abs()
            nu = torch.sqrt(self.kl_clip / (self.lr**2 * vg)).clamp(max=1.0)
        self._diag["kl_scale"] = nu.detach()
        self._diag["kl_product"] = vg.detach()
        return [z * nu for z in zeta]

    @torch.no_grad()
    def step(self) -> None:
        """Replace ``.grad`` of the preconditioned layers by the step direction zeta; this step's
        Fisher batch is folded into the curvature state here (see ``skip``). The gradients must
        be unscaled (``GradScaler.unscale_``, done by ``kfac2l.optim.Optimizer``)."""
        if self.group_indices is None:
            raise RuntimeError(f"call {type(self).__name__}.update_curvature() before the first step()")
        with self._autocast_off():
            self._step()

    def skip(self) -> None:
        """Give up this step (a GradScaler found inf/nan gradients): the Fisher batch is dropped and
        no curvature state (factors, counters, inverses) changes; the next step takes a new one."""
        self.capture.clear()
        self.groups, self._batch_step, self._uncommitted = None, -1, False
        self._reference_groups, self._reference_step = None, -1
        self._diag = {}

    def _commit_fisher_batch(self) -> None:
        """Fold this step's Fisher batch into the curvature state (once; see ``skip``)."""
        if self._uncommitted:
            self._uncommitted = False
            self._on_fisher_batch()

    def _step(self) -> None:
        self._commit_fisher_batch()
        self._diag = {}
        self.capture.clear()  # drop references to this step's layer outputs
        grads = self._gather()
        zeta = self._direction(grads)
        zeta = self._kl_clip(zeta, grads)
        self._scatter(zeta)
        self._reference_groups = None  # used by this step's diagnostics only
        self.steps += 1

    def _direction(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def diagnostic_tensors(self) -> dict[str, torch.Tensor]:
        """The last step's diagnostics as 0-dim tensors (no synchronisation)."""
        return dict(self._diag)

    @property
    def diagnostics(self) -> dict[str, float]:
        """The last step's diagnostics as floats (reading them synchronises with the device).

        gap: E(beta*) - E(0) of eq. (4.6) on the Fisher batch; with ``exact_reference``:
        dist_kfac, dist_two_level (true squared F_bullet-distances to zeta = F_bullet^{-1} grad),
        rel_dist_* (the same over ||zeta||^2_{F_bullet}), cos_kfac, cos_two_level (Euclidean cosine
        similarity to zeta), reference_rank (numerical rank of the reference batch's per-sample
        gradients J, ``kfac2l.curvature.exact.numerical_rank``), reference_rank_above_damping (the
        eigenvalues of its Fisher above lambda), coarse_solve_fallbacks; everything that compares
        with zeta on the reference batch of ``reference_fisher_batch`` when it is set (the gap stays
        on the optimiser's Fisher batch: then it is no longer dist_two_level - dist_kfac); with
        ``kl_clip`` (always recorded): kl_scale (nu) and kl_product (what the clip reads:
        sum_i |<zeta_i, g_i>| for the unscaled form, |<zeta, g>| for the lr^2 form, before the
        factor lr^2).
        """
        return {k: float(v) for k, v in self._diag.items()}

    def remove(self) -> None:
        """Remove the forward hooks."""
        self.capture.remove()

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The state a later step depends on (tensors, numbers, lists): with ``load_state_dict``
        into a freshly built preconditioner the following steps are bit-identical on CPU.
        A Fisher batch is never kept: a step that needs one takes it anew."""
        return {"steps": self.steps, "damping": self.damping, "lr": self.lr, "group_indices": self.group_indices}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.damping, self.lr = int(state["steps"]), float(state["damping"]), float(state["lr"])
        self.group_indices = state["group_indices"]
        self.groups, self._batch_step, self._uncommitted = None, -1, False
        self._reference_groups, self._reference_step = None, -1

    def _reference_batch(self, groups: list[LayerGroup]) -> list[LayerGroup]:
        """The groups the exact reference is computed on: this step's reference batch with
        ``reference_fisher_batch``, else the optimiser's Fisher batch ``groups``."""
        if self.reference_fisher_batch is None:
            return groups
        if self._reference_groups is None or self._reference_step != self.steps:
            raise RuntimeError(f"reference_fisher_batch={self.reference_fisher_batch}: step() needs this step's "
                               "reference batch from update_reference() (training_step draws it)")
        return self._reference_groups

    def _record_exact(self, groups, grads, candidates: dict[str, list[torch.Tensor]]) -> None:
        """Distances and cosines of the candidate steps to zeta = F_bullet^{-1} grad, all in the
        metric of the reference batch (``_reference_batch``), and that batch's rank."""
        groups = self._reference_batch(groups)
        spectrum = gram_spectrum(groups)
        zeta = natural_gradient(groups, grads, self.damping, spectrum)
        self._diag["reference_rank"] = numerical_rank(spectrum[0], grads[0].dtype)
        self._diag["reference_rank_above_damping"] = rank_above_damping(spectrum[0], self.damping)
        ref = fisher_norm_sq(groups, zeta, self.damping).sum()
        ref_norm = layered_dot(zeta, zeta).sum().sqrt()
        for name, z in candidates.items():
            diff = [x - y for x, y in zip(z, zeta)]
            dist = fisher_norm_sq(groups, diff, self.damping).sum()
            self._diag[f"dist_{name}"] = dist
            self._diag[f"rel_dist_{name}"] = dist / ref
            cos = layered_dot(z, zeta).sum() / (layered_dot(z, z).sum().sqrt() * ref_norm)
            self._diag[f"cos_{name}"] = cos


def _check_reference_batch(size, exact_reference: bool) -> None:
    """ValueError (one line) unless ``reference_fisher_batch`` is None or an integer >= 1 with
    ``exact_reference``."""
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"reference_fisher_batch={size!r} is not valid; choose an integer >= 1 (samples of the exact "
                         "reference's own Fisher batch) or None (the optimiser's Fisher batch)")
    if not exact_reference:
        raise ValueError(f"reference_fisher_batch={size!r} applies to the exact reference only; valid: "
                         "exact_reference=True with it, or reference_fisher_batch=None")


class KFAC(CurvaturePreconditioner):
    """KFAC (eqs. 2.25-2.31): zeta_KFAC = F_bullet KFAC^{-1} grad, layer by layer.

    Args (besides those of ``CurvaturePreconditioner``):
        damping_mode: 'pi' (eq. 2.30, default), 'factor' (lambda added to each factor, as the
            authors' two-level code did, natural-gradients@97105b6 optimizers/twolevel_kfac.py:128-132),
            'exact' ((A (x) G + lambda I)^{-1} in the eigenbasis)
            or 'unit_pi' (sqrt(lambda / T) added to each factor, the authors' KFAC baseline,
            natural-gradients@97105b6 optimizers/kfac.py:357-388).
        ema_decay: moving-average weight cap; rho = min(1 - 1/k, ema_decay).
        ema_count: what k counts: 'refreshes' (default; the running average of the factor
            estimates) or 'iterations' (the step counter at the refresh, as the authors' code,
            natural-gradients@97105b6 optimizers/twolevel_kfac.py:517).
        freeze_factors: keep the factors of the first Fisher batch forever (the authors' KFAC
            baseline in effect, docs/protocol.md; an ablation, never a default).
        cov_interval: T_cov, refresh the factors every this many steps (1 in the library,
            100 in the paper's runs).
        inv_interval: T_inv, recompute the damped inverses every this many steps.
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        damping_mode: str = "pi",
        ema_decay: float = 0.95,
        cov_interval: int = 1,
        inv_interval: int = 1,
        ema_count: str = "refreshes",
        freeze_factors: bool = False,
        **kwargs,
    ):
        _check_choice("damping_mode", damping_mode, DAMPING_MODES)
        _check_choice("ema_count", ema_count, EMA_COUNTS)
        for name, value in (("cov_interval", cov_interval), ("inv_interval", inv_interval)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        super().__init__(model, damping=damping, **kwargs)
        self.damping_mode = damping_mode
        self.ema_decay = ema_decay
        self.cov_interval = int(cov_interval)
        self.inv_interval = int(inv_interval)
        self.ema_count = ema_count
        self.freeze_factors = bool(freeze_factors)
        self.factors: list[FactorState] | None = None
        self.kron: list[DampedKronecker] | None = None
        self._group_key = None
        self._kron_damping = None
        self.eigh_retries = 0   # eigendecompositions that converged only with a diagonal jitter
        self.eigh_failures = 0  # group inverses kept from the previous refresh after a failed eigh

    def _factors_due(self) -> bool:
        if self.factors is None:
            return True
        return not self.freeze_factors and self.steps % self.cov_interval == 0

    def needs_curvature(self) -> bool:
        return self._factors_due() or self.exact_reference  # the exact reference needs this step's Fisher batch

    def _on_fisher_batch(self) -> None:
        key = tuple(tuple(g.indices) for g in self.groups)
        if key != self._group_key:
            self.factors, self.kron, self._group_key = None, None, key
        if not self._factors_due():
            return
        if self.factors is None:
            self.factors = [FactorState(self.ema_decay) for _ in self.groups]
        count = self.steps + 1 if self.ema_count == "iterations" else None
        for state, grp in zip(self.factors, self.groups):
            state.update(*batch_factors(grp.a, grp.g, grp.total, self.reduce), count=count, locations=grp.locations)
        self._on_factor_update()

    def _ema_weight(self) -> float:
        """rho of the refresh just made (the same k as ``FactorState``), for other averages."""
        k = self.steps + 1 if self.ema_count == "iterations" else self.factors[0].updates
        return min(1.0 - 1.0 / k, self.ema_decay)

    def _on_factor_update(self) -> None:
        pass

    @property
    def kronecker_solves(self) -> int:
        """Dense applications of F_bullet KFAC^{-1} (two GEMMs per layer, O I (O + I) each) per
        step between inverse refreshes; the arithmetic floor of a step's extra cost over SGD."""
        return 1

    def _inverses(self) -> list[DampedKronecker]:
        self._commit_fisher_batch()
        due = self.steps % self.inv_interval == 0 or self.kron is None or self._kron_damping != self.damping
        if due:
            previous = self.kron if self.kron is not None and len(self.kron) == len(self.factors) else None
            kron, retries, kept = [], 0, 0
            for i, f in enumerate(self.factors):
                try:
                    k = DampedKronecker(f.A, f.G, self.damping, self.damping_mode, f.locations)
                    retries += k.eigh_retries
                except torch.linalg.LinAlgError:
                    if previous is None:  # nothing to fall back on: a numerical failure of the run
                        raise
                    k, kept = previous[i], kept + 1  # keep this group's previous inverses
                kron.append(k)
            self.kron = kron
            self._kron_damping = self.damping
            self.eigh_retries += retries
            self.eigh_failures += kept
        if self.track_diagnostics:
            self._diag["eigh_retries"] = torch.tensor(float(self.eigh_retries))
            self._diag["eigh_failures"] = torch.tensor(float(self.eigh_failures))
        return self.kron

    def _direction(self, grads):
        kron = self._inverses()
        zeta = [k.apply_inverse(g) for k, g in zip(kron, grads)]
        if self.exact_reference:
            self._record_exact(self._fresh_groups(), grads, {"kfac": zeta})
        return zeta


    def state_dict(self) -> dict:
        state = super().state_dict()
        state["factors"] = None if self.factors is None else [f.state_dict() for f in self.factors]
        state["kron"] = None if self.kron is None else [k.state_dict() for k in self.kron]
        state["kron_damping"] = self._kron_damping
        state["eigh"] = [self.eigh_retries, self.eigh_failures]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.factors = None
        if state["factors"] is not None:
            self.factors = [FactorState(self.ema_decay) for _ in state["factors"]]
            for f, fs in zip(self.factors, state["factors"]):
                f.load_state_dict(fs)
        self.kron = None if state["kron"] is None else [DampedKronecker.from_state_dict(k) for k in state["kron"]]
        self._kron_damping = state["kron_damping"]
        self.eigh_retries, self.eigh_failures = state.get("eigh", [0, 0])
        indices = self.group_indices
        self._group_key = None if indices is None else tuple(tuple(i) for i in indices)


def _rotate_rows(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x (L, B, T, n) times q (L, n, n) as one batched GEMM per layer (no broadcast copies)."""
    L, B, T, n = x.shape
    return torch.matmul(x.reshape(L, B * T, n), q).reshape(L, B, T, n)


def _column_scales(gram: torch.Tensor) -> torch.Tensor:
    """1 / ||V[:, j]|| from the block Gram's diagonal (float64; zero columns keep scale 1, as
    ``normalize_columns`` leaves them zero)."""
    norms = torch.diagonal(gram).double().clamp_min(0).sqrt()
    return torch.where(norms > 1e-30, norms, torch.ones_like(norms)).reciprocal()


class Frame:
    """The coordinates a two-level step is computed in, group by group: the Kronecker eigenbasis
    of the damped blocks (``rotate[i]``; K^{-1} is then a product with 1/D, ``DiagonalBlocks``) or the
    original ones. Per-sample vectors of rotated groups are rotated once, on first use."""

    def __init__(self, kron, rotate: list[bool], groups):
        self.kron, self.rotate = kron, rotate
        self.ops = [DiagonalBlocks(k.eigen_reciprocal()) if r else k for k, r in zip(kron, rotate)]
        self._source, self._groups = groups, None

    @property
    def groups(self) -> list[LayerGroup]:
        if self._groups is None:
            self._groups = [
                LayerGroup(g.indices, _rotate_rows(g.a, k.QA), _rotate_rows(g.g, k.QG), g.shard) if r else g
                for g, k, r in zip(self._source(), self.kron, self.rotate)
            ]
        return self._groups

    def into(self, u: list[torch.Tensor]) -> list[torch.Tensor]:
        return [k.rotate_in(x) if r else x for k, x, r in zip(self.kron, u, self.rotate)]

    def out(self, u: list[torch.Tensor]) -> list[torch.Tensor]:
        return [k.rotate_out(x) if r else x for k, x, r in zip(self.kron, u, self.rotate)]


class TwoLevelKFAC(KFAC):
    """Two-level KFAC: zeta_2L = zeta_KFAC + c R0^T beta (eqs. 3.9-3.15, 4.7).

    Args (besides those of ``KFAC``):
        coarse_space: a name registered in ``kfac2l.curvature.spaces`` (nicolaides, spectral,
            residual, krylov-nicolaides, krylov-residual, taylor, full, or one of yours).
        correction: 'multiplicative' (beta* = F_coarse^{-1} R0 r_KFAC, eq. 3.11, the paper's
            method) or 'additive' (beta = F_coarse^{-1} R0 grad, eq. 4.7b).
        coarse_scale: c, scale of the correction (1 = the paper's method).
        taylor_order, krylov_start: options of the taylor and krylov-residual spaces (ignored by
            the others); ``coarse_options``: options of any other space.
        eigenbasis: where a per-step space (residual, Krylov, Taylor) is computed for a group of
            Linear layers on 2-D inputs: in the Kronecker eigenbasis of its damped blocks, where
            K^{-1} is a division (the gradient rotated in once, the per-sample vectors rotated, the
            step rotated out once: two dense passes for any polynomial order and damping mode);
            'auto' (default) when the per-sample rotations, B (O^2 + I^2), cost less than the
            dense passes they save, 'always', or 'never'. The step is the same either way.

    The coarse operator F_coarse = R0 F_bullet R0^T (3.12) and the residual are computed every
    step from the Fisher batch of that step, so the two are always consistent (unlike the authors'
    code, natural-gradients@97105b6 optimizers/twolevel_kfac.py:255-278, whose operator is averaged over
    time, rebuilt every 100 steps, from a Fisher batch up to 99 steps old). PREVIOUS, with its Kronecker
    coarse operator, is ``PreviousKFAC``.
    """

    def __init__(
        self,
        model: nn.Module,
        coarse_space: str = "residual",
        correction: str = "multiplicative",
        coarse_scale: float = 1.0,
        taylor_order: int = 2,
        krylov_start: str = "preconditioned",
        coarse_options: dict | None = None,
        eigenbasis: str = "auto",
        **kwargs,
    ):
        _check_choice("coarse_space", coarse_space, tuple(COARSE_SPACES))
        _check_choice("eigenbasis", eigenbasis, EIGENBASIS)
        _check_choice("correction", correction, CORRECTIONS)
        generic = {"taylor_order": taylor_order, "krylov_start": krylov_start}
        accepted = COARSE_SPACES[coarse_space].options
        space_options = {k: v for k, v in generic.items() if k in accepted}
        space_options.update(coarse_options or {})
        if int(taylor_order) != taylor_order or taylor_order < 1:
            raise ValueError(f"taylor_order={taylor_order!r} must be a positive integer")
        _check_choice("krylov_start", krylov_start, KRYLOV_STARTS)
        self.space = make_coarse_space(coarse_space, **space_options)
        super().__init__(model, **kwargs)
        self.coarse_space = coarse_space
        self.correction = correction
        self.coarse_scale = float(coarse_scale)
        self.taylor_order = int(taylor_order)
        self.krylov_start = krylov_start
        self.eigenbasis = eigenbasis
        self.last_basis = None  # the coarse basis of the last step (for checks; a reference, no copy;
        # per-step spaces: the columns as built, not normalised)
        self._static, self._static_for = None, None

    @property
    def kronecker_solves(self) -> int:
        """Dense passes (two GEMMs per layer each) per step: K^{-1} grad plus what the coarse space
        needs (``CoarseSpace.kronecker_solves``: none for static bases, cached between refreshes;
        1 for residual, 3.32; 2 for krylov-residual, 3.29; q for taylor, 3.38), or 2 (rotate in,
        rotate out) for the groups computed in the eigenbasis (see ``eigenbasis``)."""
        dense = 1 + self.space.kronecker_solves()
        rotated = getattr(self, "_rotated", None)
        if rotated and any(rotated):  # eigenbasis: rotate in + rotate out
            return max(2 if r else dense for r in rotated)
        return dense

    def needs_curvature(self) -> bool:
        return True  # F_coarse and r_KFAC come from this step's Fisher batch

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._static, self._static_for = None, None  # rebuilt from the restored inverses

    @staticmethod
    def _shapes(grads):
        return [(g.shape[0], g.shape[2], g.shape[3]) for g in grads]

    def _static_basis(self, kron, grads):
        """A static space's basis and block Gram, cached until the inverses change."""
        if self._static_for is not kron:
            basis = self.space.basis(BasisContext(kron, self._shapes(grads), grads[0]))
            self._static, self._static_for = (basis, block_gram(basis)), kron
        return self._static

    def _direction(self, grads):
        """zeta_KFAC = K^{-1} g (2.29); the coarse system (R0^T, F_coarse, right-hand side) of
        ``_coarse_system``; beta = F_coarse^{-1} rhs by Cholesky (3.11 / 4.7b); zeta_KFAC + c R0^T beta
        (3.9). Everything runs in the coordinates of ``_frame`` (the eigenbasis of the damped blocks
        for the groups where that saves dense passes) and is rotated back at the end."""
        frame = self._frame(self._inverses(), grads)
        g = frame.into(grads)
        zeta_kfac = [op.apply_inverse(x) for op, x in zip(frame.ops, g)]
        basis, op, rhs, residual, scale = self._coarse_system(frame, g, zeta_kfac)
        beta, failed = solve_coarse(op, rhs, column_scale=scale)
        beta = self.coarse_scale * beta
        zeta = [z + c for z, c in zip(zeta_kfac, prolong(basis, beta))]
        self.last_basis = basis
        if self.track_diagnostics:
            self._record_gap(frame.groups, g, zeta_kfac, basis, beta, op, residual)
            self._diag["coarse_solve_fallbacks"] = failed
            if self.exact_reference:
                candidates = {"kfac": frame.out(zeta_kfac), "two_level": frame.out(zeta)}
                self._record_exact(self._fresh_groups(), grads, candidates)
        return frame.out(zeta)

    def _frame(self, kron, grads) -> "Frame":
        if self.space.static or self.eigenbasis == "never":
            return Frame(kron, [False] * len(kron), self._fresh_groups)
        saved = self.space.kronecker_solves() - 1  # dense passes the eigenbasis saves (residual: none)
        groups = self._fresh_groups()
        rotate = []
        for grp in groups:
            linear = type(grp) is LayerGroup and grp.locations == 1
            O, I = grp.shape
            cheap = grp.total * (O * O + I * I) < saved * O * I * (O + I)  # alike on every process
            rotate.append(linear and (self.eigenbasis == "always" or cheap))
        self._rotated = rotate
        return Frame(kron, rotate, lambda: groups)

    def _coarse_system(self, frame: "Frame", grads, zeta_kfac):
        """(R0^T, F_coarse = R0 F_bullet R0^T, rhs, r_KFAC or None, column scales or None) with
        rhs = R0 r_KFAC (multiplicative) or R0 g (additive), everything from this step's Fisher
        batch, in the frame's coordinates. The scales 1/||V[:, j]|| (per-step spaces, whose
        columns are not normalised) turn the system into that of the unit columns."""
        groups = frame.groups
        lam = self.damping
        if self.space.static:  # R0 r from the per-sample projections P, without forming r
            basis, gram = self._static_basis(frame.kron, grads)
            proj = per_sample_projections(groups, basis)
            op = coarse_operator(groups, basis, lam, projections=proj, gram=gram)
            rhs = restrict64(basis, grads)
            if self.correction == "multiplicative":
                # R0 F_bullet zeta_KFAC = (1/B) P^T J^T zeta_KFAC + lambda R0 zeta_KFAC (A3, A15).
                # Assembled in float64: where KFAC is accurate on the coarse space the terms cancel,
                # and their float32 rounding would be all that is left of R0 r.
                v = sum(project(grp, z).sum(0).double() for grp, z in zip(groups, zeta_kfac))[0]
                pv = groups[0].reduce(proj.double().T @ v)  # a sum over the Fisher batch
                rhs = rhs - pv / groups[0].total - lam * restrict64(basis, zeta_kfac)
            return basis, op, rhs, None, None
        # residual spaces: rebuilt every step from r_KFAC = g - F_bullet zeta_KFAC
        residual = kfac_residual(groups, grads, zeta_kfac, lam)
        ctx = BasisContext(frame.ops, self._shapes(grads), grads[0], grad=grads, residual=residual,
                           fisher_projected=lambda u, scale=1.0: fisher_product_and_projections(groups, u, lam, scale))
        # The columns are used as built: unit-normalising them (what ``CoarseSpace.basis`` does)
        # is done on the small system instead, with their norms from the block Gram's diagonal
        # (``_column_scales``): the same step, without two passes over the basis.
        basis = self.space.build(ctx)
        gram = block_gram(basis)
        proj = per_sample_projections(groups, basis, known=ctx.known_projections)
        op = coarse_operator(groups, basis, lam, projections=proj, gram=gram)
        rhs = restrict(basis, residual if self.correction == "multiplicative" else grads).double()
        return basis, op, rhs, residual, _column_scales(gram)

    def _record_gap(self, groups, grads, zeta_kfac, basis, beta, op, residual) -> None:
        """E(beta) - E(0) = <F_coarse beta, beta> - 2 <R0^T beta, r_KFAC> (eq. 4.6), with the exact
        F_coarse of the Fisher batch (``op`` must be it; PREVIOUS passes the exact one here); in
        the coordinates of ``groups`` (the quantity is invariant under the frame's rotations)."""
        if residual is None:
            residual = kfac_residual(groups, grads, zeta_kfac, self.damping)
        self._diag["gap"] = beta @ op @ beta - 2 * (restrict(basis, residual).double() @ beta)


class PreviousKFAC(TwoLevelKFAC):
    """PREVIOUS, Tselepidis, Kohler & Orvieto (2020): the Nicolaides space with the cross-layer
    Kronecker approximation of the coarse operator (eq. 3.18) and, by default, the additive
    correction beta = Fbar_coarse^{-1} R0 g (4.7b).

    Off-diagonal entries E[1^T abar_i abar_j^T 1] E[1^T g_i g_j^T 1] are averaged over refreshes
    like the KFAC factors (convolutions: ``kfac2l.curvature.coarse.nicolaides_sums``); the
    diagonal is 1^T [F_bullet KFAC]_{i,i} 1. Between refreshes no Fisher batch is needed. The gap
    diagnostic (4.6) still uses the exact operator of the Fisher batch.
    """

    def __init__(self, model: nn.Module, coarse_space: str = "nicolaides", correction: str = "additive", **kwargs):
        if coarse_space != "nicolaides":
            raise ValueError(f"the Kronecker coarse operator of PREVIOUS (eq. 3.18) is defined for "
                             f"coarse_space='nicolaides' only, not {coarse_space!r}")
        super().__init__(model, coarse_space=coarse_space, correction=correction, **kwargs)
        self._cross = None

    def needs_curvature(self) -> bool:
        if self.track_diagnostics or self.correction == "multiplicative":  # r_KFAC needs F_bullet
            return True
        return KFAC.needs_curvature(self)

    def _on_factor_update(self) -> None:
        sums = [nicolaides_sums(grp.a, grp.g) for grp in self.groups]
        alpha = torch.cat([s[0] for s in sums])  # (m, B)
        gamma = torch.cat([s[1] for s in sums])
        first = self.groups[0]
        batch = first.total
        cross_a = (first.reduce(alpha @ alpha.T) / batch).double()
        cross_g = (first.reduce(gamma @ gamma.T) / batch).double()
        if self._cross is None:
            self._cross = [cross_a, cross_g]
        else:
            rho = self._ema_weight()
            for old, new in zip(self._cross, (cross_a, cross_g)):
                old.mul_(rho).add_(new, alpha=1.0 - rho)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["cross"] = self._cross  # the averaged cross-layer Kronecker terms (3.18)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._cross = state["cross"]

    def _static_basis(self, kron, grads):
        """Besides the basis: the diagonal 1^T [F_bullet KFAC]_{i,i} 1 (3.18b) and the column
        scales 1/sqrt(p_i) (columns are unit-normalised ones), cached until the inverses change."""
        if self._static_for is not kron:
            basis = self.space.basis(BasisContext(kron, self._shapes(grads), grads[0]))
            diagonal = torch.cat([k.ones_sum() for k in kron]).double()
            sizes = torch.cat([torch.full((L,), float(O * I)) for L, O, I in self._shapes(grads)])
            scale = sizes.to(diagonal.device, diagonal.dtype).rsqrt()
            self._static, self._static_for = (basis, diagonal, scale), kron
        return self._static

    def _coarse_system(self, frame, grads, zeta_kfac):
        basis, diagonal, scale = self._static_basis(frame.kron, grads)
        op = kronecker_coarse_operator(*self._cross, diagonal) * scale[:, None] * scale[None, :]
        if self.correction == "multiplicative":
            groups = self._fresh_groups()
            residual = kfac_residual(groups, grads, zeta_kfac, self.damping)
            return basis, op, restrict(basis, residual).double(), residual, None
        return basis, op, restrict(basis, grads).double(), None, None

    def _record_gap(self, groups, grads, zeta_kfac, basis, beta, op, residual) -> None:
        """The gap (4.6) at the beta this step takes (Kronecker coarse operator, 3.18), and, as
        ``gap_exact_operator``, at the paper's beta_TKO = (R0 F_bullet R0^T)^{-1} R0 g (4.7b): the
        quantity of the paper's Figure 5 for TKO. Both with the exact operator of the Fisher batch."""
        exact = coarse_operator(groups, basis, self.damping)
        if residual is None:
            residual = kfac_residual(groups, grads, zeta_kfac, self.damping)
        super()._record_gap(groups, grads, zeta_kfac, basis, beta, exact, residual)
        beta_tko, _ = solve_coarse(exact, restrict(basis, grads).double())
        self._diag["gap_exact_operator"] = (beta_tko @ exact @ beta_tko
                                            - 2 * (restrict(basis, residual).double() @ beta_tko))


class ExactNGD(CurvaturePreconditioner):
    """The exact regularised natural gradient zeta = F_bullet^{-1} grad (3.2) on the Fisher batch,
    through the Woodbury identity on the B x B Gram matrix of per-sample gradients."""

    def __init__(self, model: nn.Module, reduce=None, **kwargs):
        if kwargs.get("reference_fisher_batch") is not None:
            raise ValueError(f"reference_fisher_batch={kwargs['reference_fisher_batch']!r} does not apply to optimizer "
                             "'ngd' (its step is the exact natural gradient); valid: reference_fisher_batch=None")
        if reduce is not None:
            raise ValueError("optimizer 'ngd' (Woodbury on the B x B Gram matrix) needs the whole Fisher batch on one "
                             "process; valid: a KFAC-family optimiser with distributed training")
        super().__init__(model, **kwargs)

    def _direction(self, grads):
        return natural_gradient(self._fresh_groups(), grads, self.damping)
