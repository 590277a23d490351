"""Shared modules (a module called several times in one forward pass): its calls are more
locations of one layer (the "expand" view of Eschenhagen et al. 2023), in KFAC, every coarse
space, PREVIOUS, the exact natural gradient and the dense oracle. References: explicit per-call
forward passes and per-sample gradients from autograd, one sample at a time (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_products, rel
from torch import nn

import kfac2l
import kfac2l.dense as dense
from kfac2l.curvature.fisher import ConvGroup, LayerGroup, capture_groups
from kfac2l.curvature.layers import layer_inputs, layer_output_grads, preconditioned_layers
from kfac2l.curvature.likelihood import sample_targets, summed_nll
from kfac2l.curvature.spaces import COARSE_SPACES

LAM, BATCH = 0.1, 8
EPS = torch.finfo(torch.float64).eps


class LinearTwice(nn.Module):
    """The measured example of issue 16: head(tanh(lin(tanh(lin(x)))))."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def _problem(model, shape, seed=1):
    """Inputs, sampled Fisher targets and training labels for ``model`` (float64)."""
    x = torch.randn(BATCH, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x)
    targets = sample_targets(out, "categorical", torch.Generator().manual_seed(seed + 1))
    labels = sample_targets(out, "categorical", torch.Generator().manual_seed(seed + 2))
    return x, targets, labels


def _flat(model, grads: dict) -> torch.Tensor:
    """The library's vector order: each preconditioned layer's [W | b] matrix, row-major."""
    parts = []
    for name, m in preconditioned_layers(model):
        w = grads[f"{name}.weight"]
        mat = w.reshape(w.shape[0], -1)
        if m.bias is not None:
            mat = torch.cat([mat, grads[f"{name}.bias"].unsqueeze(1)], dim=1)
        parts.append(mat.reshape(-1))
    return torch.cat(parts)


def _autograd_reference(model, x, targets, labels):
    """(g, F_bullet) with J from autograd one sample at a time: the per-sample gradient of a
    shared weight is whatever autograd sums over its calls."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def grad_of(loss):
        return _flat(model, dict(zip(names, torch.autograd.grad(loss, params))))

    rows = [grad_of(summed_nll(model(x[b : b + 1]), targets[b : b + 1], "categorical")) for b in range(BATCH)]
    J = torch.stack(rows)
    g = grad_of(summed_nll(model(x), labels, "categorical") / BATCH)
    return g, J.T @ J / BATCH + LAM * torch.eye(J.shape[1], dtype=J.dtype)


def _step(model, pre, x, targets, labels) -> torch.Tensor:
    model.zero_grad()
    out = model(x)
    pre.update_curvature(out, targets=targets)
    (summed_nll(out, labels, "categorical") / BATCH).backward()
    pre.step()
    return dense.flat_grad(model).clone()


def test_kfac_factors_of_a_module_called_twice_sum_over_its_calls():
    """The measured example: A and G of ``lin`` are those of its two calls together, A =
    (1/B) sum_c sum_b abar abar^T and G = (1/(2B)) sum_c sum_b g g^T (a length-2 sequence),
    from an explicit functional forward pass; not the second call's alone (the old behaviour)."""
    torch.manual_seed(0)
    model = LinearTwice().double()
    x, targets, _ = _problem(model, (4,))
    W, b = model.lin.weight, model.lin.bias
    s1 = F.linear(x, W, b)
    s2 = F.linear(torch.tanh(s1), W, b)
    out = model.head(torch.tanh(s2))
    g1, g2 = torch.autograd.grad(summed_nll(out, targets, "categorical"), (s1, s2))
    ones = torch.ones(BATCH, 1, dtype=torch.float64)
    a1, a2 = torch.cat([x, ones], 1), torch.cat([torch.tanh(s1).detach(), ones], 1)
    A = (a1.T @ a1 + a2.T @ a2) / BATCH
    G = (g1.T @ g1 + g2.T @ g2) / (2 * BATCH)

    pre = kfac2l.KFAC(model, damping=LAM)
    pre.update_curvature(model(x), targets=targets)
    (group,) = [n for n, grp in enumerate(pre.groups) if grp.indices == [0]]
    assert pre.groups[group].locations == 2
    summed_nll(model(x), targets, "categorical").backward()
    pre.step()  # the Fisher batch is folded into the factors by the step (first refresh: no averaging)
    assert rel(pre.factors[group].A[0], A) < 1e-14 and rel(pre.factors[group].G[0], G) < 1e-14
    assert rel(pre.factors[group].A[0], a2.T @ a2 / BATCH) > 0.1  # the last call alone is far off


def _sequential_twice() -> nn.Module:
    """The measured example written with one module object twice in an nn.Sequential."""
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("build", [LinearTwice, _sequential_twice])
def test_exact_ngd_of_a_shared_module_is_the_dense_natural_gradient(build):
    """ExactNGD on the measured example equals (F + lambda I)^-1 g with F from autograd
    per-sample gradients (float64; tolerance: eps times the conditioning of F_bullet)."""
    torch.manual_seed(0)
    model = build().double()
    x, targets, labels = _problem(model, (4,))
    g, fisher = _autograd_reference(model, x, targets, labels)
    reference = torch.linalg.solve(fisher, g)
    step = _step(model, kfac2l.ExactNGD(model, damping=LAM), x, targets, labels)
    assert rel(step, reference) < 100 * EPS * torch.linalg.cond(fisher).item()


class CalledPerPosition(nn.Module):
    """``lin`` called once per position of a (B, 2, 3) input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(self.lin(x[:, 0])), torch.tanh(self.lin(x[:, 1]))], dim=1))


class OnSequence(CalledPerPosition):
    """The same function with ``lin`` called once on the length-2 sequence."""

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).flatten(1))


PRECONDITIONERS = {
    "kfac": lambda m: kfac2l.KFAC(m, damping=LAM),
    "kfac-unit-pi": lambda m: kfac2l.KFAC(m, damping=LAM, damping_mode="unit_pi"),
    "ngd": lambda m: kfac2l.ExactNGD(m, damping=LAM),
    "previous": lambda m: kfac2l.PreviousKFAC(m, damping=LAM),
    "previous-multiplicative": lambda m: kfac2l.PreviousKFAC(m, damping=LAM, correction="multiplicative"),
    **{f"{space}-{corr}": (lambda m, s=space, c=corr: kfac2l.TwoLevelKFAC(m, coarse_space=s, correction=c, damping=LAM))
       for space in COARSE_SPACES for corr in ("multiplicative", "additive")},
}


@pytest.mark.parametrize("name", list(PRECONDITIONERS))
def test_a_module_called_twice_steps_like_a_linear_on_a_length_two_sequence(name):
    """Every preconditioner (every coarse space, both corrections, PREVIOUS, ExactNGD) takes the
    same steps, two in a row (moving averages, cached static bases), whether ``lin`` is called on
    each position or once on the sequence."""
    torch.manual_seed(0)
    twice = CalledPerPosition().double()
    once = OnSequence().double()
    once.load_state_dict(twice.state_dict())
    x, targets, labels = _problem(twice, (2, 3))
    pres = [PRECONDITIONERS[name](m) for m in (twice, once)]
    for _ in range(2):
        steps = [_step(m, pre, x, targets, labels) for m, pre in zip((twice, once), pres)]
        assert rel(*steps) < 1e-13, name
        for m in (twice, once):
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(0.1 * p.grad)


def test_conv_group_of_a_conv_called_on_two_sizes_is_its_unfolded_locations():
    """A Conv2d called on 7x6 and 5x4 maps: the ConvGroup's convolution-based products equal
    those of the patches of both calls concatenated (one layer, T = T_1 + T_2)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    xs = [torch.randn(4, 2, 7, 6, dtype=torch.float64), torch.randn(4, 2, 5, 4, dtype=torch.float64)]
    gos = [torch.randn_like(conv(x)) for x in xs]
    (grp,) = capture_groups([conv], [xs], [gos])
    a = torch.cat([layer_inputs(conv, x) for x in xs], dim=1)
    g = torch.cat([layer_output_grads(conv, go) for go in gos], dim=1)
    unfolded = LayerGroup([0], a.unsqueeze(0), g.unsqueeze(0))
    assert isinstance(grp, ConvGroup) and grp.locations == a.shape[1] == 12 + 6 and grp.batch == 4
    assert_same_products(grp, unfolded)
    assert grp._a is None and grp._g is None  # the products went through convolutions, call by call
    assert torch.equal(grp.a, unfolded.a) and torch.equal(grp.g, unfolded.g)


def test_dense_oracle_and_verify_cover_a_tied_net():
    """The oracle's per-sample Jacobian of ``dense.TiedNet`` (a Conv2d and a Linear each called
    twice) is autograd's, one sample at a time, and every check of ``kfac2l.verify`` passes on it."""
    from kfac2l.verify import checks

    p = dense.Problem("tied")
    J = dense.per_sample_jacobian(p.model, p.x, p.targets, p.likelihood)
    names = [n for n, _ in p.model.named_parameters()]
    for b in range(p.x.shape[0]):
        loss = summed_nll(p.model(p.x[b : b + 1]), p.targets[b : b + 1], p.likelihood)
        row = _flat(p.model, dict(zip(names, torch.autograd.grad(loss, list(p.model.parameters())))))
        assert rel(J[b], row) < 1e-13
    failed = {name: err for name, err in checks("tied") if not err < 1e-9}
    assert not failed


def test_only_the_latest_forward_pass_is_captured():
    """Two forward passes before update_curvature: the calls of the last one only (a shared module
    never mixes calls of two passes)."""
    torch.manual_seed(0)
    model = LinearTwice().double()
    x, targets, _ = _problem(model, (4,))
    factors = []
    for passes in (1, 2):
        pre = kfac2l.KFAC(model, damping=LAM)
        for _ in range(passes - 1):
            model(2 * x)
        pre.update_curvature(model(x), targets=targets)
        factors.append((pre.groups[0].a.clone(), pre.groups[0].g.clone()))  # what the Fisher batch captured
        pre.remove()
    assert all(torch.equal(p, q) for p, q in zip(*factors))


def test_calls_on_different_batch_sizes_are_refused():
    class Halves(LinearTwice):
        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x))[: x.shape[0] // 2])))

    model = Halves().double()
    pre = kfac2l.KFAC(model, damping=LAM)
    with pytest.raises(RuntimeError, match=r"layer 'lin' was called 2 times .* sizes \[8, 4\]"):
        pre.update_curvature(model(torch.randn(BATCH, 4, dtype=torch.float64)))


def test_a_parameter_tied_between_two_modules_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match=r"layer '0' shares its parameter '0.weight' with \['2.weight'\]"):
        kfac2l.KFAC(model)
    kfac2l.KFAC(model, exclude=["0", "2"])  # left out: plain gradients, nothing to refuse
