"""Coarse spaces, one class each, registered by name: the extension point of two-level KFAC.

A coarse space says what its block-diagonal basis R0^T (eq. 3.21) needs and how to build it:

* ``static``: built from the damped KFAC blocks only (cached until the inverses change), or per
  step from the KFAC residual r_KFAC = g - F_bullet zeta_KFAC;
* ``kronecker_solves(options)``: dense applications of F_bullet KFAC^{-1} a step costs besides
  zeta_KFAC = K^{-1} g (the arithmetic floor of its step time; K = F_bullet KFAC);
* ``build(ctx)``: the basis per layer group, a tensor (L, m, O, I) or ``RankOne`` factors (the
  framework normalises the columns: the span, hence the step, is unchanged);
* ``explicit(ctx)``: the same columns built densely from the definition, for one layer, from
  explicit matrices (the oracle of ``kfac2l.verify`` and the tests). A space without it is still
  verified: the dense check then takes its columns from ``build``.

Adding a space is one class and ``@register_coarse_space`` (see ``docs/extending.md``); the
preconditioner, ``make_optimizer(..., coarse_space=name)``, ``kfac2l.verify`` and the tests pick
it up by name.

Built in (K = F_bullet KFAC, K_i its diagonal block):
  nicolaides         V_i = 1                                          (3.23-3.24)
  spectral           eigenvector of the smallest eigenvalue of K_i    (3.25-3.28)
  residual           V_i = K_i^{-1} r_KFAC[i]                          (3.32)
  krylov-nicolaides  V_i = [1, K_i^{-1} 1]                            (3.29-3.30, m_i = 2)
  krylov-residual    V_i = [v_i, K_i^{-1} v_i], v_i = K_i^{-1} r[i] (``krylov_start=
                     'preconditioned'``, the residual space is then contained) or r[i] ('raw')
  taylor             V_i = [w_1[i], ..., w_q[i]], w_1 = K^{-1} r, w_{j+1} = K^{-1} F_bullet w_j
                     (3.36-3.38; q = 1 is the residual space)
  full               every coordinate (m = p): the two-level step is the exact natural gradient
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from kfac2l.curvature.basis import Basis, RankOne, normalize_columns
from kfac2l.curvature.kronecker import DampedKronecker

Layered = list[torch.Tensor]
KRYLOV_STARTS = ("preconditioned", "raw")


@dataclass
class BasisContext:
    """What ``CoarseSpace.build`` may use. ``shapes``: (L, O, I) per layer group. The per-step
    fields are set for non-static spaces only: ``grad`` the gradient g, ``residual`` r_KFAC and
    ``precond_residual`` K^{-1} r_KFAC as layered vectors (one column, (L, 1, O, I) per group),
    ``fvp(u)`` the F_bullet product on the Fisher batch; ``fisher_projected(u, scale)`` the same,
    scaled, with the per-layer projections J_i^T u[i] (L, k, B) per group, which a space may hand
    back in ``known_projections`` for the first k0 columns of each group's basis (the coarse
    operator then projects only the others; see ``Taylor``)."""

    kron: list[DampedKronecker]
    shapes: list[tuple[int, int, int]]
    like: torch.Tensor
    grad: Layered | None = None
    residual: Layered | None = None
    fisher_projected: Callable[..., tuple[Layered, Layered]] | None = None
    known_projections: Layered | None = None
    _precond_residual: Layered | None = None

    @property
    def precond_residual(self) -> Layered:
        """K^{-1} r_KFAC, computed on first use (a space that writes it elsewhere skips it)."""
        if self._precond_residual is None:
            self._precond_residual = [k.apply_inverse(r) for k, r in zip(self.kron, self.residual)]
        return self._precond_residual

    def fvp(self, u: Layered) -> Layered:
        """F_bullet u on the Fisher batch of the step."""
        return self.fisher_projected(u)[0]

    def ones(self, L: int, O: int, I: int) -> RankOne:
        """The all-ones matrix of each layer as a rank-one column."""
        kw = {"dtype": self.like.dtype, "device": self.like.device}
        return RankOne(torch.ones(L, 1, O, **kw), torch.ones(L, 1, I, **kw))


@dataclass
class DenseLayerContext:
    """What ``CoarseSpace.explicit`` may use for layer i (float64, row-major vec of (O, I)):
    ``block`` K_i, ``kfac`` K and ``fisher`` F_bullet (p x p), ``grad`` g, ``residual`` r_KFAC and
    ``precond_residual`` K^{-1} r_KFAC (p), the layer's ``slice`` of the parameter vector."""

    block: torch.Tensor
    kfac: torch.Tensor
    fisher: torch.Tensor
    grad: torch.Tensor
    residual: torch.Tensor
    precond_residual: torch.Tensor
    slice: slice
    shape: tuple[int, int]
    options: dict = field(default_factory=dict)

    @property
    def ones(self) -> torch.Tensor:
        return torch.ones(self.shape[0] * self.shape[1], dtype=self.block.dtype)


class CoarseSpace:
    """A coarse space (see the module docstring). Subclasses set ``name`` and override ``build``;
    ``options`` lists the constructor options they accept (with their defaults)."""

    name: ClassVar[str] = ""
    static: ClassVar[bool] = True
    options: ClassVar[dict] = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"option(s) {unknown} do not apply to coarse_space={self.name!r}; "
                             f"valid: {sorted(self.options) or 'none'}")
        self.settings = {**self.options, **options}

    def kronecker_solves(self) -> int:
        """Dense K^{-1} applications per step besides zeta_KFAC (static spaces: none)."""
        return 0

    def build(self, ctx: BasisContext) -> list[Basis]:
        raise NotImplementedError

    def explicit(self, ctx: DenseLayerContext) -> list[torch.Tensor] | None:
        """The layer's columns built densely from the definition; None: use ``build``."""
        return None

    def basis(self, ctx: BasisContext) -> list[Basis]:
        """``build`` with unit-norm columns (the static spaces' cached bases; per-step bases are
        used as built and scaled on the small system). Projections a space left in
        ``ctx.known_projections`` belong to the raw columns and are dropped."""
        unit = [normalize_columns(v) for v in self.build(ctx)]
        ctx.known_projections = None
        return unit


COARSE_SPACES: dict[str, type[CoarseSpace]] = {}


def register_coarse_space(cls: type[CoarseSpace]) -> type[CoarseSpace]:
    """Class decorator: make ``cls`` available as ``coarse_space=cls.name`` everywhere."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    COARSE_SPACES[cls.name] = cls
    return cls


def make_coarse_space(name: str, **options) -> CoarseSpace:
    if name not in COARSE_SPACES:
        raise ValueError(f"coarse_space={name!r} is not valid; choose one of {tuple(COARSE_SPACES)}")
    return COARSE_SPACES[name](**options)


def _krylov(kron: DampedKronecker, start: Basis) -> Basis:
    """[v, K^{-1} v]: one inverse-power iterate appended to the start vector (3.29, m_i = 2).
    A rank-one start stays rank-one under the pi/factor damping (G'^{-1} u w^T A'^{-1}); under the
    exact damping K^{-1} v is not rank-one and the basis is stored densely."""
    start = normalize_columns(start)
    if isinstance(start, RankOne):
        image = kron.apply_inverse_rank_one(start)
        if image is not None:
            return start.cat(image)
        start = start.dense()
    return torch.cat([start, kron.apply_inverse(start)], dim=1)


@register_coarse_space
class Nicolaides(CoarseSpace):
    """V_i = 1 (3.23-3.24): one rank-one column per layer."""

    name = "nicolaides"

    def build(self, ctx):
        return [ctx.ones(*s) for s in ctx.shapes]

    def explicit(self, ctx):
        return [ctx.ones]


@register_coarse_space
class Spectral(CoarseSpace):
    """The eigenvector of the smallest eigenvalue of K_i (3.25-3.28): v_G v_A^T, rank one."""

    name = "spectral"

    def build(self, ctx):
        return [RankOne(*(v.unsqueeze(1) for v in k.smallest_eigenvector_factors())) for k in ctx.kron]

    def explicit(self, ctx):
        return [torch.linalg.eigh(ctx.block)[1][:, 0]]


@register_coarse_space
class KrylovNicolaides(CoarseSpace):
    """V_i = [1, K_i^{-1} 1] (3.29-3.30, m_i = 2)."""

    name = "krylov-nicolaides"

    def build(self, ctx):
        return [_krylov(k, ctx.ones(*s)) for k, s in zip(ctx.kron, ctx.shapes)]

    def explicit(self, ctx):
        return [ctx.ones, torch.linalg.solve(ctx.block, ctx.ones)]


@register_coarse_space
class Full(CoarseSpace):
    """Every coordinate (m = p): a test space whose two-level step is the exact natural gradient."""

    name = "full"

    def build(self, ctx):
        kw = {"dtype": ctx.like.dtype, "device": ctx.like.device}
        return [torch.eye(O * I, **kw).reshape(1, O * I, O, I).expand(L, -1, -1, -1) for L, O, I in ctx.shapes]

    def explicit(self, ctx):
        return list(torch.eye(ctx.shape[0] * ctx.shape[1], dtype=ctx.block.dtype))


@register_coarse_space
class Residual(CoarseSpace):
    """V_i = K_i^{-1} r_KFAC[i] (3.32): rebuilt every step; one extra K^{-1} (the residual's)."""

    name = "residual"
    static = False

    def kronecker_solves(self):
        return 1

    def build(self, ctx):
        return list(ctx.precond_residual)

    def explicit(self, ctx):
        return [ctx.precond_residual[ctx.slice]]


@register_coarse_space
class KrylovResidual(CoarseSpace):
    """V_i = [v_i, K_i^{-1} v_i] (3.29-3.30) with v_i = K_i^{-1} r[i] ('preconditioned', so the
    residual space is contained) or r[i] ('raw'); the paper leaves v_i open."""

    name = "krylov-residual"
    static = False
    options = {"krylov_start": "preconditioned"}

    def __init__(self, **options):
        super().__init__(**options)
        if self.settings["krylov_start"] not in KRYLOV_STARTS:
            raise ValueError(f"krylov_start={self.settings['krylov_start']!r} is not valid; choose one of {KRYLOV_STARTS}")

    def kronecker_solves(self):
        return 2

    def build(self, ctx):
        # both columns written into one (L, 2, O, I) tensor (no normalisation: a per-step basis is
        # scaled on the small system, and K^{-1} is linear, so the span is that of (3.29))
        bases = [r.new_empty(r.shape[0], 2, *r.shape[2:]) for r in ctx.residual]
        for k, r, v in zip(ctx.kron, ctx.residual, bases):
            if self.settings["krylov_start"] == "preconditioned":
                k.apply_inverse(r, out=v[:, :1])
            else:
                v[:, :1].copy_(r)
            k.apply_inverse(v[:, :1], out=v[:, 1:])
        return bases

    def explicit(self, ctx):
        raw = self.settings["krylov_start"] == "raw"
        v = (ctx.residual if raw else ctx.precond_residual)[ctx.slice]
        return [v, torch.linalg.solve(ctx.block, v)]


@register_coarse_space
class Taylor(CoarseSpace):
    """V_i = [w_1[i], ..., w_q[i]], w_1 = K^{-1} r, w_{j+1} = K^{-1} F_bullet w_j (3.36-3.38): the
    space the paper describes but never built; q = ``taylor_order`` (1 = the residual space)."""

    name = "taylor"
    static = False
    options = {"taylor_order": 2}

    def __init__(self, **options):
        super().__init__(**options)
        q = self.settings["taylor_order"]
        if int(q) != q or q < 1:
            raise ValueError(f"taylor_order={q!r} must be a positive integer")
        self.settings["taylor_order"] = int(q)

    def kronecker_solves(self):
        return self.settings["taylor_order"]

    def build(self, ctx):
        q = self.settings["taylor_order"]
        # the q columns of each group are written into one (L, q, O, I) tensor as they come
        bases = [r.new_empty(r.shape[0], q, *r.shape[2:]) for r in ctx.residual]
        for k, r, v in zip(ctx.kron, ctx.residual, bases):
            k.apply_inverse(r, out=v[:, :1])  # w_1 = K^{-1} r_KFAC
        known = None
        for j in range(1, q):
            last = [v[:, j - 1 : j] for v in bases]
            # F_bullet mixes layers: scale by the global norm only, never layer by layer, or the
            # span would change; the scale rides on the (k, B) vector inside the product
            norm = torch.stack([torch.linalg.vector_norm(c) for c in last]).norm().clamp_min(1e-30)
            fw, proj = ctx.fisher_projected(last, 1.0 / norm)
            known = proj if known is None else [torch.cat([k, p], dim=1) for k, p in zip(known, proj)]
            for k, x, v in zip(ctx.kron, fw, bases):
                k.apply_inverse(x, out=v[:, j : j + 1])
        ctx.known_projections = known  # J^T of w_1 .. w_{q-1}, from the products above
        return bases

    def explicit(self, ctx):
        vs, w = [], ctx.precond_residual
        for _ in range(self.settings["taylor_order"]):
            vs.append(w[ctx.slice])
            w = torch.linalg.solve(ctx.kfac, ctx.fisher @ w)
        return vs
