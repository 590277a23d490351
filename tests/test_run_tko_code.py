"""scripts/run_tko_code.py without their training: the parsing of the stand-in writer's lines, the
failure classification, the one-occurrence patch check, runs.csv, bad input, the wall-clock bound,
and the whole pipeline on a fake ``train_toy.py`` committed to a throw-away git repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_plots import _write_run

from kfac2l import evidence_tko

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import run_public_code  # noqa: E402
import run_tko_code as tko  # noqa: E402

S = tko.SCALAR


def _line(tag, epoch, value, seconds=1.0, rss=500.0, vm=3000.0):
    return "\t".join([S, tag, str(epoch), repr(value), repr(seconds), repr(rss), repr(vm)])


def test_parse_scalars_keeps_complete_epochs_only():
    stdout = "\n".join([
        "SimpleMLP(", "(0): Linear(in_features=10, out_features=10, bias=False)", "", "Epoch: 0",
        _line("train/lr", 0, 0.01, 0.0), _line("train/loss", 0, 0.3201), _line("train/acc", 0, 87.5),
        _line("test/loss", 0, 0.25), _line("test/acc", 0, 90.0, 15.5, 800.0, 3300.0),
        "Epoch: 1", f"{S}\ttrain/loss\t1\t0.2",  # a short line: not the stand-in's format
        _line("train/lr", 1, 0.001, 15.6), _line("train/loss", 1, 0.107), _line("train/acc", 1, 95.0),
        _line("test/loss", 1, 0.1), _line("test/acc", 1, 99.0, 31.0, 900.0, 3400.0),
        "Epoch: 2", _line("train/lr", 2, 0.001, 31.1), _line("train/loss", 2, 0.1),  # killed in epoch 3's test
        _line("other/tag", 2, 5.0)])
    frame = tko.parse_scalars(stdout)
    assert list(frame["epoch"]) == [1, 2]  # their 0-based epochs, 1-based here
    assert list(frame["train_loss"]) == [0.3201, 0.107] and list(frame["test_loss"]) == [0.25, 0.1]
    assert list(frame["train_accuracy"]) == [0.875, 0.95] and list(frame["test_accuracy"]) == [0.9, 0.99]
    assert list(frame["lr"]) == [0.01, 0.001] and list(frame["wall_time"]) == [15.5, 31.0]
    assert list(frame["peak_rss_mb"]) == [800.0, 900.0] and list(frame["peak_vm_mb"]) == [3300.0, 3400.0]
    assert tko.parse_scalars("no scalars at all").empty


@pytest.mark.parametrize("code, stderr, timed_out, status", [
    (0, "", False, "completed"),
    (-9, "", True, "timeout"),
    (1, "Traceback ...\n  assert vg_sum > 0, \"vg_sum should be positive\"\nAssertionError: vg_sum should be positive",
     False, "aborted (assertion)"),
    (1, "RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory", False,
     "out of memory"),
    (1, "MemoryError", False, "out of memory"),
    (1, "ImportError: libtorch_cpu.so: failed to map segment from shared object", False, "out of memory"),
    (-6, "terminate called after throwing an instance of 'std::bad_alloc'", False, "out of memory"),
    (-9, "", False, "out of memory"),   # the kernel's OOM killer
    (-11, "", False, "failed (signal 11)"),
    (2, "train_toy.py: error: unrecognized arguments: --x", False, "failed (exit 2)"),
])
def test_classify(code, stderr, timed_out, status):
    assert tko.classify(code, stderr, timed_out) == status


def test_stderr_tail_keeps_the_last_nonempty_lines():
    assert tko.stderr_tail("a\n\n  b\nc  \n\nd\n") == "b | c | d"


def test_patch_must_hit_exactly_one_line(tmp_path):
    (tmp_path / "x.py").write_text("device = 'cuda'\nother = 1\n")
    run_public_code.apply_patches(tmp_path, {"x.py": ("device = 'cuda'", "device = 'cpu'")}, "abc")
    assert (tmp_path / "x.py").read_text() == "device = 'cpu'\nother = 1\n"
    with pytest.raises(SystemExit, match="expected one \"device = 'cuda'\"|found 0"):
        run_public_code.apply_patches(tmp_path, {"x.py": ("device = 'cuda'", "device = 'cpu'")}, "abc")
    (tmp_path / "y.py").write_text("a = 1\na = 1\n")
    with pytest.raises(SystemExit, match="found 2"):
        run_public_code.apply_patches(tmp_path, {"y.py": ("a = 1", "a = 2")}, "abc")
    assert (tmp_path / "y.py").read_text() == "a = 1\na = 1\n"  # left as it was


def test_their_command_is_their_defaults_on_cpu():
    args = tko.their_command("previous", 3, 5, 62)
    assert "--optimizer=gkfac" in args and "--seed=3" in args and "--epoch=5" in args and "--depth=62" in args
    assert {"--device=cpu", "--solver=approx", "--batch_size=64", "--learning_rate=0.01", "--damping=0.001",
            "--kl_clip=0.01", "--weight_decay=0.003", "--momentum=0.9", "--TCov=10", "--TInv=100"} <= set(args)


def test_merge_runs_replaces_a_rerun_and_orders_runs(tmp_path):
    path = tmp_path / "runs.csv"
    tko.merge_runs(path, [{"run": "sgd,seed=2", "optimizer": "sgd", "seed": 2, "status": "completed"},
                          {"run": "kfac,seed=10", "optimizer": "kfac", "seed": 10, "status": "timeout"}])
    tko.merge_runs(path, [{"run": "kfac,seed=10", "optimizer": "kfac", "seed": 10, "status": "completed"},
                          {"run": "kfac,seed=2", "optimizer": "kfac", "seed": 2, "status": "completed"},
                          {"run": "previous,seed=1", "optimizer": "previous", "seed": 1, "status": "out of memory"}])
    runs = pd.read_csv(path)
    assert list(runs["run"]) == ["kfac,seed=2", "kfac,seed=10", "previous,seed=1", "sgd,seed=2"]
    assert list(runs["status"]) == ["completed", "completed", "out of memory", "completed"]


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be positive; got 0"),
    (["--mem-gb", "-1"], "--mem-gb must be positive"),
    (["--depth", "-1"], "--depth must be 0 or more"),
    (["--optimizers", "adam"], "invalid choice: 'adam'"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        tko.parse_args(["--repo", "x", *argv])
    assert message in capsys.readouterr().err


def test_unknown_repo_or_commit_is_named(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        tko.resolve(str(tmp_path / "nowhere"), "2ff652f")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with pytest.raises(SystemExit, match="--commit 2ff652f is not a commit"):
        tko.resolve(str(tmp_path), "2ff652f")


def test_wall_clock_bound_kills_the_run():
    fast = subprocess.Popen(["true"], start_new_session=True)
    assert tko.wait_bounded(fast, 30) == (0, False)
    slow = subprocess.Popen(["sleep", "30"], start_new_session=True)
    assert tko.wait_bounded(slow, 0.2) == (-9, True)


FAKE = '''import sys
from tensorboardX import SummaryWriter
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
writer = SummaryWriter("runs")
for epoch in range(int(args["epoch"])):
    writer.add_scalar("train/lr", float(args["learning_rate"]), epoch)
    assert not (args["optimizer"] == "gkfac" and epoch == 1), "vg_sum should be positive"
    writer.add_scalar("train/loss", 0.5 / (epoch + 1), epoch)
    writer.add_scalar("train/acc", 90.0, epoch)
    writer.add_scalar("test/loss", 0.6 / (epoch + 1), epoch)
    writer.add_scalar("test/acc", 91.0, epoch)
'''


def test_pipeline_on_a_fake_train_toy(tmp_path):
    """main() exports a committed train_toy.py, runs it under the launcher's stand-in writer and the
    limits, and writes what fidelity_table reads: the fake's KFAC trains 5 epochs (loss 0.5 / epoch,
    mean over epochs 3-5 = (1/6 + 1/8 + 1/10) / 3); its 'gkfac' (our PREVIOUS) fails its assertion
    in the second epoch."""
    repo = tmp_path / "their"
    repo.mkdir()
    (repo / "train_toy.py").write_text(FAKE)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "train_toy.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "fake"], check=True)
    out = tmp_path / "results" / "public_code" / "tko_toy"
    tko.main(["--repo", str(repo), "--commit", "HEAD", "--optimizers", "kfac", "previous", "--seeds", "1",
              "--out", str(out)])
    runs = pd.read_csv(out / "runs.csv", keep_default_na=False).set_index("run")
    assert runs.loc["kfac,seed=1", "status"] == "completed" and runs.loc["kfac,seed=1", "epochs_completed"] == 5
    expected = (1 / 6 + 1 / 8 + 1 / 10) / 3
    assert float(runs.loc["kfac,seed=1", "mean_train_loss_3_5"]) == pytest.approx(expected, rel=1e-8)
    assert runs.loc["previous,seed=1", "status"] == "aborted (assertion)"
    assert runs.loc["previous,seed=1", "epochs_completed"] == 1
    assert runs.loc["previous,seed=1", "stderr_tail"].endswith("AssertionError: vg_sum should be positive")
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert runs.loc["kfac,seed=1", "commit"] == head and runs.loc["kfac,seed=1", "their_optimizer"] == "kfac"
    curve = pd.read_csv(out / "kfac,seed=1.csv")
    assert list(curve["epoch"]) == [1, 2, 3, 4, 5] and curve["test_accuracy"].eq(0.91).all()
    assert (curve["peak_rss_mb"] > 0).all() and curve["wall_time"].is_monotonic_increasing
    assert "AssertionError" in (out / "previous,seed=1.log").read_text()
    _write_run(tmp_path / "results", "tko_toy", "kfac", 1, [0.5, 0.3, 0.15, 0.15, 0.15], profile="paper")
    table = evidence_tko.fidelity_table(tmp_path / "results", "paper", "tko_toy")
    row = next(line for line in table.splitlines() if line.startswith("| KFAC"))
    assert f"{expected:.4f}" in row and f"{100 * (0.15 - expected) / expected:+.1f} %" in row and "| yes" in row
    assert "- PREVIOUS seed 1: aborted (assertion) after 1 complete epoch(s) of 5" in table
