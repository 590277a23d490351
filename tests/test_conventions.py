"""convention=authors ingredients, the KL-clip forms, and bit-identical optimiser state round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers import float32_solve_tolerance
from torch import nn

from kfac2l.curvature.kronecker import DampedKronecker, FactorState
from kfac2l.models import build_model
from kfac2l.optim import OPTIMIZERS, make_optimizer
from kfac2l.optim.step import get_task, training_step
from kfac2l.train import fisher_seed

TASK = get_task("classification")


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(27, 6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.Linear(6, 3))
    x = torch.randn(32, 1, 8, 8)
    y = x.flatten(1)[:, :3].argmax(1)
    return model, x, y


def _steps(model, opt, x, y, start, count, gen):
    for it in range(start, start + count):
        gen.manual_seed(fisher_seed(7, it))
        training_step(model, opt, TASK, x, y, 0.5, gen)


def _options(name):
    if name in ("sgd", "adam"):
        return {}
    opts = {"damping": 0.1, "kl_clip": 1e-2}
    if name != "ngd":
        opts.update(cov_interval=2, inv_interval=3)
    return opts


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_is_bit_identical(name):
    """k steps, save (through torch.save / torch.load(weights_only=True)), load into freshly built
    objects, k more steps == 2k uninterrupted steps, bit for bit on CPU."""
    k = 5
    model_a, x, y = _problem()
    opt_a = make_optimizer(name, model_a, lr=0.05, **_options(name))
    _steps(model_a, opt_a, x, y, 0, 2 * k, torch.Generator())

    model_b, _, _ = _problem()
    opt_b = make_optimizer(name, model_b, lr=0.05, **_options(name))
    _steps(model_b, opt_b, x, y, 0, k, torch.Generator())
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optimizer": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model_c, _, _ = _problem(seed=1)  # different start: everything must come from the state
    opt_c = make_optimizer(name, model_c, lr=0.05, **_options(name))
    model_c.load_state_dict(state["model"])
    opt_c.load_state_dict(state["optimizer"])
    _steps(model_c, opt_c, x, y, k, k, torch.Generator())
    for (n, p), q in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(p, q), n


def test_optimizer_state_refuses_another_name():
    model, _, _ = _problem()
    state = make_optimizer("kfac", model, lr=0.1, damping=0.1).state_dict()
    with pytest.raises(ValueError, match="'kfac', not 'nico'"):
        make_optimizer("nico", model, lr=0.1, damping=0.1).load_state_dict(state)


def test_identical_init_repeats_same_shaped_layers_and_xavier_does_not():
    same = build_model("deep_linear_a", init="identical", seed=3)
    linears = [m for m in same.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 64
    assert all(torch.equal(linears[1].weight, m.weight) for m in linears[2:-1])
    assert torch.equal(linears[1].weight, linears[-1].weight)  # 10x10 as well
    xavier = [m for m in build_model("deep_linear_a", init="xavier", seed=3).modules() if isinstance(m, nn.Linear)]
    assert not torch.equal(xavier[1].weight, xavier[2].weight)
    with pytest.raises(ValueError, match="identical"):
        build_model("deep_linear_a", init="bad")


def test_unit_pi_damping_adds_sqrt_lambda_over_t_to_each_factor():
    torch.manual_seed(0)
    a, g = torch.randn(1, 5, 5, dtype=torch.float64), torch.randn(1, 3, 3, dtype=torch.float64)
    A, G = a @ a.mT, g @ g.mT
    lam, T = 0.3, 4
    kron = DampedKronecker(A, G, lam, "unit_pi", locations=T)
    u = torch.randn(1, 1, 3, 5, dtype=torch.float64)
    shift = math.sqrt(lam / T)
    eye = torch.eye(5, dtype=torch.float64)
    expected = torch.linalg.solve(G[0] + shift * torch.eye(3, dtype=torch.float64), u[0, 0]) @ torch.linalg.inv(
        A[0] + shift * eye)
    assert torch.allclose(kron.apply_inverse(u)[0, 0], expected, rtol=1e-10, atol=0)


def test_ema_counted_in_iterations_reaches_the_cap_at_the_second_refresh():
    A1, G1 = torch.ones(1, 2, 2, dtype=torch.float64), torch.ones(1, 2, 2, dtype=torch.float64)
    A2, G2 = 3 * A1, 3 * G1
    by_refresh, by_iteration = FactorState(0.95), FactorState(0.95)
    for state, counts in ((by_refresh, (None, None)), (by_iteration, (1, 101))):
        state.update(A1, G1, count=counts[0])
        state.update(A2, G2, count=counts[1])
    assert torch.allclose(by_refresh.A, 0.5 * A1 + 0.5 * A2, rtol=1e-14)  # rho = 1 - 1/2
    assert torch.allclose(by_iteration.A, 0.95 * A1 + 0.05 * A2, rtol=1e-14)  # rho = min(1 - 1/101, 0.95)


def test_frozen_factors_keep_the_first_fisher_batch():
    model, x, y = _problem()
    opt = make_optimizer("kfac", model, lr=0.01, damping=0.1, cov_interval=1, freeze_factors=True)
    training_step(model, opt, TASK, x, y)
    first = [f.A.clone() for f in opt.preconditioner.factors]
    assert not opt.needs_curvature()
    for _ in range(3):
        training_step(model, opt, TASK, x, y)
    assert all(torch.equal(a, f.A) for a, f in zip(first, opt.preconditioner.factors))
    assert opt.preconditioner.factors[0].updates == 1


@pytest.mark.parametrize("form", ["unscaled", "lr_squared"])
def test_kl_clip_forms(form):
    """nu = min(1, sqrt(kappa / sum_i |<zeta_i, g_i>|)) or min(1, sqrt(kappa / (lr^2 |<zeta, g>|)))."""
    model, x, y = _problem()
    lr, kappa = 0.1, 1e-3
    free = make_optimizer("kfac", model, lr=lr, damping=0.1)
    pre = free.preconditioner
    pre.update_curvature(model(x))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = pre._gather()
    zeta = pre._direction(grads)
    # the reference in float64 from the same float32 zeta and gradients
    products = [(z.double() * g.double()).flatten(2) for z, g in zip(zeta, grads)]
    per_layer = torch.cat([x.sum(-1).flatten() for x in products])
    if form == "unscaled":
        product = per_layer.abs().sum().item()
        nu = min(1.0, math.sqrt(kappa / product))
    else:
        product = abs(per_layer.sum().item())
        nu = min(1.0, math.sqrt(kappa / (lr**2 * product)))
    assert nu < 1.0
    pre.kl_clip, pre.kl_clip_form = kappa, form
    clipped = pre._kl_clip(zeta, grads)
    # float32 sums of n products: relative error <= gamma_n sum |z_k g_k| / |product| (Higham, eq. 4.3),
    # halved by the square root, plus O(u) for the division, the root and the final product:
    # within n eps cond (the bound of helpers.float32_solve_tolerance with kappa = cond of the sum)
    terms = torch.cat([x.flatten() for x in products])
    tol = float32_solve_tolerance(terms.abs().sum().item() / product, terms.numel())
    assert all(torch.allclose(c.double(), z.double() * nu, rtol=tol, atol=0) for c, z in zip(clipped, zeta))
    assert pre.diagnostics["kl_scale"] == pytest.approx(nu, rel=tol, abs=0)
