"""Mixed precision: torch.autocast (bfloat16 on CPU) and torch.amp.GradScaler (docs/mixed_precision.md)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac2l.curvature.likelihood import sample_targets, summed_nll
from kfac2l.data.core import synthetic_curves
from kfac2l.dense import damped_block, explicit_coarse_basis, explicit_factors, flat_grad
from kfac2l.optim import make_optimizer
from kfac2l.optim.step import get_task, mixed_precision, training_step

U_BF16 = torch.finfo(torch.bfloat16).eps / 2  # unit roundoff 2^-8 (finfo's eps, the spacing at 1, is 2^-7)
U_F32 = torch.finfo(torch.float32).eps / 2
LAM = 0.1
DEPTH = 3  # Linear layers of _mlp


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4))


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(64, 12, generator=gen), torch.randint(0, 4, (64,), generator=gen)


def _forward(model, x, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    return out.float()


def _library_step(name: str, model, x, y, targets, bf16: bool):
    """The step direction of optimizer ``name`` (flat, float64) and its preconditioner."""
    opt = make_optimizer(name, model, lr=1.0, damping=LAM, momentum=0.0, weight_decay=0.0)
    opt.update_curvature(_forward(model, x, bf16), "categorical", targets=targets)
    opt.zero_grad()
    F.cross_entropy(_forward(model, x, bf16), y).backward()
    opt.preconditioner.step()
    return flat_grad(model).double(), opt.preconditioner


def _dense(model, x, y, targets, bf16: bool):
    """Float64 copies of what a (possibly bfloat16) pass produced: the training gradient g, the
    damped KFAC matrix K, the damped Fisher F_bullet and the per-layer data (abar, s), formed here
    from hooks, independently of the library."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    store = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: store.__setitem__(k, (i[0].detach(), o)))
             for k, m in enumerate(layers)]
    out = _forward(model, x, bf16)
    for h in hooks:
        h.remove()
    outs = [store[k][1] for k in range(len(layers))]
    s = torch.autograd.grad(summed_nll(out, targets, "categorical"), outs)
    data = []
    for k, m in enumerate(layers):
        a = store[k][0].double()
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if m.bias is not None else a
        data.append((a.unsqueeze(1), s[k].double().unsqueeze(1)))
    kfac = torch.block_diag(*[damped_block(*explicit_factors(a, g), LAM, "pi") for a, g in data])
    jac = torch.cat([(g[:, 0, :, None] * a[:, 0, None, :]).flatten(1) for a, g in data], 1)  # per-sample J^T
    fisher = jac.T @ jac / x.shape[0] + LAM * torch.eye(jac.shape[1], dtype=jac.dtype)
    model.zero_grad()
    F.cross_entropy(_forward(model, x, bf16), y).backward()
    grad = flat_grad(model).double()
    model.zero_grad()
    return grad, kfac, fisher, data


def _norm2(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(m, 2)


def _cond(m: torch.Tensor) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(m)
    return ev[-1] / ev[0]


@pytest.mark.parametrize("name", ["kfac", "nico"])
def test_bfloat16_step_is_within_the_perturbation_bound(name):
    """The bfloat16 step is the float32 step of perturbed data, within the first-order bound.

    Derivation. Under autocast every Linear output, activation and backpropagated gradient is
    rounded to bfloat16 (unit roundoff u = 2^-8), so the data the preconditioner receives, the
    layer inputs abar, output gradients s and training gradient g, carry relative perturbations
    eps_a, eps_s, eps_g = O(u): each is a sum of at most 5 D roundings (D Linear layers: input
    cast, output, activation forwards, output and input gradients backwards), each of relative
    size u, so <= 5 D u as long as no layer amplifies a relative perturbation (checked below).
    This a-priori value, 5 D u = 0.06, times kappa(K) ~ 10 is no useful bound; the perturbations
    themselves (made by PyTorch's autocast arithmetic, not by kfac2l) are therefore measured in
    float64, and the bound is that of what kfac2l does with them: factors in float32 (not in
    bfloat16), the solves in float32 and the coarse system in float64.
    The step is zeta = P g, with P = Pi K^{-1} + W, W = V F_c^{-1} V^T, F_c = V^T F_bullet V,
    Pi = I - W F_bullet (multiplicative two-level correction, eq. 3.9-3.11; KFAC: V empty, Pi = I,
    W = 0). Differentiating, with zeta_K = K^{-1} g:
        d zeta = P dg - Pi K^{-1} dK zeta_K - W dF zeta
    (dF: d(W) g + d(Pi) zeta_K = -W dF (Pi zeta_K + W g)), so to first order
        ||d zeta|| <= ||P|| ||dg|| + ||Pi K^{-1}|| ||dK|| ||zeta_K|| + ||W|| ||dF|| ||zeta||,
    which reads ||d zeta|| / ||zeta|| <~ kappa(K) (eps_g + eps_K) for KFAC. The second-order
    remainder is covered by dividing by 1 - eta, eta = max(kappa(K) eps_K, kappa(F_c) eps_Fc)
    (Golub & Van Loan, Thm 2.6.2), required < 1/2. The library's own float32 arithmetic adds at
    most (B + p) u_32 (kappa(K) + kappa(F_c)) ||zeta|| (GEMMs of length B, p; backward-stable
    solves), also included. Everything is computed here in float64 from the float32 model.
    """
    model, (x, y) = _mlp(), _batch()
    with torch.no_grad():
        targets = sample_targets(model(x), "categorical", torch.Generator().manual_seed(3))
    step32, _ = _library_step(name, copy.deepcopy(model), x, y, targets, bf16=False)
    step16, pre16 = _library_step(name, copy.deepcopy(model), x, y, targets, bf16=True)
    assert all(f.A.dtype == f.G.dtype == torch.float32 for f in pre16.factors)

    g, K, Fb, data = _dense(model, x, y, targets, bf16=False)
    g16, K16, Fb16, data16 = _dense(model, x, y, targets, bf16=True)
    perturbation = [(x16 - x0).norm() / x0.norm() for d0, d16 in zip(data, data16) for x0, x16 in zip(d0, d16)]
    assert max(perturbation) <= 5 * DEPTH * U_BF16 and (g16 - g).norm() / g.norm() <= 5 * DEPTH * U_BF16

    eye = torch.eye(g.shape[0], dtype=g.dtype)
    K_inv = torch.linalg.inv(K)
    zeta_k = K_inv @ g
    if name == "kfac":
        V = torch.zeros(g.shape[0], 0, dtype=g.dtype)
    else:
        V = explicit_coarse_basis("nicolaides", model, data, K, Fb, g, LAM, "pi")
    Fc = V.T @ Fb @ V
    W = V @ torch.linalg.solve(Fc, V.T) if V.shape[1] else torch.zeros_like(K)
    Pi = eye - W @ Fb
    P = Pi @ K_inv + W
    zeta = P @ g
    dK, dF = _norm2(K16 - K), _norm2(Fb16 - Fb)
    first_order = (_norm2(P) * (g16 - g).norm() + _norm2(Pi @ K_inv) * dK * zeta_k.norm()
                   + _norm2(W) * dF * zeta.norm())
    kappa_k = _cond(K)
    kappa_c = _cond(Fc) if V.shape[1] else torch.tensor(0.0, dtype=g.dtype)
    eta = max(kappa_k * dK / _norm2(K), kappa_c * _norm2(V.T @ (Fb16 - Fb) @ V) / _norm2(Fc) if V.shape[1] else 0.0)
    assert eta < 0.5
    arithmetic = (x.shape[0] + g.shape[0]) * U_F32 * (kappa_k + kappa_c) * zeta.norm()
    bound = first_order / (1 - eta) + arithmetic
    difference = (step16 - step32).norm()
    print(f"{name}: ||bf16 step - f32 step|| / ||step|| = {difference / zeta.norm():.3e}, "
          f"bound {bound / zeta.norm():.3e}, kappa(K) = {kappa_k:.2f}, u = {U_BF16:.2e}")
    assert (step32 - zeta).norm() <= arithmetic  # the float32 library step is the dense step
    assert 0 < difference <= bound  # > 0: autocast did run in bfloat16


def test_bfloat16_autoencoder_training_lowers_the_loss():
    """A small auto-encoder on synthetic CURVES (12 x 12) trained under bfloat16 autocast by the
    runner's training step; the Bernoulli loss falls below its starting value."""
    torch.manual_seed(0)
    x = synthetic_curves(128, seed=0, size=12)
    model = nn.Sequential(nn.Linear(144, 32), nn.Sigmoid(), nn.Linear(32, 8), nn.Linear(8, 32), nn.Sigmoid(),
                          nn.Linear(32, 144))
    task = get_task("bernoulli_autoencoder")
    for name in ("kfac", "residu"):
        net = copy.deepcopy(model)
        opt = make_optimizer(name, net, lr=0.1, damping=1e-2, kl_clip=1e-2)
        gen = torch.Generator()
        losses = []
        for it in range(30):
            gen.manual_seed(it)
            batch = x[(it % 4) * 32:(it % 4 + 1) * 32]
            losses.append(training_step(net, opt, task, batch, None, 0.25, gen, autocast=torch.bfloat16))
        first, last = losses[0].item(), torch.stack(losses[-4:]).mean().item()
        assert last < 0.9 * first, (name, first, last)
        assert opt.preconditioner.factors[0].A.dtype == torch.float32


def _state_tensors(obj, prefix=""):
    """(path, value) of every leaf of a nested state dict, for bit-for-bit comparison."""
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _state_tensors(v, f"{prefix}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in _state_tensors(v, f"{prefix}[{i}]")]
    return [(prefix, obj.clone() if isinstance(obj, torch.Tensor) else obj)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _snapshot(model, opt):
    return _state_tensors({"model": model.state_dict(), "optimizer": opt.state_dict()})


@pytest.mark.parametrize("name", ["kfac", "nico", "previous"])
def test_grad_scaler_skips_an_overflowing_step_without_touching_the_curvature(name):
    """An inf in a gradient: GradScaler skips the base step, the parameters, the momentum and the
    curvature state (factors, counters, inverses, PREVIOUS's cross terms) stay bit for bit, the
    scale backs off, and the run then continues exactly as if the step had never been tried
    (scaling by powers of two is exact)."""
    assert hasattr(torch.amp, "GradScaler") and torch.amp.GradScaler("cpu").is_enabled()
    model, (x, y) = _mlp(), _batch()
    task = get_task("classification")
    runs = {}
    for overflow in (False, True):
        net = copy.deepcopy(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        opt = make_optimizer(name, net, lr=0.1, damping=LAM, kl_clip=1e-2, inv_interval=2)
        opt.grad_scaler = scaler
        gen = torch.Generator()
        for it in range(4):
            if overflow and it == 2:
                before = _snapshot(net, opt)
                hook = net[2].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
                gen.manual_seed(99)
                training_step(net, opt, task, x, y, 0.5, gen, autocast=torch.bfloat16)
                hook.remove()
                after = _snapshot(net, opt)
                changed = [p for (p, a), (_, b) in zip(before, after) if not _same(a, b) and "grad_scaler" not in p]
                assert [p for p, _ in before] == [p for p, _ in after] and changed == []
                assert scaler.get_scale() == 2.0**9
            gen.manual_seed(it)
            training_step(net, opt, task, x, y, 0.5, gen, autocast=torch.bfloat16)
        runs[overflow] = _snapshot(net, opt)
    plain, skipped = runs[False], runs[True]
    differ = [p for (p, a), (_, b) in zip(plain, skipped) if not _same(a, b) and "grad_scaler" not in p]
    assert differ == []


def test_precision_key_is_checked_in_one_line():
    valid = r"\('float32', 'bfloat16', 'float16'\)"
    with pytest.raises(ValueError, match=rf"precision='half' is not valid; choose one of {valid}"):
        mixed_precision("half", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision='float16' needs a CUDA device, not 'cpu'"):
        mixed_precision("float16", torch.device("cpu"))
    assert mixed_precision("bfloat16", torch.device("cpu")) == (torch.bfloat16, None)
    assert mixed_precision("float32", torch.device("cpu")) == (None, None)


def test_runner_precision_key(tmp_path):
    """The runner's ``precision`` key: validated in one line before anything runs, and part of a
    run's identity only when it is not the default (float32 identities are unchanged)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from kfac2l.train import ConfigError, run_identity, validate

    configs = str(Path(__file__).resolve().parents[1] / "configs")

    def cfg(*overrides):
        with initialize_config_dir(config_dir=configs, version_base="1.3"):
            return compose("train", overrides=[f"dataset.root={tmp_path}", "device=cpu", *overrides])

    with pytest.raises(ConfigError, match="precision='float16' needs a CUDA device"):
        validate(cfg("precision=float16"))
    with pytest.raises(ConfigError, match="precision='fp8' is not valid"):
        validate(cfg("precision=fp8"))
    plain, bf16 = cfg(), cfg("precision=bfloat16")
    assert "precision" not in run_identity(plain, *validate(plain))
    assert run_identity(bf16, *validate(bf16))["precision"] == "bfloat16"


def test_runner_trains_in_bfloat16(tmp_path):
    """One short runner run under ``precision=bfloat16`` completes with a finite, falling loss."""
    import pandas as pd
    from fixtures import write_all
    from test_runs import _cfg, _small

    from kfac2l.train import train

    write_all(tmp_path / "data")
    summary = train(_cfg(["optimizer=kfac", "precision=bfloat16", "device=cpu", *_small(tmp_path / "data")]),
                    tmp_path / "run")
    losses = pd.read_csv(tmp_path / "run" / "metrics.csv")["train_loss"]
    assert summary["status"] == "completed" and summary["identity"]["precision"] == "bfloat16"
    assert losses.iloc[-1] < losses.iloc[0]
