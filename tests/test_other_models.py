"""The optimisers on other people's models: in-place operations, torchvision models."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from kfac2l.optim import PreviousKFAC, TwoLevelKFAC
from kfac2l.optim.preconditioner import KFAC

SPACES = ["nicolaides", "spectral", "residual", "krylov-nicolaides", "krylov-residual", "taylor"]


class Residual(nn.Module):
    """conv -> `out += x` in place on the conv's own output -> ReLU."""

    def __init__(self, channels: int, inplace: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.inplace = inplace
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        out = self.conv(x)
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.act(out)


def _net(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=inplace), Residual(3, inplace),
                         nn.Flatten(), nn.Linear(3 * 5 * 5, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 4)).double()


def _step(model, make, x, y, targets):
    pre = make(model)
    pre.update_curvature(model(x), targets=targets)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    pre.remove()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


MAKERS = {"kfac": lambda m: KFAC(m, damping=0.1)}
MAKERS.update({s: (lambda m, s=s: TwoLevelKFAC(m, coarse_space=s, damping=0.1)) for s in SPACES})
MAKERS["previous"] = lambda m: PreviousKFAC(m, damping=0.1)


@pytest.mark.parametrize("name", list(MAKERS))
def test_inplace_operations_do_not_change_the_step(name):
    """A network that differs only in in-place ReLU and a residual `+=` on a conv output gets the
    same step (float64, 1e-10 relative) for KFAC and every two-level space."""
    torch.manual_seed(1)
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    targets = torch.randint(0, 4, (6,))
    plain = _step(_net(False), MAKERS[name], x, y, targets)
    inplace = _step(_net(True), MAKERS[name], x, y, targets)
    assert torch.linalg.norm(inplace - plain) <= 1e-10 * torch.linalg.norm(plain)


def test_torchvision_model_with_inplace_relu_matches_its_out_of_place_copy():
    """torchvision's SqueezeNet (in-place ReLU after every convolution, concatenated branches)."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=5).double().eval()  # eval: no dropout
    copy_ = copy.deepcopy(model)
    for m in copy_.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    assert sum(isinstance(m, nn.ReLU) and m.inplace for m in model.modules()) > 20
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    y, targets = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])
    for make in (MAKERS["kfac"], MAKERS["residual"]):
        a, b = _step(model, make, x, y, targets), _step(copy_, make, x, y, targets)
        assert torch.linalg.norm(a - b) <= 1e-10 * torch.linalg.norm(b)


def test_input_modified_in_place_after_the_layer_is_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            out = self.fc(x)
            x.mul_(2)  # the layer's input changes after the layer used it
            return out + x

    model = Bad()
    pre = KFAC(model, damping=0.1)
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="modified in place"):
        pre.update_curvature(model(x.clone()))


def test_eigh_failure_is_retried_with_jitter_then_previous_inverses_are_kept(monkeypatch):
    """Injected LAPACK failures: one failure is retried on a jittered matrix; a persistent
    failure keeps the previous refresh's inverses and is counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    pre = KFAC(model, damping=0.1, cov_interval=1, inv_interval=1, diagnostics=True)

    def one_step():
        pre.update_curvature(model(x))
        model.zero_grad()
        model(x).sum().backward()
        pre.step()

    one_step()
    clean = [k.QA.clone() for k in pre.kron]
    real_eigh = torch.linalg.eigh
    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("injected: failed to converge")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    one_step()
    assert pre.eigh_retries == 1 and pre.eigh_failures == 0 and pre.diagnostics["eigh_retries"] == 1

    def broken(m):
        raise torch.linalg.LinAlgError("injected: failed to converge")

    kept = pre.kron
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    one_step()
    assert pre.eigh_failures == len(kept) and all(a is b for a, b in zip(pre.kron, kept))
    assert pre.diagnostics["eigh_failures"] == len(kept)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert len(clean) == len(kept)


def test_exclusion_and_modules_that_keep_their_plain_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                          nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    from kfac2l.optim.preconditioner import UnpreconditionedWarning

    with pytest.warns(UnpreconditionedWarning, match="3 module"):
        pre = KFAC(model, damping=0.1)
    assert pre.skipped_modules == [("1", "BatchNorm2d"), ("2", "Conv2d"), ("5", "LayerNorm")]  # grouped conv too
    with pytest.warns(UnpreconditionedWarning, match="5 module"):
        excluded = KFAC(model, damping=0.1, exclude=["6", nn.Conv2d])
    assert [name for name, _ in excluded.layers] == ["4"]
    x = torch.randn(5, 2, 5, 5)
    excluded.update_curvature(model(x))
    model.zero_grad()
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    excluded.step()
    for name, p in model.named_parameters():
        same = torch.equal(p.grad, plain[name])
        assert same == (not name.startswith("4.")), name  # only layer 4 is preconditioned
    with pytest.raises(ValueError, match="outside exclude"):
        KFAC(model, damping=0.1, exclude=["*"], warn_skipped=False)


def test_worked_example_trains_a_resnet_and_a_sequence_model():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "other_models.py"
    spec = importlib.util.spec_from_file_location("other_models", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--steps", "6", "--batch", "8"])
    for name, (first, last) in results.items():
        assert last < first, name
