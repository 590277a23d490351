"""The exact regularised natural gradient zeta = F_bullet^{-1} grad (eqs. 2.17-2.18, 3.2).

With the mini-batch Fisher F = (1/B) J J^T (A2), the Woodbury identity gives

  (lambda I + (1/B) J J^T)^{-1} = (1/lambda) [I - J (B lambda I + J^T J)^{-1} J^T],

so only the B x B Gram matrix K = J^T J of per-sample gradients is factorised. Its eigenvalues
also give the rank of the Fisher batch (``numerical_rank``, ``rank_above_damping``).
"""

from __future__ import annotations

import torch

from kfac2l.curvature.fisher import LayerGroup, combine, jt, per_sample_gradient_gram


def _whole_batch(groups: list[LayerGroup]) -> None:
    if groups[0].total != groups[0].batch:
        raise ValueError("the exact natural gradient (Woodbury on the B x B Gram matrix) needs the whole Fisher batch "
                         "on one process; valid: optimizer ngd and exact_reference=true without distributed training")


def _in_float64(groups: list[LayerGroup]) -> list[LayerGroup]:
    return [LayerGroup(g.indices, g.a.double(), g.g.double()) for g in groups]


def gram_spectrum(groups: list[LayerGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors) of K = J^T J, formed and decomposed in float64."""
    _whole_batch(groups)
    return torch.linalg.eigh(per_sample_gradient_gram(_in_float64(groups)))


def natural_gradient(groups: list[LayerGroup], grad: list[torch.Tensor], damping: float,
                     spectrum: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """zeta = F_bullet^{-1} grad for a layered vector with k columns ((L, k, O, I) per group).

    The Gram matrix and the B x B system are formed in float64 and solved through the
    eigen-decomposition of the (PSD) Gram matrix, whose eigenvalues are clamped at 0 before
    B lambda is added: rounding can never make the system indefinite, and nothing synchronises.
    ``spectrum``: ``gram_spectrum(groups)`` when already computed.
    """
    _whole_batch(groups)
    batch = groups[0].batch
    exact = _in_float64(groups)
    evals, evecs = torch.linalg.eigh(per_sample_gradient_gram(exact)) if spectrum is None else spectrum
    rhs = jt(exact, [g.double() for g in grad])  # (k, B)
    coeff = ((rhs @ evecs) / (evals.clamp_min(0) + batch * damping)) @ evecs.T  # (k, B)
    return [(g - combine(grp, coeff.to(g.dtype))) / damping for grp, g in zip(groups, grad)]


def numerical_rank(evals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The numerical rank of J (p x B) from the eigenvalues lambda_i = sigma_i(J)^2 of K = J^T J:
    the count of lambda_i > lambda_max max(B eps^2, B eps64), a 0-dim float64 tensor (no
    synchronisation). eps is that of J's dtype (the captured per-sample quantities): rounding
    every entry of J by a relative eps moves each sigma_i by at most eps ||J||_F <= eps sqrt(B)
    sigma_max (Weyl), so smaller sigma_i cannot be told from 0; B eps64 lambda_max is the rounding
    floor of the float64 Gram matrix and its eigen-decomposition. (``torch.linalg.matrix_rank``'s
    default, max(p, B) eps sigma_max, bounds the backward error of an SVD of J in its dtype, which
    is not computed here, and would discard real directions when p >> B.)"""
    batch = evals.shape[-1]
    rtol = batch * max(torch.finfo(dtype).eps ** 2, torch.finfo(torch.float64).eps)
    return (evals > evals.max() * rtol).sum().to(torch.float64)


def rank_above_damping(evals: torch.Tensor, damping: float) -> torch.Tensor:
    """Eigenvalues of the batch Fisher F = K / B above the damping lambda: the directions where F
    outweighs lambda I in F_bullet (elsewhere the exact step is g / lambda). 0-dim float64."""
    return (evals / evals.shape[-1] > damping).sum().to(torch.float64)
