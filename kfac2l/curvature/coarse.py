"""Coarse spaces R0^T, the coarse solve and the two-level corrections (paper section 3).

A coarse basis is block diagonal (eq. 3.21): for each layer i a block V_i of m_i columns, stored
per layer group as a tensor (L, m_i, O, I) of matrices MAT(V_i[:, k]), or, where every column is
a rank-one matrix u w^T (nicolaides, spectral, krylov-nicolaides with the pi/factor damping), as
a ``RankOne`` pair of (L, m_i, O) and (L, m_i, I) factors, whose per-sample projections cost
O + I per location instead of O * I. Columns are scaled to unit Euclidean norm; this does not
change the span, hence not the two-level step, and keeps the coarse operator well scaled.

Spaces (all selectable by name):
  nicolaides         V_i = 1                                         (3.23-3.24)
  spectral           eigenvector of the smallest eigenvalue of [F_bullet KFAC]_{i,i}   (3.25-3.28)
  residual           V_i = [F_bullet KFAC]_{i,i}^{-1} r_KFAC[i]      (3.32)
  krylov-nicolaides  V_i = [1, K_i^{-1} 1]                           (3.29-3.30, m_i = 2)
  krylov-residual    V_i = [v_i, K_i^{-1} v_i], v_i = K_i^{-1} r[i] by default
                     (``krylov_start='preconditioned'``, so that the residual space is contained),
                     or v_i = r[i] (``'raw'``) - the paper leaves v_i open  (3.29-3.30)
  taylor             V_i = [w_1[i], ..., w_q[i]], w_1 = K^{-1} r, w_{j+1} = K^{-1} F_bullet w_j
                     (3.36-3.38; q = 1 is the residual space)
  full               every coordinate (m = p); a test/diagnostic space for which the two-level
                     step equals the exact regularised natural gradient.
with K = F_bullet KFAC.
"""

from __future__ import annotations

from typing import Callable

import torch

from kfac2l.curvature.fisher import Basis, RankOne
from kfac2l.curvature.kronecker import DampedKronecker

COARSE_SPACES = (
    "nicolaides",
    "spectral",
    "residual",
    "krylov-nicolaides",
    "krylov-residual",
    "taylor",
    "full",
)
CORRECTIONS = ("multiplicative", "additive")
COARSE_OPERATORS = ("exact", "kronecker")
KRYLOV_STARTS = ("preconditioned", "raw")

Layered = list[torch.Tensor]


def _unit(norm: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(norm > eps, norm, torch.ones_like(norm)).unsqueeze(-1)


def normalize_columns(v: Basis, eps: float = 1e-30) -> Basis:
    """Scale each column MAT(V_i[:, k]) of a (L, k, O, I) or rank-one basis to unit norm
    (zero stays zero)."""
    if isinstance(v, RankOne):
        return RankOne(v.left / _unit(v.left.norm(dim=-1), eps), v.right / _unit(v.right.norm(dim=-1), eps))
    return v / _unit(v.flatten(2).norm(dim=-1), eps).unsqueeze(-1)


def uses_residual(space: str) -> bool:
    """Whether the space is built from the KFAC residual r_KFAC (so needs F_bullet zeta_KFAC)."""
    return space in ("residual", "krylov-residual", "taylor")


def coarse_basis(
    space: str,
    kron: list[DampedKronecker],
    shapes: list[tuple[int, int, int]],
    *,
    precond_residual: Layered | None = None,
    residual: Layered | None = None,
    fvp: Callable[[Layered], Layered] | None = None,
    taylor_order: int = 2,
    krylov_start: str = "preconditioned",
    like: torch.Tensor | None = None,
) -> Layered:
    """The block-diagonal coarse basis R0^T of the named space, per layer group (L, m_i, O, I).

    shapes: (L, O, I) per group; precond_residual: K^{-1} r_KFAC (one column per group, k = 1);
    residual: r_KFAC; fvp: the F_bullet product (for the Taylor space).
    """
    dtype, device = like.dtype, like.device

    def ones(L, O, I):
        return RankOne(torch.ones(L, 1, O, dtype=dtype, device=device), torch.ones(L, 1, I, dtype=dtype, device=device))

    if space == "nicolaides":
        basis = [ones(*s) for s in shapes]
    elif space == "spectral":
        basis = [RankOne(*(v.unsqueeze(1) for v in k.smallest_eigenvector_factors())) for k in kron]
    elif space == "residual":
        basis = list(precond_residual)
    elif space == "krylov-nicolaides":
        basis = [_krylov(k, ones(*s)) for k, s in zip(kron, shapes)]
    elif space == "krylov-residual":
        start = precond_residual if krylov_start == "preconditioned" else residual
        basis = [_krylov(k, v) for k, v in zip(kron, start)]
    elif space == "taylor":
        if taylor_order < 1:
            raise ValueError(f"taylor_order={taylor_order!r} must be >= 1")
        columns = [list(precond_residual)]
        for _ in range(taylor_order - 1):
            # w_{j+1} = K^{-1} F_bullet w_j on the whole vector (F_bullet mixes layers): scale
            # by the global norm only, never layer by layer, or the span would change.
            norm = sum(c.pow(2).sum() for c in columns[-1]).sqrt().clamp_min(1e-30)
            fw = fvp([c / norm for c in columns[-1]])
            columns.append([k.apply_inverse(x) for k, x in zip(kron, fw)])
        basis = [torch.cat(cols, dim=1) for cols in zip(*columns)]
    elif space == "full":
        basis = [
            torch.eye(O * I, dtype=dtype, device=device).reshape(1, O * I, O, I).expand(L, -1, -1, -1)
            for L, O, I in shapes
        ]
    else:
        raise ValueError(f"coarse_space={space!r} is not valid; choose one of {COARSE_SPACES}")
    return [normalize_columns(v) for v in basis]


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


def solve_coarse(operator: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """beta = F_coarse^{-1} rhs by Cholesky, without host synchronisation.

    The operator is Jacobi-scaled; exactly zero columns (a layer whose coarse vector vanished)
    get a unit diagonal so that their beta is 0. If the Cholesky factorisation fails, a second one
    with a relative jitter of 1e-10 is used; if that fails too (or the operator is not finite, e.g.
    from a degenerate Fisher batch), beta = 0 exactly (the step stays KFAC's).
    Returns (beta, failed) with ``failed`` a 0-dim tensor counting the fallbacks used (0, 1, 2).
    """
    diag = torch.diagonal(operator)
    tiny = diag.abs().amax() * 1e-14 + 1e-300
    dead = diag <= tiny
    operator = operator + torch.diag(dead.to(operator.dtype))
    scale = torch.diagonal(operator).clamp_min(1e-300).rsqrt()
    scaled = operator * scale.unsqueeze(0) * scale.unsqueeze(1)
    b = (rhs * scale).unsqueeze(-1)
    eye = torch.eye(scaled.shape[0], dtype=scaled.dtype, device=scaled.device)
    chol1, info1 = torch.linalg.cholesky_ex(scaled)
    chol2, info2 = torch.linalg.cholesky_ex(scaled + 1e-10 * eye)
    x1 = torch.cholesky_solve(b, chol1).squeeze(-1)
    x2 = torch.cholesky_solve(b, chol2).squeeze(-1)
    ok1, ok2 = (info1 == 0) & x1.isfinite().all(), (info2 == 0) & x2.isfinite().all()
    x = torch.where(ok1, x1, x2)
    # where() rather than a product with zeros: 0 * nan would leak a non-finite operator into beta
    beta = torch.where(dead | ~(ok1 | ok2), torch.zeros_like(x), x * scale)
    failed = (~ok1).to(torch.int64) + (~ok1 & ~ok2).to(torch.int64)
    return beta, failed


def nicolaides_sums(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample alpha_i = 1^T mean_t(abar_{i,t}) and gamma_i = 1^T sum_t(g_{i,t}) / sqrt(T_i) for
    the Kronecker coarse operator of PREVIOUS (3.18); returns (L, B) tensors.

    Our choice for convolutions (exact for Linear layers, T = 1): layers with different numbers of
    locations T_i are paired through the spatial mean of their input patches and the spatial sum
    of their output gradients, scaled by 1/sqrt(T_i), so that entry (i, j) of the operator is
    E[alpha_i alpha_j] E[gamma_i gamma_j] = E[1^T abar_i abar_j^T 1] E[1^T g_i g_j^T 1] / sqrt(T_i T_j).
    The 1/sqrt(T_i T_j) makes the cross terms consistent with the diagonal, which comes from the
    convolution factors A_i = E[sum_t abar abar^T], G_i = E[sum_t g g^T] / T_i: for patches and
    gradients constant over the locations of a single sample, entry (i, i) of this formula equals
    1^T (A_i (x) G_i) 1 exactly (without the scaling it would be T_i times larger).
    """
    T = a.shape[2]
    return a.mean(2).sum(-1), g.sum(2).sum(-1) / T**0.5


def kronecker_coarse_operator(
    cross_a: torch.Tensor, cross_g: torch.Tensor, diagonal: torch.Tensor
) -> torch.Tensor:
    """R0 Fbar_bullet R0^T for the Nicolaides space (3.18): off-diagonal (i, j) entries
    E[1^T abar_i abar_j^T 1] E[1^T g_i g_j^T 1], diagonal 1^T [F_bullet KFAC]_{i,i} 1."""
    op = cross_a * cross_g
    return op - torch.diag(torch.diagonal(op)) + torch.diag(diagonal)
