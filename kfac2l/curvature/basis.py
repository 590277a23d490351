"""The algebra of block-diagonal coarse bases R0^T (paper eq. 3.21), independent of the Fisher.

A basis is a list over layer groups; for a group of L layers with k columns each it is either a
tensor (L, k, O, I) of the matrices MAT(V_i[:, k]) or a ``RankOne`` pair of factors. Here:
restriction R0 u, prolongation R0^T beta, the block Gram blockdiag(V_i^T V_i) and column
normalisation. Products with the Fisher (per-sample projections, the coarse operator) are in
``kfac2l.curvature.fisher``; the spaces themselves in ``kfac2l.curvature.spaces``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass
class RankOne:
    """k rank-one columns per layer: MAT(V_i[:, k]) = left[i, k] right[i, k]^T.

    left: (L, k, O), right: (L, k, I). The Nicolaides (1 1^T), spectral (v_G v_A^T) and, for the
    ``pi`` and ``factor`` damping modes, Krylov-Nicolaides (G'^{-1} 1 1^T A'^{-1}) columns have this
    form; keeping it makes their per-sample projections O + I instead of O * I per location.
    """

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        L, k, O = self.left.shape
        return L, k, O, self.right.shape[-1]

    def dense(self) -> torch.Tensor:
        """The (L, k, O, I) matrices."""
        return self.left.unsqueeze(-1) * self.right.unsqueeze(-2)

    def cat(self, other: "RankOne") -> "RankOne":
        return RankOne(torch.cat([self.left, other.left], 1), torch.cat([self.right, other.right], 1))


Basis = Union[torch.Tensor, RankOne]  # noqa: UP007 (a runtime alias)


def block_gram(vectors: list[Basis]) -> torch.Tensor:
    """blockdiag(V_i^T V_i) in the column order of ``per_sample_projections``."""
    blocks = []
    for vg in vectors:
        if isinstance(vg, RankOne):  # <u w^T, u' w'^T> = (u . u') (w . w')
            left = torch.matmul(vg.left, vg.left.transpose(1, 2))
            gram = left * torch.matmul(vg.right, vg.right.transpose(1, 2))
        else:
            flat = vg.flatten(2)  # (L, k, O*I)
            gram = torch.matmul(flat, flat.transpose(1, 2))
        blocks.extend(gram.unbind(0))
    return torch.block_diag(*blocks)


def restrict(vectors: list[Basis], u: list[torch.Tensor]) -> torch.Tensor:
    """R0 u = [V_i^T u[i]]: (m,) in the column order of ``per_sample_projections``.

    u: one layered vector, (L, 1, O, I) per group."""
    parts = []
    for vg, ug in zip(vectors, u):
        if isinstance(vg, RankOne):  # left^T MAT(u) right
            ur = torch.matmul(ug[:, 0], vg.right.transpose(1, 2))  # (L, O, k)
            parts.append((vg.left.transpose(1, 2) * ur).sum(1).reshape(-1))
        else:  # one GEMV per layer: no (L, k, O, I) temporary
            parts.append(torch.matmul(vg.flatten(2), ug.flatten(2).transpose(1, 2)).reshape(-1))
    return torch.cat(parts)


def restrict64(vectors: list[Basis], u: list[torch.Tensor]) -> torch.Tensor:
    """``restrict`` with every product and sum in float64 (O(p) extra memory: one layer at a time)."""
    def wide(vg):
        return RankOne(vg.left.double(), vg.right.double()) if isinstance(vg, RankOne) else vg.double()

    return torch.cat([restrict([wide(vg)], [ug.double()]) for vg, ug in zip(vectors, u)])


def prolong(vectors: list[Basis], beta: torch.Tensor) -> list[torch.Tensor]:
    """R0^T beta = [V_i beta_i] as a layered vector with one column, (L, 1, O, I) per group."""
    out, offset = [], 0
    for vg in vectors:
        L, k = vg.shape[:2]
        b = beta[offset : offset + L * k].reshape(L, k)
        if isinstance(vg, RankOne):  # sum_k beta_k left_k right_k^T
            left = vg.left * b.to(vg.left.dtype).unsqueeze(-1)
            out.append(torch.matmul(left.transpose(1, 2), vg.right).unsqueeze(1))
        else:  # one GEMV per layer: no (L, k, O, I) temporary
            mixed = torch.matmul(b.reshape(L, 1, k).to(vg.dtype), vg.flatten(2))
            out.append(mixed.reshape(L, 1, *vg.shape[2:]))
        offset += L * k
    return out


def _unit(norm: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(norm > eps, norm, torch.ones_like(norm)).unsqueeze(-1)


def normalize_columns(v: Basis, eps: float = 1e-30) -> Basis:
    """Scale each column MAT(V_i[:, k]) of a (L, k, O, I) or rank-one basis to unit norm
    (zero stays zero). The span, hence the two-level step, is unchanged."""
    if isinstance(v, RankOne):
        return RankOne(v.left / _unit(v.left.norm(dim=-1), eps), v.right / _unit(v.right.norm(dim=-1), eps))
    return v / _unit(v.flatten(2).norm(dim=-1), eps).unsqueeze(-1)
