"""The coarse solve, the corrections and PREVIOUS's Kronecker coarse operator (paper section 3).

The coarse spaces themselves are in ``kfac2l.curvature.spaces`` (one class each, registered by
name) and the basis algebra in ``kfac2l.curvature.basis``.
"""

from __future__ import annotations

import torch

CORRECTIONS = ("multiplicative", "additive")


def solve_coarse(
    operator: torch.Tensor, rhs: torch.Tensor, column_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """beta = F_coarse^{-1} rhs by Cholesky, without host synchronisation.

    The operator is Jacobi-scaled; exactly zero columns (a layer whose coarse vector vanished)
    get a unit diagonal so that their beta is 0. If the Cholesky factorisation fails, a second one
    with a relative jitter of 1e-10 is used; if that fails too (or the operator is not finite, e.g.
    from a degenerate Fisher batch), beta = 0 exactly (the step stays KFAC's).
    ``column_scale`` s: solve the system of the columns V diag(s) instead (unit columns when
    s = 1/||V[:, j]||) and return beta for V; the Jacobi scaling and the zero-column test then see
    columns of comparable size.
    Returns (beta, failed) with ``failed`` a 0-dim tensor counting the fallbacks used (0, 1, 2).
    """
    if column_scale is not None:
        beta, failed = solve_coarse(operator * column_scale[:, None] * column_scale[None, :], rhs * column_scale)
        return beta * column_scale, failed
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
    1^T (A_i (x) G_i) 1 exactly (without the scaling it would be T_i times larger). A shared
    module's locations are those of all its calls (T_i their total, as in its factors).
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
