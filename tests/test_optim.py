"""The optimiser registry and short training runs of every optimiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac2l.optim import OPTIMIZERS, make_optimizer, valid_options
from kfac2l.optim.step import get_task, training_step


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown optimizer 'kfak'.*sgd, adam, kfac"):
        make_optimizer("kfak", nn.Linear(2, 2), lr=0.1)


def test_damping_does_not_apply_to_sgd():
    with pytest.raises(ValueError, match="damping.*do not apply to optimizer 'sgd'"):
        make_optimizer("sgd", nn.Linear(2, 2), lr=0.1, damping=1e-3)


def test_fixed_options_cannot_be_overridden_and_bad_values_are_named():
    with pytest.raises(ValueError, match="coarse_space"):
        make_optimizer("nico", nn.Linear(2, 2), lr=0.1, damping=1e-3, coarse_space="spectral")
    with pytest.raises(ValueError, match="damping_mode='bad'.*pi"):
        make_optimizer("kfac", nn.Linear(2, 2), lr=0.1, damping=1e-3, damping_mode="bad")
    with pytest.raises(ValueError, match="needs a damping"):
        make_optimizer("kfac", nn.Linear(2, 2), lr=0.1)
    assert "taylor_order" in valid_options("taylor") and "correction" not in valid_options("previous")


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 10), nn.BatchNorm1d(10), nn.Linear(10, 3))
    x = torch.randn(64, 1, 8, 8)
    w = torch.randn(64, 3)
    y = (x.flatten(1)[:, :3] @ torch.eye(3) + 0.1 * w).argmax(1)
    return model, x, y


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_the_loss(name):
    model, x, y = _problem()
    lr = {"sgd": 0.02, "adam": 0.01}.get(name, 0.05)
    opts = {} if name in ("sgd", "adam") else {"damping": 0.1, "kl_clip": 1.0}
    opt = make_optimizer(name, model, lr=lr, **opts)
    task = get_task("classification")
    with torch.no_grad():
        start = task.loss(model.eval()(x), y).item()
    model.train()
    for _ in range(15):
        training_step(model, opt, task, x, y)
    with torch.no_grad():
        end = task.loss(model.eval()(x), y).item()
    assert end < 0.9 * start, (start, end)


def test_bench_pools_rounds_and_computes_paired_ratios():
    from kfac2l.bench import ratios, summarise

    def run(opt, times, refresh, solves, sgd, kfac):
        return {"problem": "p", "optimizer": opt, "batch": 4, "device": "cpu", "peak_mem_mb": 1.0,
                "solves": solves, "paper": {"times_s": times, "refresh_s": [refresh], "interval": 100,
                                            "ref_times_s": {"sgd": sgd, "kfac": kfac}}}

    rows = [
        summarise([run("kfac", [2.0, 2.0], 102.0, 1, [1.0], [2.0, 2.0]), run("kfac", [9.0], 102.0, 1, [1.0], [9.0])]),
        # nico's worker saw a slower machine: SGD 2 s and KFAC 4 s next to its 6 s steps
        summarise([run("nico", [6.0, 6.0, 7.0], 6.0, 1, [2.0, 2.0, 2.0], [4.0, 4.0, 5.0])]),
        summarise([run("residu", [3.0], 3.0, 2, [1.0], [2.0])]),
    ]
    rows = ratios(rows)
    kfac, nico, residu = (r["paper"] for r in rows)
    assert kfac["median_s"] == 2.0 and kfac["steps"] == 3 and rows[0]["rounds"] == 2
    assert kfac["amortised_s"] == pytest.approx(2.0 + 100.0 / 100)  # median + 1/100 of the refresh excess
    assert kfac["vs_kfac"] == pytest.approx(1.0) and kfac["vs_sgd"] == pytest.approx(2.0)
    # paired: 6 / 4 and 6 / 2, not 6 / 2 (KFAC's own row) and 6 / 1
    assert nico["vs_kfac"] == pytest.approx(1.5) and nico["vs_sgd"] == pytest.approx(3.0)
    assert nico["amortised_vs_kfac"] == pytest.approx(6.0 / (4.0 + 1.0))
    # floor (t_SGD + n (t_KFAC - t_SGD)) / t_KFAC: one solve gives 1; two solves with SGD 1, KFAC 2 give 1.5
    assert nico["floor_vs_kfac"] == pytest.approx(1.0) and residu["floor_vs_kfac"] == pytest.approx(1.5)
    assert "every-step" not in rows[0]


def test_bench_prints_its_table(capsys):
    from kfac2l.bench import main

    assert main(["--problems", "deep_linear_a", "--optimizers", "nico", "--steps", "1", "--warmup", "1",
                 "--rounds", "1", "--batch", "32", "--schedules", "paper"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("deep_linear_a")]
    assert [ln.split()[2] for ln in lines] == ["sgd", "kfac", "nico"]
    assert float(lines[1].split()[6]) == pytest.approx(1.0)  # KFAC / KFAC
    assert float(lines[2].split()[8]) > 0  # nico's floor, from one Kronecker solve per step


def test_bench_pairs_a_third_reference_with_versus(capsys):
    """--versus NAME steps NAME in every worker next to SGD and KFAC; the ratio to it is the
    optimiser's median over the median of the NAME steps timed alongside."""
    from kfac2l.bench import main, ratios, summarise

    run = {"problem": "p", "optimizer": "taylor", "batch": 4, "device": "cpu", "peak_mem_mb": 1.0, "solves": 2,
           "paper": {"times_s": [6.0, 6.0], "refresh_s": [6.0], "interval": 100,
                     "ref_times_s": {"sgd": [1.0, 1.0], "kfac": [2.0, 2.0], "residu": [5.0, 5.0]}}}
    row = ratios([summarise([run])])[0]["paper"]
    assert row["vs_residu"] == pytest.approx(1.2) and row["vs_kfac"] == pytest.approx(3.0)
    assert main(["--problems", "deep_linear_a", "--optimizers", "nico", "--steps", "1", "--warmup", "1",
                 "--rounds", "1", "--batch", "32", "--schedules", "paper", "--versus", "residu"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("deep_linear_a")]
    assert all("/RESIDU" in ln for ln in lines) and float(lines[2].split("/RESIDU")[1].split()[0]) > 0
    with pytest.raises(SystemExit):
        main(["--versus", "residuu"])


def test_bench_counts_the_passes_of_the_route_the_first_step_chose():
    """On the MNIST AE with a tiny Fisher batch the eigenbasis route is taken: TAYLOR costs two
    dense passes (rotate in, rotate out), not its dense-route 1 + q = 3, and the floor says so."""
    from kfac2l.bench import run_worker

    result = run_worker("mnist_ae", "taylor", "cpu", steps=1, warmup=0, batch=8, schedules=("paper",))
    assert result["solves"] == 2


def test_fisher_pass_leaves_batchnorm_statistics_alone():
    """The B/4 Fisher pass is a measurement: running mean, variance and count of the BatchNorm
    layer move exactly as under the training forward pass alone."""
    import copy

    model, x, y = _problem()
    reference = copy.deepcopy(model)
    opt = make_optimizer("nico", model, lr=0.01, damping=0.1)
    task = get_task("classification")
    assert opt.needs_curvature()
    training_step(model, opt, task, x, y)
    reference(x)  # one training-mode forward pass of the same batch
    bn, ref = model[6], reference[6]
    # the same float32 operations on the same data in one process: bit for bit, no tolerance
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
