"""Self-check on your own hardware: every curvature quantity against a dense float64 construction.

    python -m kfac2l.verify [--json] [--tol 1e-8]

On tiny float64 MLP, CNN and sequence problems (Linear with and without bias; Conv2d with stride,
padding, no bias; Linear layers on 3-D inputs, positions treated as locations; a Conv2d and a
Linear each called twice in the forward pass, shared modules) it compares the
library's KFAC step (three damping modes), Fisher-vector product, coarse operator, each two-level
step (every coarse space, both corrections), PREVIOUS, the exact natural gradient (Woodbury) and
the diagnostics of eq. (4.6) with explicit dense matrices (full per-sample Jacobian, explicit F,
explicit R0, dense solves), prints a table of relative errors and
exits non-zero if any exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import kfac2l
import kfac2l.dense as dense
from kfac2l.curvature.fisher import coarse_operator, fisher_vector_product, group_layers
from kfac2l.curvature.spaces import COARSE_SPACES

LAM = 0.1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def checks(kind: str) -> list[tuple[str, float]]:
    """(name, relative error) for every quantity on the tiny ``kind`` problem."""
    rows = []
    base = dense.Problem(kind)
    grad, fisher, kfac_ref, data = base.dense(LAM)
    groups = group_layers([a for a, _ in data], [g for _, g in data])
    slices = dense.layer_slices(base.model)
    for mode in ("pi", "factor", "exact"):
        p = dense.Problem(kind)
        _, _, k_mode, _ = p.dense(LAM, mode)
        step = p.run(kfac2l.KFAC(p.model, damping=LAM, damping_mode=mode))
        rows.append((f"kfac step ({mode} damping)", _rel(step, torch.linalg.solve(k_mode, grad))))
    u = torch.randn(2, fisher.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = fisher_vector_product(groups, dense.to_layered(groups, slices, u), LAM)
    flat = dense.from_layered(groups, slices, out, fisher.shape[0])
    rows.append(("fisher-vector product F_bullet u", _rel(flat, u @ fisher.T)))
    p = dense.Problem(kind)
    captured = kfac2l.KFAC(p.model, damping=LAM)
    p.run(captured)  # the groups the optimisers use (convolutions kept as raw inputs)
    out = fisher_vector_product(captured.groups, dense.to_layered(captured.groups, slices, u), LAM)
    flat = dense.from_layered(captured.groups, slices, out, fisher.shape[0])
    rows.append(("fisher-vector product, captured layer groups", _rel(flat, u @ fisher.T)))
    for space in COARSE_SPACES:  # every registered space, yours included
        for corr in ("multiplicative", "additive"):
            p = dense.Problem(kind)
            pre = kfac2l.TwoLevelKFAC(p.model, coarse_space=space, correction=corr, damping=LAM, exact_reference=True)
            step = p.run(pre)
            try:
                r0t = dense.explicit_coarse_basis(space, p.model, data, kfac_ref, fisher, grad, LAM, "pi")
                source = ""
            except ValueError:  # no explicit construction: the space's own columns, densified
                r0t = dense.basis_matrix(pre.groups, slices, pre.last_basis, fisher.shape[0])
                source = " (columns from build)"
            rows.append((f"two-level {space} {corr}{source}",
                         _rel(step, dense.two_level_step(kfac_ref, fisher, grad, r0t, corr))))
            if corr == "multiplicative" and space == "residual":
                gen = torch.Generator().manual_seed(3)
                basis = [torch.randn(len(g.indices), 2, *g.shape, generator=gen, dtype=torch.float64)
                         for g in pre.groups]
                r0t = dense.basis_matrix(pre.groups, slices, basis, fisher.shape[0])
                rows.append(("coarse operator R0 F_bullet R0^T",
                             _rel(coarse_operator(pre.groups, basis, LAM), r0t.T @ fisher @ r0t)))
                exact = torch.linalg.solve(fisher, grad)
                zk = torch.linalg.solve(kfac_ref, grad)
                e0 = (zk - exact) @ fisher @ (zk - exact)
                e1 = (step - exact) @ fisher @ (step - exact)
                d = pre.diagnostics
                rows.append(("gap (4.6) vs E(beta*) - E(0)", abs(d["gap"] - (e1 - e0).item()) / e0.item()))
                rows.append(("true distance of KFAC step", abs(d["dist_kfac"] - e0.item()) / e0.item()))
                rows.append(("true distance of two-level step", abs(d["dist_two_level"] - e1.item()) / e0.item()))
    p = dense.Problem(kind)
    rows.append(("exact natural gradient (Woodbury)",
                 _rel(p.run(kfac2l.ExactNGD(p.model, damping=LAM)), torch.linalg.solve(fisher, grad))))
    # PREVIOUS on every kind (convolutions: the convention of coarse.nicolaides_sums)
    p = dense.Problem(kind)
    pre = kfac2l.PreviousKFAC(p.model, damping=LAM)
    step = p.run(pre)
    r0t = dense.explicit_coarse_basis("nicolaides", p.model, data, kfac_ref, fisher, grad, LAM, "pi")
    op = dense.previous_coarse_operator(data, LAM, "pi")
    rows.append(("previous (Kronecker coarse operator 3.18)",
                 _rel(step, dense.two_level_step(kfac_ref, fisher, grad, r0t, "additive", op))))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--tol", type=float, default=1e-8, help="largest relative error accepted")
    args = parser.parse_args(argv)
    results = []
    for kind in dense.TINY:
        for name, err in checks(kind):
            results.append({"network": kind, "check": name, "rel_error": err, "ok": bool(err <= args.tol)})
    failed = [r for r in results if not r["ok"]]
    if args.json:
        print(json.dumps({"tolerance": args.tol, "passed": not failed, "checks": results}, indent=2))
    else:
        width = max(len(r["check"]) for r in results)
        print(f"{'net':4} {'check':{width}}  {'rel. error':>10}  status")
        for r in results:
            print(f"{r['network']:4} {r['check']:{width}}  {r['rel_error']:10.2e}  {'ok' if r['ok'] else 'FAIL'}")
        print(f"{len(results) - len(failed)} passed, {len(failed)} failed (tolerance {args.tol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
