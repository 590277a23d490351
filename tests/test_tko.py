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


CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def _cfg(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=overrides)


def test_fisher_statistics_from_the_minibatch_itself():
    """resample=False: the first layer's A factor is X^T X / B of the training batch (float64
    reference; float32 GEMM bound n eps sum |x_i x_j|)."""
    from kfac2l.optim import make_optimizer
    from kfac2l.optim.step import training_step

    model = build_model("tko_mlp", init="kaiming", seed=0, depth=2)
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    y = (x[:, :1] > 0).float()
    opt = make_optimizer("kfac", model, lr=0.01, damping=1e-3, cov_interval=10, inv_interval=100)
    training_step(model, opt, get_task("binary_classification"), x, y, 0.25, torch.Generator(), resample=False)
    A = opt.preconditioner.factors[0].A[0]
    x64 = x.double()
    expected = x64.T @ x64 / 64
    eps = torch.finfo(torch.float32).eps
    bound = 64 * eps * (x64.abs().T @ x64.abs() / 64) + eps * expected.abs()
    assert ((A.double() - expected).abs() <= bound).all()
    assert not opt.needs_curvature()  # T_cov = 10: the next statistics at step 10


def test_plateau_scheduler_divides_the_lr_after_patience_epochs():
    from kfac2l.optim.scheduler import make_scheduler, scheduler_problem

    param = nn.Parameter(torch.zeros(1))
    base = torch.optim.SGD([param], lr=0.01)
    sched = make_scheduler({"name": "plateau", "patience": 1, "factor": 0.1}, base)
    for loss, lr in ((1.0, 0.01), (1.0, 0.01), (1.0, 0.001), (0.5, 0.001)):
        sched.step({"test_loss": loss, "train_loss": 9.0})
        assert base.param_groups[0]["lr"] == pytest.approx(lr)
    assert "valid: plateau" in scheduler_problem({"name": "cosine"})
    assert "valid: test_loss, train_loss" in scheduler_problem({"monitor": "accuracy"})


def test_convention_tko_options():
    from kfac2l.config import fisher_batch, optimizer_options

    cfg = _cfg(["experiment=tko_toy", "convention=tko", "optimizer=kfac", "optimizer.damping=1e-3"])
    lr, opts = optimizer_options(cfg)
    assert lr == 1e-2 and fisher_batch(cfg) == "minibatch" and cfg.model.init == "kaiming"
    assert {k: opts[k] for k in ("kl_clip_form", "weight_decay", "cov_interval", "inv_interval", "damping_mode",
                                 "ema_count", "damping", "kl_clip")} == {
        "kl_clip_form": "lr_squared", "weight_decay": 3e-3, "cov_interval": 10, "inv_interval": 100,
        "damping_mode": "pi", "ema_count": "refreshes", "damping": 1e-3, "kl_clip": 1e-2}
    _, previous = optimizer_options(_cfg(["experiment=tko_toy", "convention=tko", "optimizer=previous"]))
    assert previous["coarse_scale"] == 1.0 and previous["cov_interval"] == 10
    assert fisher_batch(_cfg(["experiment=tko_toy"])) == "resampled"


def test_convention_tko_builds_every_optimizer(tmp_path):
    from kfac2l.optim import OPTIMIZERS
    from kfac2l.train import ConfigError, validate

    for name in OPTIMIZERS:
        damping = "optimizer.damping=null" if name in ("sgd", "adam") else "optimizer.damping=1e-3"
        validate(_cfg(["experiment=tko_toy", "convention=tko", f"optimizer={name}", damping,
                       f"dataset.root={tmp_path}"]))
    with pytest.raises(ConfigError, match="convention.fisher_batch 'every'; valid: resampled, minibatch"):
        validate(_cfg(["experiment=tko_toy", "convention.fisher_batch=every", f"dataset.root={tmp_path}"]))
    with pytest.raises(ConfigError, match="experiment.scheduler.factor=2; valid"):
        validate(_cfg(["experiment=tko_toy", "experiment.scheduler.factor=2", f"dataset.root={tmp_path}"]))


def test_one_epoch_of_kfac_under_convention_tko_completes(tmp_path):
    import pandas as pd

    from kfac2l.train import train

    cfg = _cfg(["experiment=tko_toy", "convention=tko", "optimizer=kfac", "optimizer.damping=1e-3",
                "profile.train_subset=1280", "profile.test_subset=256", "profile.max_epochs=1",
                f"paths.runs={tmp_path}", "device=cpu"])
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["epochs_run"] == 1
    row = pd.read_csv(tmp_path / "run" / "metrics.csv").iloc[0]
    assert row["iterations"] == 20 and np.isfinite(row["train_loss"]) and 0 <= row["test_accuracy"] <= 1
    identity = summary["identity"]
    assert identity["profile"]["fisher_batch"] == "minibatch" and identity["experiment"]["scheduler"]["patience"] == 10


def test_resumed_run_with_a_scheduler_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    """The plateau schedule's state travels in the checkpoint: a run stopped after epoch 2 and
    relaunched ends with the losses and learning rates of the run that never stopped."""
    import pandas as pd

    from kfac2l import train as runner

    args = ["experiment=tko_toy", "convention=tko", "optimizer=kfac", "optimizer.damping=1e-3", "model.depth=2",
            "profile.train_subset=640", "profile.test_subset=128", "profile.max_epochs=5", "device=cpu",
            "experiment.scheduler.patience=0", "checkpoint.every=1"]
    original = runner.Run._after_epoch
    lrs = {"whole": [], "cut": []}

    def recording(name, stop_at=None):
        def after_epoch(self, epoch, *rest):
            if epoch == stop_at:
                raise KeyboardInterrupt
            outcome = original(self, epoch, *rest)
            lrs[name].append(self.optimizer.lr)
            return outcome
        return after_epoch

    monkeypatch.setattr(runner.Run, "_after_epoch", recording("whole"))
    whole = runner.train(_cfg(args), tmp_path / "whole")
    monkeypatch.setattr(runner.Run, "_after_epoch", recording("cut", stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        runner.train(_cfg(args), tmp_path / "cut")
    monkeypatch.setattr(runner.Run, "_after_epoch", recording("cut"))
    resumed = runner.train(_cfg(args), tmp_path / "cut")
    assert whole["status"] == resumed["status"] == "completed" and resumed["resumed_from_epoch"] == 2
    assert len(set(lrs["whole"])) > 1, lrs  # the schedule did act (patience 0 on the test loss)
    assert lrs["cut"] == lrs["whole"]
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("whole", "cut"))
    assert a["train_loss"].tolist() == b["train_loss"].tolist() and a["test_loss"].tolist() == b["test_loss"].tolist()


def test_last_batch_keep_is_a_step_of_its_own():
    """convention.last_batch=keep: the permutation cut into batches of B with the rest as a last,
    smaller batch (a DataLoader's drop_last=False, their train_toy.py:165); drop: the rest is left out."""
    from kfac2l.data import TensorBatches

    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    expected = [perm[0:4], perm[4:8], perm[8:10]]
    for drop_last, count in ((False, 3), (True, 2)):
        batches = TensorBatches(x, y, 4, torch.Generator().manual_seed(3), torch.device("cpu"), drop_last=drop_last)
        got = list(batches)
        assert len(batches) == len(got) == count
        for (bx, by), idx in zip(got, expected):
            assert torch.equal(by, idx) and torch.equal(bx[:, 0], idx.float())
    exact = TensorBatches(x, y, 5, torch.Generator(), torch.device("cpu"), drop_last=False)
    assert len(exact) == len(list(exact)) == 2  # no empty last batch when B divides N


def test_convention_tko_loop_ingredients_and_identity(tmp_path):
    """convention=tko turns early stopping off and keeps the last batch; each is a single option;
    they enter the run identity only when used, so paper and authors identities do not move."""
    from kfac2l.config import early_stopping, last_batch, optimizer_options, run_identity, validate
    from kfac2l.train import ConfigError

    def identity(overrides):
        cfg = _cfg(overrides)
        return cfg, run_identity(cfg, *optimizer_options(cfg))

    cfg, tko = identity(["experiment=tko_toy", "convention=tko", "optimizer.damping=1e-3"])
    assert early_stopping(cfg) is False and last_batch(cfg) == "keep"
    assert tko["budget"]["early_stopping"] is False and tko["data"]["last_batch"] == "keep"
    for convention in ("paper", "authors"):
        cfg, ident = identity(["experiment=tko_toy", f"convention={convention}"])
        assert early_stopping(cfg) is True and last_batch(cfg) == "drop"
        assert set(ident["budget"]) == {"max_epochs", "patience"}
        assert set(ident["data"]) == {"train_subset", "test_subset"}
    cfg, single = identity(["experiment=tko_toy", "convention.early_stopping=false"])
    assert early_stopping(cfg) is False and last_batch(cfg) == "drop" and "last_batch" not in single["data"]
    cfg, single = identity(["experiment=tko_toy", "convention.last_batch=keep"])
    assert early_stopping(cfg) is True and "early_stopping" not in single["budget"]
    from kfac2l.select import _budget  # runs with and without early stopping are never selected together

    stopped = {"identity": {"budget": {"max_epochs": 5, "patience": 10}, "experiment": {"batch_size": 64}}}
    assert _budget(stopped) == "max_epochs=5,patience=10,train_subset=None,batch_size=64"
    stopped["identity"]["budget"]["early_stopping"] = False
    assert _budget(stopped) == "max_epochs=5,patience=10,early_stopping=false,train_subset=None,batch_size=64"
    with pytest.raises(ConfigError, match=r"^unknown convention.last_batch 'all'; valid: drop, keep$"):
        validate(_cfg(["experiment=tko_toy", "convention.last_batch=all", f"dataset.root={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"^convention.early_stopping='no'; valid: true, false$"):
        validate(_cfg(["experiment=tko_toy", "convention.early_stopping=no", f"dataset.root={tmp_path}"]))


@pytest.mark.parametrize("stopping, epochs", [("true", 2), ("false", 4)])
def test_early_stopping_off_runs_every_epoch(tmp_path, monkeypatch, stopping, epochs):
    """A training loss that never improves: with patience 1 early stopping ends the run after epoch
    2 (one epoch without improvement); convention.early_stopping=false runs all 4 epochs."""
    from kfac2l import train as runner

    monkeypatch.setattr(runner.Run, "_epoch", lambda self, *args: 1.0)
    cfg = _cfg(["experiment=tko_toy", "optimizer=sgd", "optimizer.damping=null", "model.depth=2",
                "profile.train_subset=128", "profile.test_subset=64", "profile.max_epochs=4", "profile.patience=1",
                f"convention.early_stopping={stopping}", "device=cpu"])
    summary = runner.train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["epochs_run"] == epochs


@pytest.mark.parametrize("keep, sizes", [("keep", [64] * 20 + [20]), ("drop", [64] * 20)])
def test_last_batch_in_a_run(tmp_path, monkeypatch, keep, sizes):
    """1300 training samples, batch 64: last_batch=keep trains 21 steps an epoch, the last on the
    20 remaining samples; drop trains 20. The epoch loss is the mean over the steps taken."""
    import pandas as pd

    from kfac2l import loop

    seen, losses = [], []
    step = loop.training_step

    def recording(model, optimizer, task, x, *args, **kwargs):
        seen.append(x.shape[0])
        losses.append(step(model, optimizer, task, x, *args, **kwargs))
        return losses[-1]

    monkeypatch.setattr(loop, "training_step", recording)
    cfg = _cfg(["experiment=tko_toy", "convention=tko", "optimizer=kfac", "optimizer.damping=1e-3", "model.depth=2",
                "profile.train_subset=1300", "profile.test_subset=64", "profile.max_epochs=1",
                f"convention.last_batch={keep}", "device=cpu"])
    from kfac2l.train import train

    train(cfg, tmp_path / "run")
    row = pd.read_csv(tmp_path / "run" / "metrics.csv").iloc[0]
    assert seen == sizes and row["iterations"] == len(sizes)
    assert row["train_loss"] == torch.stack(losses).mean().item()  # every step weighs 1 / steps
