"""Every curvature quantity against an explicit float64 construction (kfac2l.dense)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Problem, assert_same_products, condition_number, float32_solve_tolerance
from torch import nn

import kfac2l
import kfac2l.dense as dense
from kfac2l.curvature.basis import RankOne, block_gram, prolong, restrict
from kfac2l.curvature.fisher import coarse_operator, fisher_vector_product, group_layers
from kfac2l.curvature.kronecker import FactorState, batch_factors
from kfac2l.curvature.layers import layer_inputs, layer_output_grads
from kfac2l.curvature.likelihood import summed_nll

SPACES = ["nicolaides", "spectral", "residual", "krylov-nicolaides", "krylov-residual", "taylor"]
LAM = 0.1


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=2, out_channels=3, kernel_size=3),
        dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1),
        dict(in_channels=2, out_channels=2, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), bias=False),
        dict(in_channels=2, out_channels=3, kernel_size=3, dilation=2, padding=2),
        dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid"),
    ],
)
def test_conv_patches_match_explicit_loops(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(**conv).double()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    assert rel(layer_inputs(layer, x), dense.explicit_patches(layer, x)) < 1e-14
    # the patches reproduce the convolution itself: W [[A]] = S (eq. 2.6)
    a = layer_inputs(layer, x)
    w = layer.weight.reshape(layer.out_channels, -1)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias[:, None]], 1)
    out = layer(x)
    assert rel(a @ w.T, layer_output_grads(layer, out)) < 1e-13


CONV_GEOMETRIES = [
    dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=2, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), bias=False),
    dict(in_channels=2, out_channels=3, kernel_size=3, dilation=2, padding=2),
    dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),  # asymmetric padding
]


@pytest.mark.parametrize("conv", CONV_GEOMETRIES)
def test_conv_group_projections_match_unfolded_patches(conv):
    """ConvGroup's convolution-based projections (dense and rank-one) and J v (two layers stacked) equal
    the same products on the unfolded patches (``layer_inputs``, itself checked against explicit
    loops and against the convolution above)."""
    from kfac2l.curvature.fisher import ConvGroup, LayerGroup, capture_groups

    torch.manual_seed(0)
    layers = [nn.Conv2d(**conv).double() for _ in range(2)]
    xs = [torch.randn(3, 2, 7, 6, dtype=torch.float64) for _ in layers]
    gos = [torch.randn_like(m(x)) for m, x in zip(layers, xs)]
    (grp,) = capture_groups(layers, xs, gos)
    assert isinstance(grp, ConvGroup) and grp.indices == [0, 1]
    unfolded = LayerGroup([0, 1], torch.stack([layer_inputs(m, x) for m, x in zip(layers, xs)]),
                          torch.stack([layer_output_grads(m, go) for m, go in zip(layers, gos)]))
    assert grp.shape == unfolded.shape and grp.batch == 3
    assert_same_products(grp, unfolded)
    assert grp._a is None and grp._g is None  # none of the products above unfolded the patches
    assert rel(grp.a, unfolded.a) < 1e-14 and rel(grp.g, unfolded.g) < 1e-14


def test_conv_same_padding_reproduces_convolution():
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 4, padding="same").double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    w = torch.cat([layer.weight.reshape(3, -1), layer.bias[:, None]], 1)
    assert rel(layer_inputs(layer, x) @ w.T, layer_output_grads(layer, layer(x))) < 1e-13


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_kronecker_factors_match_explicit_sums(kind):
    p = Problem(kind)
    data = dense.layer_data(p.model, p.x, p.targets, p.likelihood)
    groups = group_layers([a for a, _ in data], [g for _, g in data])
    for grp in groups:
        A, G = batch_factors(grp.a, grp.g)
        for row, i in enumerate(grp.indices):
            A_ref, G_ref = dense.explicit_factors(*data[i])
            assert rel(A[row], A_ref) < 1e-13 and rel(G[row], G_ref) < 1e-13


def test_non_finite_factor_estimates_are_skipped_layer_by_layer():
    state = FactorState(decay=0.5)
    A = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    G = 2 * torch.eye(2, dtype=torch.float64).repeat(2, 1, 1)
    bad_a = A.clone()
    bad_a[1, 0, 0] = float("nan")
    state.update(bad_a, G)  # layer 1 is bad before any good estimate: zeros
    assert torch.equal(state.A[0], A[0]) and torch.equal(state.A[1], torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(state.G[1], torch.zeros(2, 2, dtype=torch.float64))
    state.update(3 * A, G * float("inf"))  # both layers bad now: unchanged
    assert torch.equal(state.A[0], A[0]) and torch.equal(state.G[0], G[0])
    state.update(3 * A, 3 * G)  # rho = min(1 - 1/3, 0.5) = 0.5
    assert torch.allclose(state.A[0], 2 * A[0], rtol=1e-14) and torch.allclose(state.A[1], 1.5 * A[1], rtol=1e-14)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_kfac_block_is_exact_fisher_block_for_one_sample(likelihood):
    """A single sample through a Linear layer: A (x) G equals the exact Fisher block (2.24-2.25)."""
    p = Problem("mlp", batch=1, likelihood=likelihood)
    J = dense.per_sample_jacobian(p.model, p.x, p.targets, likelihood)
    fisher = J.T @ J
    data = dense.layer_data(p.model, p.x, p.targets, likelihood)
    for (sl, O, I), (a, g) in zip(dense.layer_slices(p.model), data):
        A, G = batch_factors(a.unsqueeze(0), g.unsqueeze(0))
        assert rel(torch.kron(G[0], A[0]), fisher[sl, sl]) < 1e-12


def test_moving_average_weights():
    state = FactorState(decay=0.95)
    mats = [torch.full((1, 2, 2), float(k), dtype=torch.float64) for k in (1, 2, 3)]
    state.update(mats[0], mats[0])
    assert torch.allclose(state.A, mats[0], rtol=1e-14)
    state.update(mats[1], mats[1])  # rho = min(1 - 1/2, 0.95) = 0.5
    assert torch.allclose(state.A, torch.full((1, 2, 2), 1.5, dtype=torch.float64), rtol=1e-14)
    state.update(mats[2], mats[2])  # rho = 2/3
    assert torch.allclose(state.A, torch.full((1, 2, 2), 1.5 * 2 / 3 + 3 / 3, dtype=torch.float64), rtol=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("mode", ["pi", "factor", "exact"])
def test_kfac_step_matches_dense(kind, mode):
    p = Problem(kind)
    grad, _, kfac, _ = p.dense(LAM, mode)
    step = p.run(kfac2l.KFAC(p.model, damping=LAM, damping_mode=mode))
    assert rel(p.grad, grad) < 1e-13
    assert rel(step, torch.linalg.solve(kfac, grad)) < 1e-10


def _dense_fisher_and_groups(kind):
    """Explicit F_bullet, the library's layer groups of the same Fisher batch, and layer slices."""
    p = Problem(kind)
    _, fisher, _, data = p.dense(LAM)
    groups = group_layers([a for a, _ in data], [g for _, g in data])
    return fisher, groups, dense.layer_slices(p.model)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_fisher_vector_product_matches_dense(kind):
    fisher, groups, slices = _dense_fisher_and_groups(kind)
    u = torch.randn(3, fisher.shape[0], dtype=torch.float64)
    out = fisher_vector_product(groups, dense.to_layered(groups, slices, u), LAM)
    flat = dense.from_layered(groups, slices, out, fisher.shape[0])
    assert rel(flat, u @ fisher.T) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_scaled_fisher_product_hands_back_the_projections(kind):
    """s F_bullet u with s a device scalar, and the per-layer J_i^T u[i] it computed on the way,
    against the dense F and the per-sample gradients' Gram of (A5-A6)."""
    from kfac2l.curvature.fisher import fisher_product_and_projections, per_sample_projections

    fisher, groups, slices = _dense_fisher_and_groups(kind)
    u = torch.randn(2, fisher.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layered = dense.to_layered(groups, slices, u)
    out, proj = fisher_product_and_projections(groups, layered, LAM, torch.tensor(0.25, dtype=torch.float64))
    assert rel(dense.from_layered(groups, slices, out, fisher.shape[0]), 0.25 * u @ fisher.T) < 1e-12
    # J^T u summed over layers: (1/B) ||J^T u||^2 + lambda ||u||^2 = u^T F_bullet u
    jtu = sum(p.sum(0) for p in proj)
    quad = (jtu * jtu).sum(-1) / groups[0].batch + LAM * (u * u).sum(-1)
    assert rel(quad, ((u @ fisher) * u).sum(-1)) < 1e-12
    # known projections of the first column: the coarse operator's P is unchanged
    basis = [x.clone() for x in layered]
    known = [p[:, :1] for p in proj]
    full = per_sample_projections(groups, basis)
    assert rel(per_sample_projections(groups, basis, known=known), full) < 1e-14
    assert rel(per_sample_projections(groups, basis, known=proj), full) < 1e-14


@pytest.mark.parametrize("order", [2, 3])
def test_taylor_projects_each_column_once(monkeypatch, order):
    """A Taylor step of order q projects (J^T) q + 1 layered vectors per group: zeta_KFAC (for
    r_KFAC) and w_1 .. w_q; the products F_bullet w_j hand their projections to the coarse
    operator (without that, 2 q)."""
    from kfac2l.curvature.fisher import LayerGroup

    calls = []
    original = LayerGroup.project
    monkeypatch.setattr(LayerGroup, "project", lambda self, u: calls.append(u.shape[1]) or original(self, u))
    p = Problem("mlp")
    pre = kfac2l.TwoLevelKFAC(p.model, coarse_space="taylor", taylor_order=order, damping=LAM, cov_interval=5,
                              inv_interval=5, eigenbasis="always")
    p.run(pre)
    calls.clear()
    p.run(pre)
    assert sum(calls) == (order + 1) * len(pre.groups)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_coarse_operator_matches_dense(kind):
    """F_coarse = R0 F_bullet R0^T including the lambda V_i^T V_j terms (A15-A16)."""
    fisher, groups, slices = _dense_fisher_and_groups(kind)
    gen = torch.Generator().manual_seed(5)
    basis = [torch.randn(len(g.indices), 2, *g.shape, generator=gen, dtype=torch.float64) for g in groups]
    r0t = dense.basis_matrix(groups, slices, basis, fisher.shape[0])
    assert rel(coarse_operator(groups, basis, LAM), r0t.T @ fisher @ r0t) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_rank_one_basis_matches_its_dense_matrices(kind):
    """Factored columns u w^T give the same R0 F_bullet R0^T, block Gram, R0 u and R0^T beta."""
    fisher, groups, slices = _dense_fisher_and_groups(kind)
    gen = torch.Generator().manual_seed(7)
    factored = [RankOne(torch.randn(len(g.indices), 2, g.shape[0], generator=gen, dtype=torch.float64),
                        torch.randn(len(g.indices), 2, g.shape[1], generator=gen, dtype=torch.float64))
                for g in groups]
    full = [b.dense() for b in factored]
    r0t = dense.basis_matrix(groups, slices, full, fisher.shape[0])
    assert rel(coarse_operator(groups, factored, LAM), r0t.T @ fisher @ r0t) < 1e-12
    assert rel(block_gram(factored), r0t.T @ r0t) < 1e-12
    u = torch.randn(1, fisher.shape[0], dtype=torch.float64, generator=gen)
    assert rel(restrict(factored, dense.to_layered(groups, slices, u)), r0t.T @ u[0]) < 1e-12
    beta = torch.randn(r0t.shape[1], dtype=torch.float64, generator=gen)
    back = dense.from_layered(groups, slices, prolong(factored, beta), fisher.shape[0])
    assert rel(back[0], r0t @ beta) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("correction", ["multiplicative", "additive"])
def test_two_level_step_matches_dense(kind, space, correction):
    p = Problem(kind)
    grad, fisher, kfac, data = p.dense(LAM)
    pre = kfac2l.TwoLevelKFAC(p.model, coarse_space=space, correction=correction, damping=LAM)
    step = p.run(pre)
    basis = dense.explicit_coarse_basis(space, p.model, data, kfac, fisher, grad, LAM, "pi")
    assert rel(step, dense.two_level_step(kfac, fisher, grad, basis, correction)) < 1e-9


@pytest.mark.parametrize("mode", ["factor", "exact"])
@pytest.mark.parametrize("space", ["spectral", "krylov-residual", "taylor"])
def test_two_level_other_damping_modes(mode, space):
    p = Problem("cnn", likelihood="categorical")
    grad, fisher, kfac, data = p.dense(LAM, mode)
    step = p.run(kfac2l.TwoLevelKFAC(p.model, coarse_space=space, damping=LAM, damping_mode=mode))
    basis = dense.explicit_coarse_basis(space, p.model, data, kfac, fisher, grad, LAM, mode)
    assert rel(step, dense.two_level_step(kfac, fisher, grad, basis)) < 1e-9


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_two_level_other_likelihoods(likelihood):
    p = Problem("mlp", likelihood=likelihood)
    grad, fisher, kfac, data = p.dense(LAM)
    step = p.run(kfac2l.TwoLevelKFAC(p.model, coarse_space="krylov-nicolaides", damping=LAM))
    basis = dense.explicit_coarse_basis("krylov-nicolaides", p.model, data, kfac, fisher, grad, LAM, "pi")
    assert rel(step, dense.two_level_step(kfac, fisher, grad, basis)) < 1e-9


def test_spectral_vector_is_smallest_eigenvector_in_vec_order():
    p = Problem("cnn")
    _, _, kfac, _ = p.dense(LAM)
    pre = kfac2l.TwoLevelKFAC(p.model, coarse_space="spectral", damping=LAM)
    p.run(pre)
    slices = dense.layer_slices(p.model)
    for grp, k in zip(pre.groups, pre.kron):
        vecs = k.smallest_eigenvector()
        for row, i in enumerate(grp.indices):
            sl = slices[i][0]
            v = vecs[row].reshape(-1)
            block = kfac[sl, sl]
            smallest = torch.linalg.eigvalsh(block)[0]
            assert rel(block @ v, smallest * v) < 1e-10


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_full_coarse_space_gives_exact_natural_gradient(kind):
    p = Problem(kind)
    grad, fisher, _, _ = p.dense(LAM)
    step = p.run(kfac2l.TwoLevelKFAC(p.model, coarse_space="full", damping=LAM))
    assert rel(step, torch.linalg.solve(fisher, grad)) < 1e-9


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_exact_natural_gradient_matches_dense(kind, batch):
    p = Problem(kind, batch=batch)
    grad, fisher, _, _ = p.dense(LAM)
    step = p.run(kfac2l.ExactNGD(p.model, damping=LAM))
    assert rel(step, torch.linalg.solve(fisher, grad)) < 1e-9


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_previous_matches_dense_kronecker_coarse_operator(kind):
    p = Problem(kind)
    grad, fisher, kfac, data = p.dense(LAM)
    pre = kfac2l.PreviousKFAC(p.model, damping=LAM)
    step = p.run(pre)
    basis = dense.explicit_coarse_basis("nicolaides", p.model, data, kfac, fisher, grad, LAM, "pi")
    op = dense.previous_coarse_operator(data, LAM, "pi")
    assert rel(step, dense.two_level_step(kfac, fisher, grad, basis, "additive", op)) < 1e-10


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("space", SPACES)
def test_multiplicative_never_increases_error_and_gap_is_true_difference(seed, space):
    """(3.19) holds, and eq. (4.6) equals E(beta*) - E(0) computed with the exact step."""
    p = Problem("cnn" if seed % 2 else "mlp", seed=seed)
    grad, fisher, kfac, _ = p.dense(LAM)
    pre = kfac2l.TwoLevelKFAC(p.model, coarse_space=space, damping=LAM, exact_reference=True)
    step = p.run(pre)
    d = pre.diagnostics
    exact = torch.linalg.solve(fisher, grad)
    zk = torch.linalg.solve(kfac, grad)
    e0 = (zk - exact) @ fisher @ (zk - exact)
    e1 = (step - exact) @ fisher @ (step - exact)
    assert e1 <= e0 * (1 + 1e-12)
    assert d["dist_two_level"] <= d["dist_kfac"] * (1 + 1e-12)
    assert abs(d["dist_kfac"] - e0.item()) < 1e-9 * e0.item()
    assert abs(d["dist_two_level"] - e1.item()) < 1e-9 * max(e0.item(), 1e-12)
    assert abs(d["gap"] - (e1 - e0).item()) < 1e-9 * e0.item()


def test_additive_gap_is_true_difference():
    p = Problem("mlp")
    pre = kfac2l.TwoLevelKFAC(p.model, coarse_space="residual", correction="additive", damping=LAM,
                              exact_reference=True)
    p.run(pre)
    d = pre.diagnostics
    assert abs(d["gap"] - (d["dist_two_level"] - d["dist_kfac"])) < 1e-9 * d["dist_kfac"]


def test_coarse_scale_scales_the_correction():
    grads = []
    for c in (1.0, 0.5, 0.0):
        p = Problem("mlp")
        grads.append(p.run(kfac2l.TwoLevelKFAC(p.model, coarse_space="residual", damping=LAM, coarse_scale=c)))
    assert rel(grads[1], 0.5 * (grads[0] + grads[2])) < 1e-12
    p = Problem("mlp")
    assert rel(grads[2], p.run(kfac2l.KFAC(p.model, damping=LAM))) < 1e-12


def test_batchnorm_keeps_plain_gradient_and_intervals():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    pre = kfac2l.KFAC(model, damping=0.1, cov_interval=3, inv_interval=3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pattern = []
    for _ in range(6):
        pattern.append(pre.needs_curvature())
        model.zero_grad()
        if pattern[-1]:
            pre.update_curvature(model(x))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        bn_grad = model[1].weight.grad.clone()
        pre.step()
        assert torch.equal(model[1].weight.grad, bn_grad)
    assert pattern == [True, False, False, True, False, False]


def test_forward_passes_are_captured_only_while_a_fisher_batch_is_wanted():
    """Between factor refreshes KFAC captures nothing and update_curvature costs nothing; after
    the Fisher batch is taken, the main forward pass is not captured either."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pre = kfac2l.KFAC(model, damping=0.1, cov_interval=2, inv_interval=2)
    captured = []
    for _ in range(4):
        out = model(x)
        captured.append(all(o is not None for o in pre.capture.outputs))
        pre.update_curvature(out)  # called every step, as in the README's loop
        model(x)  # a second forward after the Fisher batch was taken
        assert all(o is None for o in pre.capture.outputs)
        nn.functional.cross_entropy(out, y).backward()
        pre.step()
    assert captured == [True, False, True, False]
    assert pre.factors[0].updates == 2
    with pytest.raises(RuntimeError, match="already taken"):
        model(x)
        pre.update_curvature(model(x))
        pre.update_curvature(model(x))


def test_two_level_requires_fresh_fisher_batch():
    p = Problem("mlp")
    pre = kfac2l.TwoLevelKFAC(p.model, damping=LAM)
    p.run(pre)
    loss = summed_nll(p.model(p.x), p.labels, p.likelihood)
    loss.backward()
    with pytest.raises(RuntimeError, match="update_curvature"):
        pre.step()


def test_singular_coarse_operator_falls_back_without_nan():
    """Exact damping makes 1 an eigenvector of the softmax output layer's block, so the Krylov
    Nicolaides columns are collinear: the solve must fall back and still give a finite step."""
    p = Problem("mlp")
    grad, fisher, kfac, data = p.dense(LAM, "exact")
    pre = kfac2l.TwoLevelKFAC(p.model, coarse_space="krylov-nicolaides", damping=LAM, damping_mode="exact",
                              diagnostics=True)
    step = p.run(pre)
    assert torch.isfinite(step).all()
    basis = dense.explicit_coarse_basis("krylov-nicolaides", p.model, data, kfac, fisher, grad, LAM, "exact")
    # float64, but the coarse operator is singular to round-off (kappa ~ 1e16), so eps * kappa bounds
    # nothing: the step R0^T beta is unique in exact arithmetic, and the library's fallback and the
    # reference's least squares reach it by different routes (about 1e-9 apart on this machine);
    # 1e-6 asserts "the same step", far below the O(1) difference of a wrong fallback
    assert rel(step, dense.two_level_step(kfac, fisher, grad, basis)) < 1e-6


@pytest.mark.parametrize(
    "space, options, solves",
    [("nicolaides", {}, 1), ("spectral", {}, 1), ("krylov-nicolaides", {}, 1), ("residual", {}, 2),
     ("krylov-residual", {}, 3), ("taylor", {"taylor_order": 3}, 4)],
)
@pytest.mark.parametrize("eigenbasis", ["never", "always"])
def test_kronecker_solves_per_step_are_counted_honestly(monkeypatch, space, options, solves, eigenbasis):
    """``kronecker_solves`` (the bench's floor) equals the dense passes of a step between inverse
    refreshes (K^{-1} applications, rotations into and out of the eigenbasis), counted on the real
    code: in the eigenbasis every per-step space costs two, whatever its polynomial order."""
    from kfac2l.curvature.kronecker import DampedKronecker

    calls = []
    for method in ("apply_inverse", "rotate_in", "rotate_out"):
        original = getattr(DampedKronecker, method)
        monkeypatch.setattr(DampedKronecker, method,
                            lambda self, u, original=original, **kw: calls.append(1) or original(self, u, **kw))
    p = Problem("mlp")
    pre = kfac2l.TwoLevelKFAC(p.model, coarse_space=space, damping=LAM, cov_interval=5, inv_interval=5,
                              eigenbasis=eigenbasis, **options)
    p.run(pre)
    calls.clear()
    p.run(pre)
    expected = 2 if (eigenbasis == "always" and not pre.space.static) else solves
    assert pre.kronecker_solves == expected
    assert len(calls) == expected * len(pre.groups)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("space", ["residual", "krylov-residual", "taylor"])
@pytest.mark.parametrize("mode", ["pi", "factor", "exact"])
def test_eigenbasis_route_gives_the_dense_step(kind, space, mode):
    """The polynomial spaces computed in the Kronecker eigenbasis (Linear groups; convolutions and
    Linear layers on 3-D inputs keep the dense route) equal the dense construction, both
    corrections, with the gap diagnostic."""
    for correction in ("multiplicative", "additive"):
        p = Problem(kind)
        grad, fisher, kfac, data = p.dense(LAM, mode)
        pre = kfac2l.TwoLevelKFAC(p.model, coarse_space=space, correction=correction, damping=LAM,
                                  damping_mode=mode, eigenbasis="always", exact_reference=True, taylor_order=3)
        step = p.run(pre)
        assert kind != "mlp" or all(pre._rotated)
        basis = dense.explicit_coarse_basis(space, p.model, data, kfac, fisher, grad, LAM, mode, taylor_order=3)
        assert rel(step, dense.two_level_step(kfac, fisher, grad, basis, correction)) < 1e-9
        exact = torch.linalg.solve(fisher, grad)
        zk = torch.linalg.solve(kfac, grad)
        e0, e1 = [((z - exact) @ fisher @ (z - exact)).item() for z in (zk, step)]
        assert abs(pre.diagnostics["gap"] - (e1 - e0)) < 1e-9 * e0
        assert abs(pre.diagnostics["dist_two_level"] - e1) < 1e-9 * e0


def test_non_finite_coarse_operator_gives_zero_correction():
    from kfac2l.curvature.coarse import solve_coarse

    op = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]], dtype=torch.float64)
    beta, failed = solve_coarse(op, torch.ones(2, dtype=torch.float64))
    assert torch.equal(beta, torch.zeros(2, dtype=torch.float64)) and failed.item() == 2
    beta, failed = solve_coarse(torch.eye(2, dtype=torch.float64) * 2, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(beta, torch.full((2,), 0.5, dtype=torch.float64)) and failed.item() == 0


def test_verify_self_check_passes_and_fails_on_a_tight_tolerance(capsys):
    """``python -m kfac2l.verify`` exits 0 with every check passing, and non-zero when the
    tolerance is below float64 round-off (so a failure would be reported)."""
    import json

    from kfac2l.verify import main

    assert main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and len(report["checks"]) >= 40
    assert {r["network"] for r in report["checks"]} == {"mlp", "cnn", "seq", "tied"}
    assert main(["--tol", "1e-30"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("correction", ["multiplicative", "additive"])
def test_gap_identities_with_the_f_orthogonal_projector(kind, correction):
    """docs/gap.md: with Pi = R0^T F_c^-1 R0 F_bullet (F_bullet-orthogonal projector onto the coarse
    space) and e = zeta - zeta_KFAC, the gap (4.6) is -||Pi e||^2 for the multiplicative correction
    and ||Pi zeta_KFAC||^2 - ||Pi e||^2 for the additive one (F_bullet-norms)."""
    p = Problem(kind)
    pre = kfac2l.TwoLevelKFAC(p.model, coarse_space="nicolaides", correction=correction, damping=LAM,
                              diagnostics=True)
    proj, pe, pk = _nicolaides_projector_norms(p, pre)
    expected = -pe if correction == "multiplicative" else pk - pe
    assert abs(pre.diagnostics["gap"] - expected) < 1e-9 * max(abs(expected), pe)
    assert torch.allclose(proj @ proj, proj, atol=1e-9)  # a projector


def _nicolaides_projector_norms(p, pre):
    """Run ``pre`` one step on ``p``; then, densely in float64, the F_bullet-orthogonal projector Pi
    onto the Nicolaides space, ||Pi e||^2 with e = zeta - zeta_KFAC, and ||Pi zeta_KFAC||^2."""
    grad, fisher, kfac, data = p.dense(LAM)
    p.run(pre)
    r0t = dense.explicit_coarse_basis("nicolaides", p.model, data, kfac, fisher, grad, LAM, "pi")
    proj = r0t @ torch.linalg.solve(r0t.T @ fisher @ r0t, r0t.T @ fisher)
    zeta, zeta_kfac = torch.linalg.solve(fisher, grad), torch.linalg.solve(kfac, grad)

    def norm2(u):
        return (u @ fisher @ u).item()

    return proj, norm2(proj @ (zeta - zeta_kfac)), norm2(proj @ zeta_kfac)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_previous_records_the_papers_tko_gap_at_the_exact_operator_beta(kind):
    """PREVIOUS steps with the Kronecker coarse operator (3.18); its ``gap_exact_operator`` is the
    gap (4.6) at the paper's beta_TKO = (R0 F_bullet R0^T)^-1 R0 g (4.7b), which by docs/gap.md is
    ||Pi zeta_KFAC||^2 - ||Pi e||^2 (the additive identity of the exact operator), built densely."""
    p = Problem(kind)
    pre = kfac2l.PreviousKFAC(p.model, damping=LAM, diagnostics=True)
    _, pe, pk = _nicolaides_projector_norms(p, pre)
    expected = pk - pe
    assert abs(pre.diagnostics["gap_exact_operator"] - expected) < 1e-9 * max(abs(expected), pe)


def _float32_twin(kind):
    """A float64 problem whose weights and inputs are float32-representable, and its float32 twin."""
    p = Problem(kind)
    with torch.no_grad():
        for q in p.model.parameters():
            q.copy_(q.float().double())
    p.x = p.x.float().double()
    twin = Problem(kind)
    twin.model, twin.x = copy.deepcopy(p.model).float(), p.x.float()
    return p, twin


def _largest_block_dim(model) -> int:
    """max over preconditioned layers of O + I: the inner dimensions of a Kronecker-factored solve."""
    return max(O + I for _, O, I in dense.layer_slices(model))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("space", ["nicolaides", "spectral", "residual", "krylov-nicolaides", "krylov-residual",
                                   "taylor"])
def test_float32_step_and_invariants(kind, space):
    """In float32 (inputs and weights exactly those of the float64 problem): the two-level step is
    within the derived bound ``tol`` of the float64 dense construction, the multiplicative
    correction does not increase the true F_bullet-error (eq. 3.19) beyond what that step error
    allows, and the recorded gap (4.6) is not positive beyond tol e0.

    tol = float32_solve_tolerance over the stages of the step: K^{-1} (kappa of F_bullet KFAC),
    products with F_bullet in r_KFAC and the polynomial columns (kappa of F_bullet), and the coarse
    solve (kappa of R0 F_bullet R0^T on unit columns, the system ``solve_coarse`` solves)."""
    p, twin = _float32_twin(kind)
    grad, fisher, kfac, data = p.dense(LAM)
    r0t = dense.explicit_coarse_basis(space, p.model, data, kfac, fisher, grad, LAM, "pi")
    reference = dense.two_level_step(kfac, fisher, grad, r0t, "multiplicative")
    pre = kfac2l.TwoLevelKFAC(twin.model, coarse_space=space, damping=LAM, diagnostics=True)
    step = twin.run(pre).double()
    unit = r0t / r0t.norm(dim=0)
    kappas = [condition_number(kfac), condition_number(fisher), condition_number(unit.T @ fisher @ unit)]
    tol = float32_solve_tolerance(kappas, _largest_block_dim(p.model))
    assert rel(step, reference) < tol
    exact, zk = torch.linalg.solve(fisher, grad), torch.linalg.solve(kfac, grad)
    e0 = ((zk - exact) @ fisher @ (zk - exact)).item()
    e1 = ((step - exact) @ fisher @ (step - exact)).item()
    # sqrt(e1) <= sqrt(e1 of the reference) + ||step - reference||_F, and the reference obeys (3.19)
    f_norm_of_step_error = torch.linalg.eigvalsh(fisher)[-1].sqrt().item() * tol * reference.norm().item()
    assert e1**0.5 <= e0**0.5 + f_norm_of_step_error
    # the gap is -||Pi e||_F^2 with terms bounded by e0; their float32 rounding stays within tol e0
    assert pre.diagnostics["gap"] <= tol * e0


def test_float32_two_level_equals_kfac_where_kfac_is_exact():
    """One sample, one Linear layer, damping A (x) G + lambda I: F_KFAC = F_bullet exactly, so
    r_KFAC = 0 and the two-level step must be the KFAC step; in float32 the static-basis
    right-hand side cancels (it is assembled in float64).

    The bound: kappa = (lambda_max(F) + lambda) / lambda of the dense float64 Fisher of this
    one-sample problem (from autograd). The two float32 steps are each compared with the exact
    solution x: KFAC is one Kronecker-factored solve (kappa; inner dimensions O + I); the two-level
    step adds the F_bullet product of r_KFAC (kappa) and a 1 x 1 coarse solve (kappa 1). Hence
    ||nico - kfac|| / ||x|| <= float32_solve_tolerance([kappa, kappa, kappa, 1], O + I)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x = torch.randn(1, 6)
    label = torch.tensor([1])
    steps = {}
    for name, pre in (("kfac", kfac2l.KFAC(model, damping=1e-3, damping_mode="exact")),
                      ("nico", kfac2l.TwoLevelKFAC(model, coarse_space="nicolaides", damping=1e-3,
                                                   damping_mode="exact"))):
        model.zero_grad()
        out = model(x)
        pre.update_curvature(out, targets=label)
        torch.nn.functional.cross_entropy(out, label).backward()
        pre.step()
        pre.remove()
        steps[name] = torch.cat([model.weight.grad.flatten(), model.bias.grad])
    exact_model = copy.deepcopy(model).double()
    J = dense.per_sample_jacobian(exact_model, x.double(), label, "categorical")
    kappa = condition_number(J.T @ J + 1e-3 * torch.eye(J.shape[1], dtype=torch.float64))
    O, I = 4, 6 + 1
    tol = float32_solve_tolerance([kappa, kappa, kappa, 1.0], O + I)
    assert rel(steps["nico"].double(), steps["kfac"].double()) < tol


def test_previous_on_convolutions_is_consistent_with_the_kfac_diagonal():
    """Two convolutions with different numbers of locations, one sample whose patches and output
    gradients are constant over locations (constant input, valid 3x3 then 1x1 convolutions,
    global average pooling): there KFAC's independence is exact, and the (i, i) entry of the
    cross-term formula of PREVIOUS equals 1^T (A_i (x) G_i) 1 of the convolution factors."""
    from kfac2l.curvature.coarse import nicolaides_sums
    from kfac2l.curvature.kronecker import batch_factors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Conv2d(3, 2, 1), torch.nn.Tanh(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 3)).double()
    x = torch.ones(1, 2, 6, 6, dtype=torch.float64) * torch.tensor([0.3, -0.7], dtype=torch.float64).view(1, 2, 1, 1)
    pre = kfac2l.PreviousKFAC(model, damping=LAM)
    pre.update_curvature(model(x), targets=torch.tensor([2]))
    convs = [g for g in pre.groups if g.locations > 1]
    assert sorted(g.locations for g in convs) == [16, 16]  # 6x6 -> 4x4 (valid 3x3) -> 4x4 (1x1)
    for grp in convs:
        alpha, gamma = nicolaides_sums(grp.a, grp.g)
        A, G = batch_factors(grp.a, grp.g)
        kfac_diagonal = A.sum((-1, -2)) * G.sum((-1, -2))  # 1^T (A (x) G) 1 per layer
        assert torch.allclose((alpha * gamma) ** 2, kfac_diagonal.unsqueeze(1), rtol=1e-12)
