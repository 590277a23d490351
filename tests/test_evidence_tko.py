"""Claim C6 (Tselepidis et al.'s toy problem): the declared tables, the C6 rule and Figure 8, from
fake run folders whose endpoints, paired differences, censoring and p-values are set by hand."""

from __future__ import annotations

import json
import shutil
from itertools import product

import numpy as np
import pandas as pd
import pytest
from test_plots import _write_run

from kfac2l import evidence, evidence_tko
from kfac2l.analysis import Comparison
from kfac2l.evidence_tko import claim_status, primary_family, tko_endpoints

HEAD = [0.50, 0.30, 0.20, 0.16, 0.14, 0.13, 0.125]   # epochs 1-7 of every run: 0.15 first reached at epoch 5
SEEDS = range(1, 11)
SOURCE = "generated: TKO toy problem, teacher and data seed {} (their --seed {})"


def kfac_tail(seed: int) -> float:
    return 0.10 + 0.001 * seed


# tail (epochs 8-12, constant: the last-5 mean) minus KFAC's on the same seed
DIFFERENCE = {"previous": lambda s: -0.002 * s,                         # all 10 lower: p = 2 / 2^10
              "nico": lambda s: 0.001 * s * (-1) ** (s + 1),            # signs alternate: no difference
              "sgd": lambda s: 0.01 * s,                                 # all 10 higher; 0.12 reached only by seed 1
              "adam": lambda s: 0.003 * s, "spectral": lambda s: -0.001 * s}
SECONDS_PER_EPOCH = {"kfac": 3.0, "previous": 3.0, "nico": 4.0, "sgd": 1.0, "adam": 1.0, "spectral": 5.0}


def _toy_run(root, panel, opt, seed, tail):
    _write_run(root, panel, opt, seed, HEAD + [tail] * 5, source=SOURCE.format(seed + 1, seed), profile="paper",
               seconds_per_epoch=SECONDS_PER_EPOCH[opt], accuracy=0.99 if opt == "kfac" else 0.98)


@pytest.fixture()
def results(tmp_path):
    for seed in SEEDS:
        _toy_run(tmp_path, "tko_toy", "kfac", seed, kfac_tail(seed))
        for opt in ("previous", "nico", "sgd"):
            _toy_run(tmp_path, "tko_toy", opt, seed, kfac_tail(seed) + DIFFERENCE[opt](seed))
    for opt, seed in product(("adam", "spectral"), (1, 2, 3)):
        _toy_run(tmp_path, "tko_toy", opt, seed, kfac_tail(seed) + DIFFERENCE[opt](seed))
    for depth, opt, seed in product((14, 126), ("kfac", "previous", "nico"), range(1, 6)):
        tail = kfac_tail(seed) + (0.0 if opt == "kfac" else -0.001 * depth / 14)  # gain grows with depth
        _toy_run(tmp_path, f"tko_toy_depth{depth}", opt, seed, tail)
    evidence.endpoints.cache_clear()
    yield tmp_path
    evidence.endpoints.cache_clear()


def test_endpoints_thresholds_seconds_and_censoring(results):
    frame = tko_endpoints(results, "paper", "tko_toy").set_index(["optimizer", "seed"])
    kfac = frame.loc[("kfac", 4)]
    assert kfac["last5_mean"] == pytest.approx(0.104) and kfac["loss_at_1"] == 0.5
    assert kfac["loss_at_10"] == pytest.approx(0.104)
    assert kfac["epochs_to_0.15"] == 5 and kfac["seconds_to_0.15"] == pytest.approx(15.0)  # 3 s per epoch
    assert kfac["epochs_to_0.12"] == 8 and kfac["seconds_to_0.12"] == pytest.approx(24.0)
    assert kfac["final_test_accuracy"] == pytest.approx(0.99)
    assert frame.loc[("sgd", 1), "epochs_to_0.12"] == 8  # tail 0.111
    assert pd.isna(frame.loc[("sgd", 2), "epochs_to_0.12"])  # tail 0.122: never reached, censored
    assert pd.isna(frame.loc[("sgd", 2), "seconds_to_0.12"])


def test_deep_linear_a_endpoints_keep_their_defaults(results):
    """Without the options, run_endpoints gives exactly the keys of the deep-linear-A tables."""
    frame = evidence.endpoints(results, "paper", "tko_toy")
    assert not any(c.startswith(("seconds_to", "final_test")) for c in frame)
    assert {"loss_at_5", "loss_at_50", "epochs_to_threshold"} <= set(frame)


def test_primary_family_by_hand(results):
    comps = {c.optimizer: c for c in primary_family(results)}
    assert list(comps) == ["previous", "nico", "sgd"]
    prev, nico, sgd = comps["previous"], comps["nico"], comps["sgd"]
    assert prev.n == 10 and prev.lower == 10 and prev.median_diff == pytest.approx(-0.011)  # -0.002 x 5.5
    assert prev.p == pytest.approx(2 / 2**10) and sgd.p == pytest.approx(2 / 2**10)
    # NICO: ranks 1..10, positive on the odd seeds: W+ = 25, two-sided exact p by enumeration
    signs = np.array(list(product([0, 1], repeat=10)))
    w_plus = signs @ np.arange(1, 11)
    expected = 2 * min(np.mean(w_plus <= 25), np.mean(w_plus >= 25))
    assert nico.p == pytest.approx(expected, rel=1e-9)
    # Holm over the family of 3: p sorted 2/1024, 2/1024, p_nico -> 3 x 2/1024, max(2 x 2/1024, .), max(p_nico, .)
    assert prev.p_holm == pytest.approx(6 / 1024) and sgd.p_holm == pytest.approx(6 / 1024)
    assert nico.p_holm == pytest.approx(max(expected, 6 / 1024))
    assert prev.verdict == "lower than KFAC" and sgd.verdict == "higher than KFAC"
    assert prev.ci_low <= prev.median_diff <= prev.ci_high


def test_tables_and_c6_status(results):
    from kfac2l.report import render

    paired = render("tko-paired:paper:tko_toy", results)
    previous = next(line for line in paired.splitlines() if line.startswith("| PREVIOUS"))
    assert "Holm over the declared family of 3" in paired and "-0.0110" in previous and "10/10 seeds" in previous
    assert "| 0.002 " in previous and "| 0.006 " in previous  # Wilcoxon 2/1024, Holm 6/1024
    descriptive = render("tko-descriptive:paper:tko_toy", results)
    adam = next(line for line in descriptive.splitlines() if line.startswith("| ADAM"))
    assert "+0.0060" in adam and "0/3 seeds" in adam  # 0.003 x 2, the median of seeds 1-3
    assert "-0.0020" in next(line for line in descriptive.splitlines() if line.startswith("| SPECTRAL"))
    secondary = render("tko-secondary:paper:tko_toy", results)
    sgd = next(line for line in secondary.splitlines() if line.startswith("| SGD"))
    assert "not reached (9/10 never)" in sgd  # epochs and seconds to 0.12
    kfac = next(line for line in secondary.splitlines() if line.startswith("| KFAC"))
    assert "| 15 " in kfac and "| 24 " in kfac and "0.99" in kfac
    depth = render("tko-depth:paper:tko_toy", results)
    assert "126 (128)" in depth and "-0.0090" in depth and "30 (32)" not in depth  # missing depths left out
    status, text = claim_status(results)
    assert status == "reproduced" and "PREVIOUS" in text.split(";")[0]
    claims = evidence.claims_table(results)
    assert "| C6 " in claims and "| C6b " in claims and "| C6c " in claims
    assert claim_status(results, "previous", panel="tko_toy_paper") == ("not yet tested", "runs pending (issue 17)")


def test_fewer_than_nine_pairs_is_descriptive_and_no_runs_is_graceful(results, tmp_path_factory):
    for seed in range(4, 11):
        shutil.rmtree(next((results / "final" / "paper" / "tko_toy" / "nico").glob(f"*seed={seed}")))
    evidence.endpoints.cache_clear()
    comps = {c.optimizer: c for c in primary_family(results)}
    assert comps["nico"].n == 3 and comps["nico"].p is None and comps["previous"].p is not None
    # NICO - KFAC on seeds 1-3: +0.001, -0.002, +0.003, median +0.001: inside the dead zone of +-0.01
    assert claim_status(results, "nico")[0] == "descriptive only: no clear direction"
    assert claim_status(results, "previous")[0] == "reproduced"  # PREVIOUS alone decides C6
    empty = tmp_path_factory.mktemp("empty")
    assert claim_status(empty) == ("not yet tested", "runs pending (issue 17)")
    for kind in evidence_tko.TABLES:
        assert evidence_tko.TABLES[kind](empty, "paper", "tko_toy").startswith("_no runs yet")


def _comp(opt, median, p_holm, ci_low=-0.005):
    return Comparison(opt, "kfac", 10, median, ci_low, 0.01, 5, p_holm, p_holm)


@pytest.mark.parametrize("previous, status", [
    (_comp("previous", -0.01, 0.01), "reproduced"),
    (_comp("previous", 0.01, 0.01), "contradicted"),
    (_comp("previous", 0.0, 0.5), "not reproduced"),         # the interval's lower end > -0.01
    (_comp("previous", 0.0, 0.5, -0.02), "inconclusive"),   # a gain of 0.01 not excluded
])
def test_c6_rule_is_decided_on_previous_alone(monkeypatch, previous, status):
    nico = _comp("nico", 0.02, 0.001)  # NICO significantly higher: C6b's business, not C6's
    monkeypatch.setattr(evidence_tko, "primary_family", lambda *a, **k: [previous, nico])
    assert claim_status("unused")[0] == status
    assert claim_status("unused", "nico")[0] == "contradicted"


def test_a_diverged_run_takes_the_worst_rank(results):
    run = next((results / "final" / "paper" / "tko_toy" / "previous").glob("*seed=3"))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "diverged"}))
    evidence.endpoints.cache_clear()
    frame = tko_endpoints(results, "paper", "tko_toy")
    finite = frame[frame["status"] != "diverged"]["last5_mean"]
    worst = frame[(frame["optimizer"] == "previous") & (frame["seed"] == 3)]["last5_mean"].item()
    assert worst == finite.max() + 1.0
    prev = next(c for c in primary_family(results) if c.optimizer == "previous")
    assert prev.lower == 9  # the diverged seed counts against PREVIOUS


def test_a_run_failed_before_its_first_epoch_takes_the_worst_rank(results):
    """A failed run has no metrics.csv and is not complete, yet it is a result of the paired design:
    it enters the family ranked worst instead of dropping out of it."""
    run = next((results / "final" / "paper" / "tko_toy" / "nico").glob("*seed=4"))
    (run / "metrics.csv").unlink()
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "failed", "complete": False}))
    evidence.endpoints.cache_clear()
    frame = tko_endpoints(results, "paper", "tko_toy").set_index(["optimizer", "seed"])
    finite = frame[frame["status"] != "failed"]["last5_mean"]
    assert frame.loc[("nico", 4), "last5_mean"] == finite.max() + 1.0
    nico = next(c for c in primary_family(results) if c.optimizer == "nico")
    assert nico.n == 10  # the failed seed stays paired; without it NICO would have 9 pairs


def test_figure8_draws_runs_paired_differences_and_depth(results, capsys):
    """``python -m kfac2l.plots --figure 8`` draws from the run files only."""
    from kfac2l.plots.__main__ import main

    assert main(["--figure", "8", "--profile", "paper", "--results", str(results)]) == 0
    out = results / "figures" / "paper"
    paths = {"figure": out / "figure8.png", "data": out / "figure8.csv", "summary": out / "figure8_summary.csv"}
    assert str(paths["figure"]) in capsys.readouterr().out and paths["figure"].stat().st_size > 10_000
    data = pd.read_csv(paths["data"])
    paired = data[(data["kind"] == "paired") & (data["optimizer"] == "previous")].sort_values("seed")
    assert np.allclose(paired["paired_difference"], [-0.002 * s for s in SEEDS])
    assert set(data[data["kind"] == "paired"]["optimizer"]) == {"previous", "nico", "sgd"}
    assert set(data[data["kind"] == "curve"]["optimizer"]) == {"kfac", "previous", "nico", "sgd"}
    summary = pd.read_csv(paths["summary"]).set_index(["panel", "optimizer"])
    assert summary.loc[("tko_toy", "kfac"), "last5_mean_median"] == pytest.approx(0.1055)
    assert summary.loc[("tko_toy", "kfac"), "seeds"] == 10
    assert summary.loc[("tko_toy_depth126", "previous"), "last5_mean_median"] == pytest.approx(0.103 - 0.009)
    assert summary.loc[("tko_toy_depth126", "previous"), "depth"] == 126
    assert "tko_toy_paper" not in summary.index.get_level_values("panel")  # no runs: drawn empty


def test_reproduce_figure8_runs_the_plan_arms_of_its_panels(results, monkeypatch):
    from kfac2l import reproduce

    launched, drawn = [], []
    monkeypatch.setattr(reproduce, "run_arms", lambda plan, names, run: launched.append((names, run)))
    monkeypatch.setattr(reproduce, "plot_figure", lambda *args: drawn.append(args) or {})
    args = ["--figure", "8", "--profile", "paper", "--results", str(results)]
    assert reproduce.main([*args, "--panels", "tko_toy", "tko_toy_depth14", "tko_toy_depth30"]) == 0
    assert launched == [(["tko", "tko_depth"], True)] and drawn[0][0] == 8
    assert reproduce.main(args[:2] + ["--results", str(results)]) == 2  # the arms are profile=paper


def _their_run(folder, opt, seed, losses, status="completed", tail=""):
    """A run of their code as scripts/run_tko_code.py writes it: per-epoch CSV and a runs.csv row."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"epoch": range(1, len(losses) + 1), "train_loss": losses}).to_csv(
        folder / f"{opt},seed={seed}.csv", index=False)
    row = pd.DataFrame([{"run": f"{opt},seed={seed}", "optimizer": opt, "seed": seed, "status": status,
                         "epochs_completed": len(losses), "epochs_requested": 5, "stderr_tail": tail,
                         "commit": "2ff652ff0adef75ff16d37c80cbd4d147ba34cb5"}])
    runs = folder / "runs.csv"
    pd.concat([pd.read_csv(runs), row] if runs.exists() else [row]).to_csv(runs, index=False)


def test_fidelity_table_by_hand(tmp_path):
    """Epochs 3-5 means: KFAC seed 1 theirs 0.10, ours 0.11 (+10 %); seed 2 theirs 0.20, ours 0.15
    (-25 %); their mean 0.15, ours 0.13 (-13.3 %); SGD seed 1 0.30 both. Their PREVIOUS failed
    (assertion in epoch 1; out of memory after epoch 4): listed, not paired."""
    theirs = tmp_path / "public_code" / "tko_toy"
    _their_run(theirs, "kfac", 1, [0.5, 0.3, 0.09, 0.10, 0.11])
    _their_run(theirs, "kfac", 2, [0.5, 0.3, 0.2, 0.2, 0.2])
    _their_run(theirs, "kfac", 3, [0.5, 0.3, 0.2, 0.2, 0.2])   # no run of ours: left out
    _their_run(theirs, "sgd", 1, [0.5, 0.4, 0.3, 0.3, 0.3])
    _their_run(theirs, "previous", 1, [], "aborted (assertion)", "AssertionError: vg_sum should be positive")
    _their_run(theirs, "previous", 2, [0.5, 0.3, 0.2, 0.2], "out of memory", "MemoryError")
    for opt, seed, tail in (("kfac", 1, [0.11] * 3), ("kfac", 2, [0.14, 0.15, 0.16]), ("sgd", 1, [0.3] * 3),
                            ("sgd", 2, [0.3] * 3), ("previous", 1, [0.1] * 3), ("previous", 2, [0.1] * 3)):
        _write_run(tmp_path, "tko_toy", opt, seed, [0.6, 0.4, *tail, 0.05], profile="paper")  # epoch 6 ignored
    table = evidence_tko.fidelity_table(tmp_path, "paper", "tko_toy")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == ["optimizer", "seed", "their code", "ours", "relative difference", "within 15%"]
    assert rows[1:] == [["KFAC", "1", "0.1000", "0.1100", "+10.0 %", "yes"],
                        ["KFAC", "2", "0.2000", "0.1500", "-25.0 %", "no"],
                        ["KFAC", "mean of 2", "0.1500", "0.1300", "-13.3 %", "yes"],
                        ["SGD", "1", "0.3000", "0.3000", "+0.0 %", "yes"]]
    assert "- PREVIOUS seed 1: aborted (assertion) after 0 complete epoch(s) of 5" in table
    assert "vg_sum should be positive" in table
    assert "- PREVIOUS seed 2: out of memory after 4 complete epoch(s) of 5 (`MemoryError`)" in table
    assert "at 2ff652f" in table


def test_fidelity_mean_needs_all_three_epochs_and_their_side_alone(tmp_path):
    assert evidence_tko.mean_over_epochs(pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "train_loss": [9, 9, 1, 2, 6]})) == 3
    assert np.isnan(evidence_tko.mean_over_epochs(pd.DataFrame({"epoch": [1, 2, 3, 4], "train_loss": [9, 9, 1, 2]})))
    _write_run(tmp_path, "tko_toy", "kfac", 1, [0.6, 0.4, 0.1, 0.1, 0.1], profile="paper")
    assert evidence_tko.fidelity_table(tmp_path, "paper", "tko_toy") == (
        "_no runs yet (nothing under public_code/tko_toy/runs.csv)_\n")
    shutil.rmtree(tmp_path / "final")
    _their_run(tmp_path / "public_code" / "tko_toy", "kfac", 1, [0.5, 0.3, 0.1, 0.1, 0.1])
    alone = evidence_tko.fidelity_table(tmp_path, "paper", "tko_toy")  # their side shown without ours
    kfac = next(line for line in alone.splitlines() if line.startswith("| KFAC"))
    assert "1 of 1" in kfac and "0.1000 [0.1000, 0.1000]" in kfac  # epochs 3-5: 0.1, 0.1, 0.1
    assert "Our runs: none yet under final/paper/tko_toy." in alone and "failures: none" in alone
