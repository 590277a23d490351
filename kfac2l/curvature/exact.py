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

    The Gram matrix and the B x B system are formed in float64 and solved through the
    eigen-decomposition of the (PSD) Gram matrix, whose eigenvalues are clamped at 0 before
    B lambda is added: rounding can never make the system indefinite, and nothing synchronises.
    """
    if groups[0].total != groups[0].batch:
        raise ValueError("the exact natural gradient (Woodbury on the B x B Gram matrix) needs the whole Fisher batch "
                         "on one process; valid: optimizer ngd and exact_reference=true without distributed training")
    batch = groups[0].batch
    exact = [LayerGroup(g.indices, g.a.double(), g.g.double()) for g in groups]
    evals, evecs = torch.linalg.eigh(per_sample_gradient_gram(exact))
    rhs = jt(exact, [g.double() for g in grad])  # (k, B)
    coeff = ((rhs @ evecs) / (evals.clamp_min(0) + batch * damping)) @ evecs.T  # (k, B)
    return [(g - combine(grp, coeff.to(g.dtype))) / damping for grp, g in zip(groups, grad)]
