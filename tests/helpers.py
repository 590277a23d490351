"""Tiny float64 problems shared by the tests, and float32 error bounds derived from conditioning."""

import torch

from kfac2l.curvature.basis import RankOne
from kfac2l.curvature.fisher import combine, project, project_rank_one
from kfac2l.dense import Problem, tiny_cnn, tiny_inputs, tiny_mlp  # noqa: F401

EPS32 = torch.finfo(torch.float32).eps


def condition_number(matrix: torch.Tensor) -> float:
    """kappa_2 = lambda_max / lambda_min of a symmetric positive definite float64 matrix (e.g.
    F_bullet = F + lambda I, whose kappa is (lambda_max(F) + lambda) / lambda)."""
    evals = torch.linalg.eigvalsh(matrix.double())
    return (evals[-1] / evals[0]).item()


def float32_solve_tolerance(kappas, dim: int) -> float:
    """First-order bound on the relative error of a float32 computation made of backward-stable
    stages (eigen-decompositions, solves, GEMMs): stage i perturbs its operator by at most
    gamma_n ||.|| (gamma_n = n u / (1 - n u) ~ n eps / 2, u the unit round-off, n the inner dimension;
    Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 7.2 and sections 3.5, 19.3), which
    a solve with condition number kappa_i amplifies into a relative forward error kappa_i gamma_n;
    to first order the stages' errors add. Returned: dim * eps32 * sum(kappas), i.e. 2 gamma_dim
    sum(kappa_i): the factor 2 covers the O(u) rounding of the inputs, the right-hand side and the
    output, which the first-order model leaves out. ``dim`` is the largest inner dimension of a
    factorisation or product on the path (for a Kronecker-factored block: O + I)."""
    kappas = [kappas] if isinstance(kappas, (int, float)) else list(kappas)
    return dim * EPS32 * sum(kappas)

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
