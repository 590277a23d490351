"""Tselepidis, Kohler & Orvieto's toy problem: our generator and initialisation against fixtures
made by running THEIR code (scripts/tko_fixtures.py; repository, commit and command in each
fixture), the binary task, and convention=tko."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kfac2l.data import load_dataset
from kfac2l.models import build_model
from kfac2l.optim.step import get_task

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("tko_toy_*.json"))


def _labels(fixture: dict) -> torch.Tensor:
    n = fixture["n_train"] + fixture["n_test"]
    bits = np.unpackbits(np.frombuffer(base64.b64decode(fixture["labels_packbits_base64"]), dtype=np.uint8))
    return torch.from_numpy(bits[:n].astype(np.float32))


def test_fixtures_are_theirs():
    assert [json.loads(p.read_text())["seed"] for p in FIXTURES] == [0, 1, 2]
    for path in FIXTURES:
        source = json.loads(path.read_text())["source"]
        assert source["repository"] == "github.com/ntselepidis/KFAC-Pytorch"
        assert source["commit"].startswith("2ff652f") and source["device"] == "cpu"


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_generator_equals_their_generate_data(path):
    """Every label of the 27500 samples, the first rows of X to 1e-6, the sum of X, the split."""
    fixture = json.loads(path.read_text())
    data = load_dataset("tko_toy", split_seed=fixture["seed"])
    assert tuple(data.x_train.shape) == (fixture["n_train"], 10) and tuple(data.x_test.shape) == (fixture["n_test"], 10)
    assert data.y_train.shape == (fixture["n_train"], 1) and data.y_train.dtype == torch.float32
    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test]).reshape(-1)
    expected = torch.tensor(fixture["x_first_rows"])
    assert (x[: len(expected)] - expected).abs().max() <= 1e-6
    # equal draws: the float64 sums differ at most by the rounding of n additions
    bound = x.numel() * torch.finfo(torch.float64).eps * float(x.double().abs().sum())
    assert abs(float(x.double().sum()) - fixture["x_sum"]) <= bound
    assert torch.equal(y, _labels(fixture))
    assert int(data.y_train.sum()) == fixture["positives_train"] and int(data.y_test.sum()) == fixture["positives_test"]


def test_seed_changes_the_data():
    a, b = load_dataset("tko_toy", split_seed=0), load_dataset("tko_toy", split_seed=1)
    assert not torch.equal(a.x_train, b.x_train)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_kaiming_init_equals_their_student(path):
    """Their SimpleMLP(10, 1, d_h=10, n_h=62, bias=False, batch_norm=True, seed=seed) weights."""
    fixture = json.loads(path.read_text())
    student = fixture["student"]
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    model = build_model("tko_mlp", init="kaiming", seed=fixture["seed"], depth=student["depth"])
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(weights) == student["linear_layers"]
    assert (weights[0] - torch.tensor(student["first_weight"])).abs().max() <= 1e-6
    assert (weights[-1].reshape(-1) - torch.tensor(student["last_weight"])).abs().max() <= 1e-6
    sums = torch.tensor([float(w.double().sum()) for w in weights], dtype=torch.float64)
    assert (sums - torch.tensor(student["weight_sums"], dtype=torch.float64)).abs().max() <= 1e-6


@pytest.mark.parametrize("depth", [14, 30, 62, 126])
def test_tko_mlp_has_depth_plus_two_linear_layers(depth):
    model = build_model("tko_mlp", init="kaiming", seed=0, depth=depth)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == depth + 2 and len(norms) == depth + 1
    assert all(m.bias is None for m in linears)
    assert [tuple(m.weight.shape) for m in (linears[0], linears[-1])] == [(10, 10), (1, 10)]
    bound = (6.0 / 10) ** 0.5  # Kaiming uniform, fan-in 10, ReLU gain sqrt(2)
    assert all(m.weight.abs().max() <= bound for m in linears)
    assert model(torch.randn(4, 10)).shape == (4, 1)


def test_tko_mlp_depth_zero_is_their_single_layer():
    model = build_model("tko_mlp", init="kaiming", seed=0, depth=0)
    assert [type(m) for m in model] == [nn.Linear]
    with pytest.raises(ValueError, match="depth"):
        build_model("tko_mlp", depth=-1)


def test_binary_task_loss_prediction_and_fisher_targets():
    task = get_task("binary_classification")
    logits = torch.tensor([[-2.0], [0.0], [3.0]])
    target = torch.tensor([[0.0], [1.0], [1.0]])
    expected = -(torch.log(1 - torch.sigmoid(logits[0])) + torch.log(torch.sigmoid(logits[1:])).sum()) / 3
    assert torch.allclose(task.loss(logits, target), expected.reshape(()))
    assert torch.equal(task.predict(logits), torch.tensor([[0.0], [0.0], [1.0]]))
    assert task.likelihood == "bernoulli" and task.outputs == 1
