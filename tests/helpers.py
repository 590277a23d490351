"""Tiny float64 problems shared by the tests."""

import torch

from kfac2l.curvature.basis import RankOne
from kfac2l.curvature.fisher import combine, project, project_rank_one
from kfac2l.dense import Problem, tiny_cnn, tiny_inputs, tiny_mlp  # noqa: F401


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_same_products(grp, unfolded, tol: float = 1e-13) -> None:
    """A (conv) layer group's J^T u (dense and rank-one columns) and J v equal those of the
    reference group ``unfolded`` (same layers, patches unfolded) on random float64 vectors."""
    L, B = len(grp.indices), grp.batch
    O, I = unfolded.shape
    u = torch.randn(L, 3, O, I, dtype=torch.float64)
    assert rel(project(grp, u), project(unfolded, u)) < tol
    basis = RankOne(torch.randn(L, 2, O, dtype=torch.float64), torch.randn(L, 2, I, dtype=torch.float64))
    assert rel(project_rank_one(grp, basis), project(unfolded, basis.dense())) < tol
    v = torch.randn(L, 3, B, dtype=torch.float64)
    assert rel(combine(grp, v), combine(unfolded, v)) < tol
    assert rel(combine(grp, v[0]), combine(unfolded, v[0])) < tol
