"""Runs you can trust: identity, resume after SIGKILL/SIGTERM, clean errors, divergence, status."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from fixtures import write_all
from hydra import compose, initialize_config_dir

from kfac2l.runs.checkpoint import CHECKPOINT
from kfac2l.train import ConfigError, check_group_choices, train, validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = str(REPO / "configs")
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=overrides)


def _small(root, extra=(), epochs=3, batch=32):
    return [f"dataset.root={root}", "dataset.download=false", f"experiment.batch_size={batch}",
            "profile.train_subset=160", "profile.test_subset=16", f"profile.max_epochs={epochs}",
            "profile.curvature_interval=2", *extra]


def _losses(run_dir: Path) -> list:
    return pd.read_csv(run_dir / "metrics.csv").drop(columns="wall_time").to_dict("records")


def _cli(args, runs):
    return [sys.executable, "-m", "kfac2l.train", *args, f"paths.runs={runs}"]


def _run_dir(runs: Path) -> Path:
    return next(runs.rglob("config.yaml")).parent


# ----------------------------------------------------------------------------- identity
def test_changed_budget_is_not_reused_but_reported_and_archived(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(_cfg(["optimizer=kfac", *_small(data_root, epochs=2)]), out)
    assert first["identity"]["budget"]["max_epochs"] == 2 and len(first["identity_id"]) == 12
    again = train(_cfg(["optimizer=kfac", *_small(data_root, epochs=2)]), out)
    assert again["wall_time"] == first["wall_time"]  # same identity: reused
    changed = train(_cfg(["optimizer=kfac", *_small(data_root, epochs=3)]), out)
    err = capsys.readouterr().err
    assert changed["epochs_run"] == 3 and changed["identity_id"] != first["identity_id"]
    assert "budget.max_epochs: 2 -> 3" in err
    archived = out.parent / ".superseded" / f"run.{first['identity_id']}"
    assert json.loads((archived / "summary.json").read_text())["epochs_run"] == 2  # nothing lost
    for key in ("experiment.batch_size=16", "+optimizer.options.damping_mode=factor", "diagnostics=true",
                "convention=authors", "model.init=identical", "profile.train_subset=128"):
        other = train(_cfg(["optimizer=kfac", *_small(data_root, epochs=3), key]), out)
        assert other["identity_id"] != changed["identity_id"], key


def test_result_files_are_group_readable(data_root, tmp_path):
    out = tmp_path / "run"
    train(_cfg(["optimizer=sgd", "optimizer.damping=null", *_small(data_root, epochs=1)]), out)
    for name in ("summary.json", "metrics.csv", "config.yaml"):
        assert (out / name).stat().st_mode & stat.S_IRGRP, name


def test_diagnostics_do_not_change_the_trajectory(data_root, tmp_path):
    """The Fisher generator is reseeded per iteration, so KFAC with the exact reference (a Fisher
    pass every step) follows exactly the trajectory of KFAC without it."""
    plain = train(_cfg(["optimizer=kfac", *_small(data_root)]), tmp_path / "a")
    diag = train(_cfg(["optimizer=kfac", "diagnostics=true", "exact_reference=true", *_small(data_root)]),
                 tmp_path / "b")
    assert plain["status"] == diag["status"] == "completed"
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


# ----------------------------------------------------------------------------- resume
def _wait_for(predicate, timeout=120.0):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _epochs_written(runs: Path) -> int:
    try:
        return len((_run_dir(runs) / "metrics.csv").read_text().splitlines()) - 1
    except (StopIteration, OSError):
        return 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_and_matches_the_uninterrupted_run(data_root, tmp_path, sig):
    args = ["optimizer=kfac", *_small(data_root, epochs=12, batch=16)]  # the signal comes at epoch 3
    whole = subprocess.run(_cli(args, tmp_path / "whole"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    runs = tmp_path / "cut"
    proc = subprocess.Popen(_cli(args, runs), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _wait_for(lambda: _epochs_written(runs) >= 3 or proc.poll() is not None), "no epoch 3"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    run_dir = _run_dir(runs)
    summary = json.loads((run_dir / "summary.json").read_text())
    if sig == signal.SIGTERM:  # checkpointed and marked, then exits 128 + 15
        assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
        assert summary["status"] == "interrupted" and (run_dir / CHECKPOINT).exists()
    else:
        assert proc.returncode == -signal.SIGKILL and summary["status"] == "running"
    if summary["complete"]:
        pytest.skip("the run finished before the signal arrived")
    again = subprocess.run(_cli(args, runs), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumes"] == 1 and summary["resumed_from_epoch"] >= 2
    assert not (run_dir / CHECKPOINT).exists()  # removed on completion (checkpoint.keep=false)
    assert _losses(run_dir) == _losses(_run_dir(tmp_path / "whole"))


def test_corrupt_checkpoint_is_reported_and_the_run_restarts(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _cfg(["optimizer=kfac", "checkpoint.keep=true", *_small(data_root, epochs=2)])
    train(cfg, out)
    summary = json.loads((out / "summary.json").read_text())
    summary.update(status="interrupted", complete=False)
    (out / "summary.json").write_text(json.dumps(summary))
    (out / CHECKPOINT).write_bytes(b"not a checkpoint")
    result = train(cfg, out)
    assert "cannot be read" in capsys.readouterr().err
    assert result["status"] == "completed" and result["resumes"] == 0


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("override,needle", [
    ("experiment.batch_size=0", "experiment.batch_size=0; valid: an integer >= 1"),
    ("experiment.batch_size=-4", "experiment.batch_size=-4"),
    ("seed=abc", "seed='abc' is not an integer"),
    ("profile.max_epochs=0", "profile.max_epochs=0; valid: an integer >= 1"),
    ("+foo=1", "unknown top-level key(s) ['foo']"),
    ("optimizer.lr=-1", "optimizer.lr=-1"),
    ("optimizer.damping=0", "optimizer.damping=0"),
    ("+optimizer.options.damping_mode=bad", "damping_mode='bad'"),
    ("model.init=zeros", "unknown model.init 'zeros'; valid: xavier, default, identical"),
    ("profile.fisher_fraction=2", "profile.fisher_fraction=2; valid: a number in (0, 1]"),
])
def test_bad_values_are_named_before_data_loading(override, needle, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(_cfg([f"dataset.root={tmp_path / 'nowhere'}", override]))
    assert needle in str(err.value) and "valid" in str(err.value)


def test_device_without_gpu_and_unwritable_data_root(tmp_path):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            validate(_cfg(["device=cuda"]))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot be created"):
        validate(_cfg([f"dataset.root={blocker / 'data'}"]))
    assert check_group_choices(["optimizer=kfac,kfak"]) == (
        "unknown optimizer 'kfak'; valid: adam, kfac, kry-nico, kry-residu, ngd, nico, previous, residu, sgd, "
        "spectral, taylor, two-level")


@pytest.mark.parametrize("args", [["experiment.batch_size=0"], ["optimizer=kfak"], ["+foo=1"]])
def test_cli_errors_are_one_line_exit_2_and_leave_no_directory(args, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run(_cli([*args, f"dataset.root={tmp_path}"], runs), cwd=REPO, env=ENV, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kfac2l: ") and "valid" in lines[0], proc.stderr
    assert not runs.exists()


def test_corrupt_data_file_is_not_reported_missing(tmp_path):
    from kfac2l.data import DataCorruptError, load_dataset

    write_all(tmp_path)
    for f in (tmp_path / "MNIST" / "raw").glob("train-images*"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataCorruptError, match="present but cannot be read"):
        load_dataset("mnist", tmp_path, download=False)
    (tmp_path / "digs3pts_1.mat").write_bytes(b"garbage")
    with pytest.raises(DataCorruptError, match="not a readable MATLAB file"):
        load_dataset("curves", tmp_path, download=False)


def test_divergence_needs_a_loss_far_above_chance(data_root, tmp_path):
    summary = train(_cfg(["optimizer=sgd", "optimizer.lr=1e4", "optimizer.damping=null", *_small(data_root, epochs=6)]),
                    tmp_path / "run")
    assert summary["status"] == "diverged" and summary["complete"]
    assert "non-finite" in summary["divergence_reason"] or "above" in summary["divergence_reason"]


# ----------------------------------------------------------------------------- select, status
def test_select_refuses_mixed_budgets_and_writes_next_to_the_runs(data_root, tmp_path):
    runs = tmp_path / "runs"
    for epochs in (1, 2):
        train(_cfg(["optimizer=kfac", *_small(data_root, epochs=epochs)]),
              runs / "quick" / "deep_linear_a" / "kfac" / f"lr=0.01,damping=0.01,seed=0,e{epochs}")
    committed = REPO / "results" / "tables" / "quick" / "deep_linear_a" / "runs.csv"
    before = committed.read_bytes() if committed.exists() else None
    base = [sys.executable, "-m", "kfac2l.select", "--experiment", "deep_linear_a", "--runs", str(runs)]
    mixed = subprocess.run(base, cwd=REPO, capture_output=True, text=True)
    assert mixed.returncode == 2 and "2 budgets cannot be compared" in mixed.stderr
    one = subprocess.run([*base, "--max-epochs", "2"], cwd=REPO, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert "read 1 complete runs" in one.stdout
    assert (runs / "quick" / "deep_linear_a" / "best_settings.yaml").exists()
    assert (committed.read_bytes() if committed.exists() else None) == before  # the committed tables untouched


def test_status_reports_a_half_finished_sweep(data_root, tmp_path):
    from kfac2l.status import main

    runs = tmp_path / "runs" / "quick" / "deep_linear_a"
    done = train(_cfg(["optimizer=kfac", "optimizer.lr=0.1", "optimizer.damping=0.1", *_small(data_root, epochs=1)]),
                 runs / "kfac" / "lr=0.1,damping=0.1,seed=0")
    assert done["status"] == "completed"
    stale = runs / "kfac" / "lr=0.1,damping=0.01,seed=0"
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text(json.dumps({"status": "running", "pid": 1, "host": "elsewhere"}))
    code = main(["--figure", "4", "--panels", "deep_linear_a", "--profile", "quick", "--grid", "quick",
                 "--results", str(tmp_path)])
    assert code == 1
    from kfac2l.status import status_table

    table = status_table(4, ["deep_linear_a"], "quick", "quick", [1], tmp_path).set_index(["stage", "optimizer"])
    row = table.loc[("grid", "kfac")]
    assert (row["complete"], row["interrupted"], row["missing"]) == (1, 1, 7)
    assert table.loc[("final", "sgd"), "missing"] == 1


def test_ablation_arms_run_with_their_ingredients_and_figure_7(data_root, tmp_path):
    """reproduce --figure 7: fixed settings per arm, each ingredient recorded in summary.json."""
    from kfac2l.reproduce import main

    panels = ["deep_linear_a_abl_init", "deep_linear_a_abl_frozen", "deep_linear_a_abl_clip"]
    code = main(["--figure", "7", "--profile", "quick", "--panels", *panels, "--results", str(tmp_path),
                 "--data", str(data_root), "--set", "dataset.download=false", "experiment.batch_size=32",
                 "profile.train_subset=160", "profile.test_subset=16", "profile.max_epochs=2"])
    assert code == 0
    final = tmp_path / "final" / "quick"
    summaries = {p: [json.loads(f.read_text()) for f in (final / p).rglob("summary.json")] for p in panels}
    assert len(summaries["deep_linear_a_abl_init"]) == 9 and len(summaries["deep_linear_a_abl_frozen"]) == 3
    assert all(s["init"] == "identical" for s in summaries["deep_linear_a_abl_init"])
    assert all(s["options"]["freeze_factors"] for s in summaries["deep_linear_a_abl_frozen"])
    assert all(s["options"]["kl_clip_form"] == "lr_squared" for s in summaries["deep_linear_a_abl_clip"])
    kfac = [s for s in summaries["deep_linear_a_abl_init"] if s["optimizer"] == "kfac"]
    assert {(s["lr"], s["damping"]) for s in kfac} == {(1e-2, 1e-2)} and {s["seed"] for s in kfac} == {1, 2, 3}
    table = pd.read_csv(tmp_path / "figures" / "quick" / "figure7_summary.csv")
    assert set(table["arm"]) == {"init", "frozen", "clip"}
    assert (table.set_index(["arm", "optimizer"]).loc[("init", "sgd"), "seeds"]) == 3


def test_convention_authors_sets_each_ingredient(tmp_path):
    from kfac2l.train import optimizer_options

    def opts(name, *extra):
        damping = "optimizer.damping=null" if name in ("sgd", "adam") else "optimizer.damping=0.01"
        return optimizer_options(_cfg([f"optimizer={name}", damping, "convention=authors", *extra]))[1]

    assert _cfg(["convention=authors"]).model.init == "identical"
    assert opts("sgd")["nesterov"] is True and "nesterov" not in opts("adam")
    kfac = opts("kfac")
    assert (kfac["damping_mode"], kfac["freeze_factors"], kfac["kl_clip_form"]) == ("unit_pi", True, "unscaled")
    nico = opts("nico")
    assert (nico["damping_mode"], nico["correction"], nico["ema_count"]) == ("factor", "additive", "iterations")
    assert "correction" not in opts("previous")  # fixed by the name, not overridden
    assert opts("kfac", "+optimizer.options.freeze_factors=false")["freeze_factors"] is False  # the run's own wins
    paper = optimizer_options(_cfg(["optimizer=kfac"]))[1]
    assert "freeze_factors" not in paper and "damping_mode" not in paper


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_submitit_local_sweep_survives_a_signal(data_root, tmp_path, sig):
    """The cluster path on one machine: SIGUSR2 (time limit) checkpoints and submitit requeues the
    job, which resumes by itself; SIGTERM checkpoints and the relaunched sweep resumes the job.
    Either way the losses are those of the uninterrupted run."""
    args = ["optimizer=kfac", *_small(data_root, epochs=12, batch=16), "profile.patience=1000"]
    whole = subprocess.run(_cli(args, tmp_path / "whole"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    runs = tmp_path / "sweep"
    sweep = _cli(["-m", "launcher=submitit_local", *args], runs)
    proc = subprocess.Popen(sweep, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _wait_for(lambda: _epochs_written(runs) >= 3 or proc.poll() is not None), "no epoch 3"
    run_dir = _run_dir(runs)
    pid = json.loads((run_dir / "summary.json").read_text())["pid"]
    os.kill(pid, sig)
    proc.communicate(timeout=300)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["status"] != "completed":  # SIGTERM: the job ended interrupted; relaunch the sweep
        assert summary["status"] == "interrupted" and (run_dir / CHECKPOINT).exists()
        again = subprocess.run(sweep, cwd=REPO, env=ENV, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr[-2000:]
        summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumes"] == 1, summary
    assert _losses(run_dir) == _losses(_run_dir(tmp_path / "whole"))


def test_failed_checkpoint_write_names_the_path_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno

    import torch

    from kfac2l.runs.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, {"identity_id": "a", "x": torch.ones(2)})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=f"could not write {tmp_path / CHECKPOINT}"):
        save_checkpoint(tmp_path, {"identity_id": "b", "x": torch.zeros(2)})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["identity_id"] == "a"
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind


def test_figure4_pipeline_grid_select_three_seeds_and_bands(data_root, tmp_path):
    """What `make demo` runs, on fixture data: a grid for a selection budget, selection, final runs
    with 3 seeds (diagnostics on the first only), Figures 4-6 with seed bands, README tables."""
    from kfac2l.reproduce import main

    code = main(["--figure", "4", "--panels", "deep_linear_a", "--profile", "quick", "--grid", "demo",
                 "--grid-epochs", "1", "--seeds", "1", "2", "3", "--extra-figures", "5", "6",
                 "--optimizers", "sgd", "kfac", "nico", "--results", str(tmp_path), "--data", str(data_root),
                 "--set", "dataset.download=false", "experiment.batch_size=32", "profile.train_subset=160",
                 "profile.test_subset=16", "profile.max_epochs=2", "profile.curvature_interval=2"])
    assert code == 0
    best = pd.read_csv(tmp_path / "tables" / "quick" / "deep_linear_a" / "best_settings.csv")
    assert set(best["budget"]) == {"max_epochs=1,patience=10,train_subset=160,batch_size=32"}
    final = tmp_path / "final" / "quick" / "deep_linear_a"
    summaries = [json.loads(p.read_text()) for p in final.rglob("summary.json")]
    assert {s["seed"] for s in summaries} == {1, 2, 3}
    assert sorted((s["optimizer"], s["seed"]) for s in summaries) == sorted(
        (o, seed) for o in ("kfac", "nico", "sgd") for seed in (1, 2, 3))  # --optimizers: those three only
    assert all(s["max_epochs"] == 2 for s in summaries)  # finals: the profile's epochs, not the grid's
    with_diag = {(s["optimizer"], s["seed"]) for s in summaries if s["options"].get("diagnostics")}
    assert with_diag and {seed for _, seed in with_diag} == {1}
    figure = pd.read_csv(tmp_path / "figures" / "quick" / "figure4.csv")
    kfac = figure[figure["optimizer"] == "kfac"]
    assert {"low", "high", "seeds"} <= set(figure.columns) and (kfac["seeds"] == 3).all()
    assert (kfac["low"] <= kfac["train_loss"]).all() and (kfac["train_loss"] <= kfac["high"]).all()
    from kfac2l.report import final_table

    table = final_table(tmp_path, "quick", "deep_linear_a")
    assert "selected on the first 1 epochs" in table and "seeds 1, 2, 3" in table


def test_git_commit_is_dirty_for_code_not_for_results(tmp_path):
    """Result files are outputs: rewriting committed results does not mark runs '+dirty'."""
    from kfac2l import io

    repo = tmp_path / "repo"
    (repo / "kfac2l").mkdir(parents=True)
    (repo / "results").mkdir()
    for path in (repo / "kfac2l" / "io.py", repo / "results" / "table.csv"):
        path.write_text("a\n")
    run = {"cwd": repo, "check": True, "capture_output": True}
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "."], **run)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"], **run)
    fake = repo / "kfac2l" / "io.py"
    original = io.__file__
    try:
        io.__file__ = str(fake)
        (repo / "results" / "table.csv").write_text("b\n")
        assert not io.git_commit().endswith("+dirty")
        fake.write_text("b\n")
        assert io.git_commit().endswith("+dirty")
    finally:
        io.__file__ = original


def test_a_run_being_trained_by_another_process_is_skipped_not_trained_twice(data_root, tmp_path, capsys):
    import fcntl

    from kfac2l.train import train

    cfg = _cfg(["optimizer=kfac", *_small(data_root, epochs=1), f"paths.runs={tmp_path}"])
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as other:  # another open file description: as another process's lock
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("4242")
        other.flush()
        assert train(cfg, out) == {"status": "running elsewhere"}
        assert "being trained by another process (pid 4242)" in capsys.readouterr().err
        assert not (out / "metrics.csv").exists()
    summary = train(cfg, out)  # the lock released: the run trains, and leaves the lock free
    assert summary["status"] == "completed" and len(pd.read_csv(out / "metrics.csv")) == 1
    with open(out / ".lock", "a+") as again:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
