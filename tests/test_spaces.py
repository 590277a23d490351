"""Coarse spaces as the extension point: a user's space, registered in a few lines, is verified."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import kfac2l
from kfac2l.curvature.spaces import COARSE_SPACES
from kfac2l.optim import make_optimizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture()
def gradient_space():
    """The class of docs/extending.md, executed from the document itself."""
    code = re.search(r"```python\n(import kfac2l\n.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.splitlines()) < 50
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    yield namespace["GradientSpace"]
    COARSE_SPACES.pop("gradient", None)


def test_registered_space_is_checked_against_the_dense_construction(gradient_space):
    from kfac2l.verify import checks

    for kind in ("mlp", "cnn", "seq"):
        rows = dict(checks(kind))
        for corr in ("multiplicative", "additive"):
            assert rows[f"two-level gradient {corr}"] < 1e-10, (kind, corr)


def test_space_without_explicit_is_checked_with_its_own_columns(gradient_space):
    from kfac2l.verify import checks

    class NoOracle(gradient_space):
        name = "gradient-no-oracle"

        def explicit(self, ctx):
            return None

    kfac2l.register_coarse_space(NoOracle)
    try:
        rows = dict(checks("mlp"))
        assert rows["two-level gradient-no-oracle multiplicative (columns from build)"] < 1e-10
    finally:
        COARSE_SPACES.pop("gradient-no-oracle")


def test_a_wrong_space_fails_the_check(gradient_space):
    """The check can fail: a space whose fast path disagrees with its definition is caught."""
    from kfac2l.verify import checks

    class Wrong(gradient_space):
        name = "gradient-wrong"

        def build(self, ctx):
            return [2 * g + 1 for g in ctx.grad]  # not the span of g[i]

    kfac2l.register_coarse_space(Wrong)
    try:
        assert dict(checks("mlp"))["two-level gradient-wrong multiplicative"] > 1e-6
    finally:
        COARSE_SPACES.pop("gradient-wrong")


def test_registered_space_trains_and_reports_its_cost(gradient_space):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    pre = kfac2l.TwoLevelKFAC(model, coarse_space="gradient", damping=0.1)
    assert pre.kronecker_solves == 1 and not pre.space.static
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = make_optimizer("sgd", model, lr=0.1)
    losses = []
    for _ in range(10):
        pre.update_curvature(model(x))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_every_builtin_space_declares_its_cost_and_has_an_oracle():
    costs = {"nicolaides": 0, "spectral": 0, "krylov-nicolaides": 0, "full": 0, "residual": 1, "krylov-residual": 2,
             "taylor": 2}
    for name, cls in COARSE_SPACES.items():
        if name in costs:
            assert cls().kronecker_solves() == costs[name], name
            assert cls.static == (costs[name] == 0), name
            assert cls.explicit is not kfac2l.CoarseSpace.explicit, name  # a dense construction of its own
    with pytest.raises(ValueError, match="do not apply to coarse_space='nicolaides'"):
        COARSE_SPACES["nicolaides"](taylor_order=3)


def test_bench_times_a_registered_space(tmp_path, monkeypatch, capsys):
    """The benchmark covers a user's space: `--import` the module that registers it, then
    `--optimizers space:NAME`."""
    from kfac2l.bench import main

    code = re.search(r"```python\n(import kfac2l\n.*?)```", DOC.read_text(), re.S).group(1)
    (tmp_path / "my_spaces.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{':' + __import__('os').environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["--problems", "deep_linear_a", "--optimizers", "space:gradient", "--steps", "1", "--warmup", "1",
                     "--batch", "32", "--schedules", "paper", "--import", "my_spaces"]) == 0
    finally:
        COARSE_SPACES.pop("gradient", None)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "space:gradient" in ln)
    assert float(line.split("|")[1].split()[0]) > 0  # its median step time (ms)
