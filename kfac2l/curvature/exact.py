"""The exact regularised natural gradient zeta = F_bullet^{-1} grad (eqs. 2.17-2.18, 3.2).

With the mini-batch Fisher F = (1/B) J J^T (A2), the Woodbury identity gives

  (lambda I + (1/B) J J^T)^{-1} = (1/lambda) [I - J (B lambda I + J^T J)^{-1} J^T],

so only the B x B Gram matrix K = J^T J of per-sample gradients is factorised.
"""

from __future__ import annotations

import torch

from kfac2l.curvature.fisher import LayerGroup, combine, jt, per_sample_gradient_gram


def natural_gradient(groups: list[LayerGroup], grad: list[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """zeta = F_bullet^{-1} grad for a layered vector with k columns ((L, k, O, I) per group).

    The B x B system is solved in float64 by Cholesky (it is SPD since lambda > 0).
    """
    batch = groups[0].a.shape[1]
    gram = per_sample_gradient_gram(groups).double()
    system = gram + batch * damping * torch.eye(batch, dtype=gram.dtype, device=gram.device)
    rhs = jt(groups, grad).double()  # (k, B)
    chol = torch.linalg.cholesky(system)
    coeff = torch.cholesky_solve(rhs.T, chol).T.to(grad[0].dtype)  # (k, B)
    return [(g - combine(grp, coeff)) / damping for grp, g in zip(groups, grad)]
