"""kfac2l against an independent implementation: curvlinops' KFACLinearOperator and
KFACInverseLinearOperator (curvlinops-for-pytorch 3.x, the ``dev`` extra), all in float64.

The conventions that relate the two (docs/library.md, "Conventions against curvlinops"), with
B samples, T locations of a layer, curvlinops' losses summed (``reduction="sum"``):

* A_kfac2l = T A_curvlinops;  G_kfac2l = G_curvlinops / (B T h), with h = 1 for cross-entropy and
  BCE, and for MSE (curvlinops' loss is sum (f - y)^2, kfac2l's 0.5 ||f - y||^2) h = 2 under the
  type-2 Fisher and h = 4 under the empirical one; hence kfac2l's block is the curvlinops block
  divided by B h, and kfac2l's preconditioned gradient is B h times curvlinops' one with the
  damping mapped as in ``peer_damping``;
* kfac2l's block is kron(G, A) on the row-major [W | b] of each layer; curvlinops orders a layer's
  parameters as W.flatten() then b (``separate_weight_and_bias=False`` keeps one joint block).

kfac2l's Fisher batch uses targets sampled once; curvlinops' type-2 Fisher is the exact
expectation over the targets, so it is compared with the expectation of kfac2l's factor estimate
computed by enumerating the targets (categorical, Bernoulli) or an exact quadrature of
E[eps eps^T] = I (Gaussian). The empirical Fisher with kfac2l's sampled targets is the same
quantity on both sides, so the preconditioned gradients are compared there.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import kfac2l
import kfac2l.dense as dense
from kfac2l.curvature.layers import matrix_shape, preconditioned_layers
from kfac2l.curvature.likelihood import sample_targets, summed_nll

with warnings.catch_warnings():  # its dependencies' import-time deprecation warnings (torch.jit.script)
    warnings.simplefilter("ignore", FutureWarning)
    curvlinops = pytest.importorskip("curvlinops")
from curvlinops import FisherType, KFACInverseLinearOperator, KFACLinearOperator  # noqa: E402

LAM = 0.1
BATCH = 4
TOL = 1e-10  # float64 throughout (a float64 tolerance; the worst difference measured is below 1e-14)


def peer_cnn(seed: int = 0) -> nn.Module:
    """Stride and padding, then dilation with 'same' padding (symmetric: curvlinops refuses the
    asymmetric 'same' of an even effective kernel), then a Linear layer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(3, 2, 3, dilation=2, padding="same"), nn.Tanh(),
                         nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()


MODELS = {"mlp": (dense.tiny_mlp, (5,)), "cnn": (peer_cnn, (2, 5, 5)), "seq": (dense.tiny_seq, (3, 5))}
# kfac2l likelihood, curvlinops loss, h under the type-2 and under the empirical Fisher
LOSSES = {"ce": ("categorical", nn.CrossEntropyLoss, 1.0, 1.0),
          "mse": ("gaussian", nn.MSELoss, 2.0, 4.0),
          "bce": ("bernoulli", nn.BCEWithLogitsLoss, 1.0, 1.0)}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def setup(kind: str, loss: str):
    """Model, inputs and targets sampled from the model (kfac2l's Fisher batch)."""
    make, shape = MODELS[kind]
    model = make(0)
    x = torch.randn((BATCH, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = sample_targets(model(x), LOSSES[loss][0], torch.Generator().manual_seed(2))
    return model, x, y.double() if loss != "ce" else y


def locations(model, x) -> list[int]:
    """T of each preconditioned layer (spatial positions, or leading positions of a 3-D input)."""
    layers = [m for _, m in preconditioned_layers(model)]
    sizes = {}
    handles = [m.register_forward_hook(lambda mod, i, o, k=k: sizes.__setitem__(k, o[0, 0].numel()
                                       if isinstance(mod, nn.Conv2d) else o.shape[1:-1].numel()))
               for k, m in enumerate(layers)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [sizes[k] for k in range(len(layers))]


def kfac2l_run(model, x, y, likelihood, mode="pi"):
    """One KFAC step on the Fisher batch (x, y): per-layer (A, G) and (gradient, step), flat in
    kfac2l's order; the gradient is that of the summed loss over B (the training loss)."""
    pre = kfac2l.KFAC(model, damping=LAM, damping_mode=mode)
    model.zero_grad()
    out = model(x)
    pre.update_curvature(out, likelihood, targets=y)
    (summed_nll(out, y, likelihood) / x.shape[0]).backward()
    grad = dense.flat_grad(model).clone()
    pre.step()
    pre.remove()
    factors = {}
    for indices, state in zip(pre.group_indices, pre.factors):
        for row, i in enumerate(indices):
            factors[i] = (state.A[row].clone(), state.G[row].clone())
    return [factors[i] for i in range(len(factors))], grad, dense.flat_grad(model).clone()


def expected_kfac2l_factors(model, x, likelihood):
    """E over the sampled targets of kfac2l's G estimate (and its A), exactly: per sample, the
    targets enumerated with their probabilities (categorical, Bernoulli), or y = f + sqrt(C) e_c with
    weight 1/C, c = 1..C, for the Gaussian (g is linear in y - f and sum_c e_c e_c^T = I = E[eps eps^T])."""
    total = None
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        with torch.no_grad():
            out = model(xb)
        C = out.shape[1]
        if likelihood == "categorical":
            probs = out.softmax(1)[0]
            cases = [(torch.tensor([c]), probs[c]) for c in range(C)]
        elif likelihood == "bernoulli":
            p = out.sigmoid()[0]
            cases = [(torch.tensor([bits], dtype=torch.float64),
                      torch.prod(torch.where(torch.tensor(bits, dtype=torch.bool), p, 1 - p)))
                     for bits in itertools.product([0.0, 1.0], repeat=C)]
        else:
            cases = [(out + math.sqrt(C) * torch.eye(C, dtype=torch.float64)[c], 1.0 / C) for c in range(C)]
        for target, weight in cases:
            factors, _, _ = kfac2l_run(model, xb, target, likelihood)
            scaled = [(A * weight / x.shape[0], G * weight / x.shape[0]) for A, G in factors]
            total = scaled if total is None else [(a + sa, g + sg) for (a, g), (sa, sg) in zip(total, scaled)]
    return total


def peer_operator(model, x, y, loss, fisher_type, params=None):
    """curvlinops' KFAC of the summed loss, weight and bias in one block per layer."""
    return KFACLinearOperator(model, LOSSES[loss][1](reduction="sum"),
                              list(model.parameters()) if params is None else params, [(x, y)],
                              fisher_type=fisher_type, separate_weight_and_bias=False,
                              check_deterministic=False, num_data=x.shape[0], num_per_example_loss_terms=1)


def peer_factors(op, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """curvlinops' (A, G) per preconditioned layer, in the model's order (its dicts are keyed by
    module name and filled in backward order). ``op`` must be fresh: compute_kronecker_factors
    adds to factors already computed."""
    op.compute_kronecker_factors()
    state = op.state_dict()
    names = [name for name, _ in preconditioned_layers(model)]
    return [(state["input_covariances"][n], state["gradient_covariances"][n]) for n in names]


def curvlinops_order(model) -> torch.Tensor:
    """index[j] = position in curvlinops' flat vector (model.parameters(), each flattened) of the
    j-th entry of kfac2l's flat vector (row-major [W | b] per layer)."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel()).reshape(p.shape)
        start += p.numel()
    return dense.flatten_layer_grads(model, offsets).long()


def peer_damping(mode: str, T: int, h: float):
    """curvlinops' inverse options giving B h times kfac2l's damped inverse of a layer with T
    locations (the kfac2l shifts of kfac2l/curvature/kronecker.py, DampedKronecker.__init__)."""
    scale = BATCH * h
    if mode == "exact":  # (A (x) G / (B h) + lam)^-1 = B h (A_c (x) G_c + B h lam)^-1
        return dict(damping=scale * LAM, use_exact_damping=True)
    if mode == "pi":  # pi_kfac2l = T sqrt(B h) pi_curvlinops: the heuristic damping of B h lam
        return dict(damping=scale * LAM, use_heuristic_damping=True, min_damping=0.0)
    shift = LAM if mode == "factor" else math.sqrt(LAM / T)  # unit_pi: sqrt(lam / T) on each factor
    return dict(damping=(shift / T, scale * T * shift))


CASES = [(kind, loss) for kind in MODELS for loss in LOSSES]


@pytest.mark.parametrize("kind, loss", CASES)
def test_factors_match_curvlinops_type2_and_empirical(kind, loss):
    """A = T A_c; E[G] (exact expectation over kfac2l's sampled targets) = G_c / (B T h2) of the
    type-2 Fisher; G = G_c / (B T h_emp) of the empirical Fisher with the same targets."""
    likelihood, _, h2, h_emp = LOSSES[loss]
    model, x, y = setup(kind, loss)
    Ts = locations(model, x)
    sampled, _, _ = kfac2l_run(model, x, y, likelihood)
    expected = expected_kfac2l_factors(model, x, likelihood)
    type2 = peer_factors(peer_operator(model, x, y, loss, FisherType.TYPE2), model)
    empirical = peer_factors(peer_operator(model, x, y, loss, FisherType.EMPIRICAL), model)
    assert len(type2) == len(sampled) == len(Ts)
    for T, (A, G), (A_exp, G_exp), (A2, G2), (A_e, G_e) in zip(Ts, sampled, expected, type2, empirical):
        assert rel(A, T * A2) < TOL and rel(A_exp, T * A2) < TOL and rel(A, T * A_e) < TOL
        assert rel(G_exp, G2 / (BATCH * T * h2)) < TOL
        assert rel(G, G_e / (BATCH * T * h_emp)) < TOL


@pytest.mark.parametrize("kind, loss", CASES)
def test_block_layout_matches_curvlinops(kind, loss):
    """curvlinops' dense KFAC (empirical Fisher, kfac2l's targets), rows and columns put in
    kfac2l's order, is B h_emp block_diag(kron(G_i, A_i)) of kfac2l's factors."""
    likelihood, _, _, h_emp = LOSSES[loss]
    model, x, y = setup(kind, loss)
    factors, _, _ = kfac2l_run(model, x, y, likelihood)
    op = peer_operator(model, x, y, loss, FisherType.EMPIRICAL)
    order = curvlinops_order(model)
    peer = (op @ torch.eye(op.shape[1], dtype=torch.float64))[order][:, order]
    ours = torch.block_diag(*[torch.kron(G, A) for A, G in factors])
    assert rel(ours * BATCH * h_emp, peer) < TOL


@pytest.mark.parametrize("kind, loss", CASES)
@pytest.mark.parametrize("mode", ["pi", "factor", "exact", "unit_pi"])
def test_preconditioned_gradient_matches_curvlinops(kind, loss, mode):
    """kfac2l's KFAC step = B h_emp x curvlinops' KFACInverseLinearOperator applied to the same
    gradient (empirical Fisher with kfac2l's Fisher targets), the damping mapped by
    ``peer_damping``; one inverse operator per layer, since factor and unit_pi damping depend on T."""
    likelihood, _, _, h_emp = LOSSES[loss]
    model, x, y = setup(kind, loss)
    _, grad, step = kfac2l_run(model, x, y, likelihood, mode)
    order = curvlinops_order(model)
    slices = dense.layer_slices(model)
    peer_step = torch.empty_like(grad)
    for T, (_, module), (sl, O, I) in zip(locations(model, x), preconditioned_layers(model), slices):
        assert (O, I) == matrix_shape(module)
        params = list(module.parameters())
        idx = order[sl]  # this layer's entries in curvlinops' vector, in kfac2l's order
        local = idx - idx.min()
        op = peer_operator(model, x, y, loss, FisherType.EMPIRICAL, params=params)
        inverse = KFACInverseLinearOperator(op, **peer_damping(mode, T, h_emp))
        v = torch.empty(idx.numel(), dtype=torch.float64)
        v[local] = grad[sl]
        peer_step[sl] = BATCH * h_emp * (inverse @ v)[local]
    assert rel(step, peer_step) < TOL
