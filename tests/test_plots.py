"""Figures from small fixture result files (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kfac2l.plots import plot_figure, summary_table


def _write_run(root: Path, panel: str, opt: str, seed: int, losses, diag=None, source="debian:fashion",
               profile="quick", seconds_per_epoch=None, accuracy=0.5):
    """A finished run in the real formats (metrics.csv, summary.json); wall time 1 s unless
    ``seconds_per_epoch`` is given (then epoch x that)."""
    run = root / "final" / profile / panel / opt / f"lr=0.01,damping=0.1,seed={seed}"
    run.mkdir(parents=True)
    epochs = np.arange(1, len(losses) + 1)
    pd.DataFrame({"epoch": epochs, "iterations": 10 * epochs, "train_loss": losses, "test_loss": losses,
                  "test_accuracy": accuracy, "wall_time": 1.0 if seconds_per_epoch is None else seconds_per_epoch * epochs}
                 ).to_csv(run / "metrics.csv", index=False)
    json.dump({"complete": True, "status": "completed", "optimizer": opt, "seed": seed, "profile": profile,
               "data_source": source, "best_train_loss": float(min(losses)), "epochs_run": len(losses),
               "lr": 0.01, "damping": 0.1, "experiment": panel}, open(run / "summary.json", "w"))
    if diag is not None:
        diag.to_csv(run / "diagnostics.csv", index=False)


@pytest.fixture()
def results(tmp_path):
    it = np.arange(1, 31)
    for seed, shift in ((1, 0.0), (2, 0.2)):
        _write_run(tmp_path, "deep_linear_a", "kfac", seed, [2.0 + shift, 1.0 + shift, 0.5 + shift])
        gap = -0.1 * np.ones(30) - shift
        diag = pd.DataFrame({"iteration": it, "gap": gap, "dist_kfac": 1.0 + 0 * it, "dist_two_level": 0.5 + shift})
        _write_run(tmp_path, "deep_linear_a", "residu", seed, [1.5, 0.7 - shift, 0.3], diag)
    _write_run(tmp_path, "deep_linear_a", "sgd", 1, [2.2, 2.1, float("nan")])
    return tmp_path


def test_loss_figure_draws_median_while_all_seeds_run_and_paired_differences(results):
    paths = plot_figure(4, results, "quick", panels=["deep_linear_a"])
    assert paths["figure"].stat().st_size > 10_000
    data = pd.read_csv(paths["data"])
    curves = data[data["kind"] != "paired"]
    kfac = curves[curves["optimizer"] == "kfac"].sort_values("epoch")
    assert np.allclose(kfac["train_loss"], [2.1, 1.1, 0.6]) and kfac["all_running"].all()
    paired = data[(data["kind"] == "paired") & (data["optimizer"] == "residu")].sort_values("seed")
    assert np.allclose(paired["paired_difference"], [0.3 - 0.5, 0.3 - 0.7])  # same seed, best minus KFAC's best
    summary = pd.read_csv(paths["summary"])
    assert list(summary["optimizer"]) == ["kfac", "residu", "sgd"]  # legend order of the paper
    assert np.isclose(summary.set_index("optimizer").loc["residu", "best_train_loss_median"], 0.3)


def test_median_is_not_drawn_over_a_shrinking_set_of_seeds():
    from kfac2l.plots.figures import seed_bands

    curves = pd.DataFrame({"optimizer": "kfac", "seed": [1, 1, 1, 2, 2], "epoch": [1, 2, 3, 1, 2],
                           "train_loss": [1.0, 0.9, 0.1, 2.0, 1.9]})
    bands = seed_bands(curves).set_index("epoch")
    assert list(bands["all_running"]) == [True, True, False]  # seed 2 stopped after epoch 2
    assert bands.loc[2, "median"] == pytest.approx(1.4) and bands.loc[3, "seeds"] == 1


def test_gap_figure_smooths_and_distance_figure_ratio(results):
    gap = pd.read_csv(plot_figure(5, results, "quick", panels=["deep_linear_a"])["data"])
    assert set(gap["optimizer"]) == {"residu"}  # only two-level methods
    assert np.allclose(gap["gap"], -0.2) and np.allclose(gap["gap_smoothed"], -0.2)
    dist = pd.read_csv(plot_figure(6, results, "quick", panels=["deep_linear_a"])["data"])
    assert np.allclose(dist["ratio"], 0.6)


def test_missing_panel_is_drawn_empty_and_bad_figure_rejected(results, tmp_path):
    paths = plot_figure(4, results, "quick")  # deep_linear_b has no results
    assert paths["figure"].exists()
    with pytest.raises(ValueError, match="figure=1"):
        plot_figure(1, results)
    with pytest.raises(ValueError, match="unknown panel"):
        plot_figure(4, results, panels=["nope"])


def test_summary_table_counts_seeds(results):
    table = summary_table(results / "final" / "quick" / "deep_linear_a")
    assert table.set_index("optimizer").loc["kfac", "seeds"] == 2


def test_notebook_runs_on_committed_results():
    import nbformat
    from nbclient import NotebookClient

    repo = Path(__file__).resolve().parents[1]
    if not (repo / "results" / "final" / "quick" / "deep_linear_a").exists():
        pytest.fail("the committed quick-profile results (results/final/quick) are missing")
    nb = nbformat.read(repo / "notebooks" / "explore_results.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(repo / "notebooks")}})
    client.execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "execute_result" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # Figure 4a drawn inline


def test_reproduce_stops_early_when_data_is_missing(tmp_path, capsys):
    from kfac2l.reproduce import main

    code = main(["--figure", "3", "--panels", "cuda_convnet", "--results", str(tmp_path),
                 "--data", str(tmp_path / "data")])
    assert code == 3
    assert "cifar-10" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.parametrize("args,needle", [
    (["--figure", "4", "--panels", "deep_linear_a", "--optimizers", "kfac", "lbfgs"],
     "--optimizers lbfgs not in panel deep_linear_a; valid: kfac, nico,"),
    (["--figure", "7", "--panels", "deep_linear_a_abl_init", "--optimizers", "kfac"], "valid: leave --optimizers out"),
])
def test_reproduce_names_a_bad_optimizer_subset_before_training(data_root, tmp_path, capsys, args, needle):
    from kfac2l.reproduce import main

    code = main([*args, "--results", str(tmp_path), "--data", str(data_root), "--set", "dataset.download=false",
                 "experiment.batch_size=32"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "final").exists()  # nothing trained


def test_report_renders_median_and_range_and_keeps_readme_in_sync(results, tmp_path):
    from kfac2l.report import update

    text = "before\n<!-- table:final:quick:deep_linear_a -->\nstale\n<!-- /table -->\nafter\n"
    new = update(text, results)
    assert new.startswith("before\n") and new.endswith("<!-- /table -->\nafter\n") and "stale" not in new
    row = next(line for line in new.splitlines() if line.startswith("| KFAC"))
    assert "0.6 [0.5, 0.7]" in row  # median [min, max] over the two seeds
    residu = next(line for line in new.splitlines() if line.startswith("| RESIDU"))
    # distance ratio: median over the seeds of (0.5, 0.7); gap negative at every iteration
    assert residu.split("|")[-3].strip() == "0.6" and residu.split("|")[-2].strip() == "100 %"
    assert update(new, results) == new
