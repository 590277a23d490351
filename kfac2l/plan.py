"""The deep-linear-A evidence of docs/report.md as a plan of Hydra multiruns, in priority order.

    python -m kfac2l.plan                 # print the commands (nothing runs)
    python -m kfac2l.plan --run [--only selected matched ...] [--launcher joblib]
    python -m kfac2l.plan --status [--only ...]   # complete runs per arm and step (reads results only)

Every arm has an experiment name (a folder under ``results/final/paper/``) of its own; runs whose
``summary.json`` is complete with the same identity are skipped, interrupted ones resume, so the
plan is rerun until it is done (``make evidence-paired``). Run it from a clean commit, at ``nice``
with one thread per run (the joblib launcher runs two at a time). Arms:

  selected   every optimiser at its selected setting, seeds 1-10 (diagnostics on seed 1)
  matched    NICO, SPECTRAL, KRY-NICO, KRY-RESIDU at KFAC's selected lr 1e-2, damping 1e-3, seeds 1-10
             (the other curvature methods selected exactly that: their selected-arm runs pair with these)
  noclip     KFAC, NICO and RESIDU at their selected settings without the KL clip, seeds 1-3
  clipgrid   KFAC with the lr^2 clip form, kappa in {1e-3, 1e-4, 1e-5, 1e-6}, seed 1
  select11   the three best grid cells of each optimiser on grid seed 11, 30 epochs, and KRY-NICO's
             damping beyond the grid's edge (1, 10)
  exactref   the matched arm with the exact reference, seeds 1-3, first 20 epochs
  refbatch   KFAC, NICO, KRY-NICO at the matched settings, seed 1, 10 epochs, the exact reference on a
             Fisher batch of its own of 32, 128 or 512 samples (the optimiser's, and its trajectory,
             unchanged: seed 1 of exactref is the same trajectory with the optimiser's own batch)
  tko        issue 17: Tselepidis et al.'s toy problem under convention=tko (KFAC, PREVIOUS, NICO,
             SGD seeds 1-10; the other two-level methods and ADAM seeds 1-3)
  tko_depth  issue 17: KFAC, PREVIOUS, NICO at depths 14, 30, 62, 126, seeds 1-5, 20 epochs
  tko_paper  issue 17: the toy problem at the paper's protocol (convention=paper, batch 512, no lr
             schedule): the small grid over 10 epochs of seed 0 (KFAC, PREVIOUS, NICO, SGD, ADAM),
             the selection (``kfac2l.select``), then KFAC, PREVIOUS, NICO, SGD seeds 1-10 at it
  standin_b  issue 17, item 8: STAND-IN, deep linear B's architecture on Fashion-MNIST: KFAC and NICO
             at KFAC's deep-linear-A setting, SGD and ADAM at theirs, seed 1, 10 epochs (descriptive)

A step is a ``kfac2l.train -m`` multirun (its overrides) or, where it starts with ``kfac2l.select``,
the selection between an arm's grid and its final runs. Figure 8 draws the three tko arms
(``PANEL_ARMS``; ``python -m kfac2l.plots --figure 8 --profile paper`` draws without training).

The stand-in for C1/C2 (issue 17) goes through the figure pipeline, which selects on a grid first:
``python -m kfac2l.reproduce --figure 9 --profile paper --grid demo --grid-epochs 3 --seeds 1 2 3``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from kfac2l.names import NO_CURVATURE, PAPER_OPTIMIZERS, TWO_LEVEL
from kfac2l.runs import iter_runs

SEEDS = list(range(1, 11))
CURVATURE = [o for o in PAPER_OPTIMIZERS if o not in NO_CURVATURE]
MATCHED = {"lr": 1e-2, "damping": 1e-3}
EXACTREF_PANEL = "deep_linear_a_matched_exactref"
EXACTREF_SEEDS, EXACTREF_EPOCHS = 3, 20
REFBATCH_PANEL = "deep_linear_a_refbatch{}"   # .format(samples of the reference's own Fisher batch)
REFBATCH_SIZES = (32, 128, 512)
REFBATCH_OPTIMIZERS = ("kfac", "nico", "kry-nico")
REFBATCH_EPOCHS = 10
NOCLIP_PANEL = "deep_linear_a_noclip"
NOCLIP_OPTIMIZERS = ("kfac", "nico", "residu")
NOCLIP_SEEDS = (1, 2, 3)
CLIPGRID_PANEL = "deep_linear_a_clip_lr2_kappa{}"   # .format(kappa) under the lr^2 clip form
CLIPGRID_KAPPAS = ("1e-3", "1e-4", "1e-5", "1e-6")
SELECT11_PANEL = "deep_linear_a_select11"
SELECT11_SEED, SELECT11_EPOCHS, SELECT11_CELLS = 11, 30, 3
SELECT11_EDGE = ("1", "10")                         # KRY-NICO's damping beyond the grid's edge (1e-1)


def _base(results: Path, launcher: str, name: str) -> list[str]:
    return ["experiment=deep_linear_a", f"experiment.name={name}", "profile=paper", f"launcher={launcher}",
            f"paths.tables={results / 'tables'}", f"paths.runs={results / 'final'}"]


def _csv(values) -> str:
    return ",".join(map(str, values))


def arms(results: Path, launcher: str) -> dict[str, list[list[str]]]:
    """Each arm's multirun override lists (one list per ``python -m kfac2l.train -m`` call)."""
    sel = ["experiment=deep_linear_a", "profile=paper", f"launcher={launcher}", "use_best=true",
           f"paths.tables={results / 'tables'}", f"paths.runs={results / 'final'}"]
    plain = [o for o in PAPER_OPTIMIZERS if o in NO_CURVATURE]
    out = {
        "selected": [[*sel, f"seed={_csv(SEEDS[1:])}", f"optimizer={_csv(PAPER_OPTIMIZERS)}"],
                     [*sel, "seed=1", f"optimizer={_csv(CURVATURE)}", "diagnostics=true", "exact_reference=true"],
                     [*sel, "seed=1", f"optimizer={_csv(plain)}"]],
        # KFAC, PREVIOUS, RESIDU and TAYLOR selected exactly these settings: their runs are the selected arm's
        "matched": [[*_base(results, launcher, "deep_linear_a_matched"), f"seed={_csv(SEEDS)}",
                     "optimizer=nico,spectral,kry-nico,kry-residu", f"optimizer.lr={MATCHED['lr']}",
                     f"optimizer.damping={MATCHED['damping']}"]],
        "noclip": _at_selected(results, launcher, NOCLIP_PANEL, NOCLIP_OPTIMIZERS,
                               ["experiment.kl_clip=null", f"seed={_csv(NOCLIP_SEEDS)}"]),
        "clipgrid": [[*_base(results, launcher, CLIPGRID_PANEL.format(k)), "seed=1", "optimizer=kfac",
                      "optimizer.lr=0.01", "optimizer.damping=0.001", "+optimizer.options.kl_clip_form=lr_squared",
                      f"experiment.kl_clip={k}"] for k in CLIPGRID_KAPPAS],
        "exactref": [[*_base(results, launcher, EXACTREF_PANEL), f"seed={_csv(range(1, EXACTREF_SEEDS + 1))}",
                      f"optimizer={_csv(['kfac', *TWO_LEVEL])}", f"optimizer.lr={MATCHED['lr']}",
                      f"optimizer.damping={MATCHED['damping']}", f"profile.max_epochs={EXACTREF_EPOCHS}",
                      "diagnostics=true",
                      "exact_reference=true"]],
    }
    out["refbatch"] = [[*_base(results, launcher, REFBATCH_PANEL.format(n)), "seed=1",
                        f"optimizer={_csv(REFBATCH_OPTIMIZERS)}", f"optimizer.lr={MATCHED['lr']}",
                        f"optimizer.damping={MATCHED['damping']}", f"profile.max_epochs={REFBATCH_EPOCHS}",
                        "diagnostics=true", "exact_reference=true", f"reference_fisher_batch={n}"]
                       for n in REFBATCH_SIZES]
    out["select11"] = _select11(results, launcher)
    out["standin_b"] = standin_b_arm(results, launcher)
    out.update(tko_arms(results, launcher))
    return out


TKO_PRIMARY = ("kfac", "previous", "nico")   # with SGD: 10 paired seeds (issue 17, declared before the runs)
TKO_OTHERS = ("spectral", "residu", "kry-nico", "kry-residu", "taylor")
TKO_DEPTHS = (14, 30, 62, 126)                # hidden blocks: 16, 32, 64, 128 linear layers
TKO_PAPER_GRID_EPOCHS = 10
SELECT = "kfac2l.select"                      # a step that starts with this runs the selection
# the arm that makes each panel of Figure 8 (kfac2l.reproduce --figure 8 runs these, then draws)
PANEL_ARMS = {"tko_toy": "tko", "tko_toy_paper": "tko_paper", **{f"tko_toy_depth{d}": "tko_depth" for d in TKO_DEPTHS},
              "deep_linear_b_fmnist": "standin_b"}


def _tko_base(results: Path, launcher: str, name: str, convention: str) -> list[str]:
    return ["experiment=tko_toy", f"experiment.name={name}", f"convention={convention}", "profile=paper",
            f"launcher={launcher}", f"paths.tables={results / 'tables'}"]


def tko_arms(results: Path, launcher: str) -> dict[str, list[list[str]]]:
    """Issue 17: Tselepidis et al.'s toy problem at their protocol (convention=tko, their lr 1e-2 and
    damping 1e-3; 10 seeds for the primary optimisers, 3 for the others), the depth sweep, and the
    same problem at the paper's protocol (``tko_paper_arm``)."""
    def base(name: str) -> list[str]:
        return [*_tko_base(results, launcher, name, "tko"), f"paths.runs={results / 'final'}"]
    curv = ["optimizer.lr=0.01", "optimizer.damping=0.001"]
    return {
        "tko": [[*base("tko_toy"), f"seed={_csv(SEEDS)}", f"optimizer={_csv(TKO_PRIMARY)}", *curv],
                [*base("tko_toy"), f"seed={_csv(SEEDS)}", "optimizer=sgd", "optimizer.lr=0.01",
                 "optimizer.damping=null"],
                [*base("tko_toy"), "seed=1,2,3", f"optimizer={_csv(TKO_OTHERS)}", *curv],
                [*base("tko_toy"), "seed=1,2,3", "optimizer=adam", "optimizer.lr=0.001", "optimizer.damping=null"]],
        "tko_depth": [[*base(f"tko_toy_depth{d}"), f"model.depth={d}", "seed=1,2,3,4,5", "profile.max_epochs=20",
                       f"optimizer={_csv(TKO_PRIMARY)}", *curv] for d in TKO_DEPTHS],
        "tko_paper": tko_paper_arm(results, launcher),
    }


def tko_paper_arm(results: Path, launcher: str, name: str = "tko_toy_paper") -> list[list[str]]:
    """Issue 17 item 5: the toy problem (their data, student network and initialisation) at the
    paper's protocol: convention=paper (a fresh Fisher batch of B/4, T_cov = T_inv = 100, the
    unscaled KL clip, weight decay 1e-3), batch 512, early stopping with patience 10 and no
    learning-rate schedule (the paper names none, section 4; their ReduceLROnPlateau is dropped).
    Steps: lr x damping on the small grid ({1e-4, ..., 1e-1}) over the first 10 epochs of seed 0
    (outside the final seeds) for KFAC, PREVIOUS, NICO and lr for SGD, ADAM; the selection (lowest
    best training loss, as ``kfac2l.reproduce``); seeds 1-10 of KFAC, PREVIOUS, NICO, SGD at the
    selected settings (``use_best=true``) for the experiment's 30 epochs."""
    base = [*_tko_base(results, launcher, name, "paper"), "experiment.batch_size=512", "experiment.scheduler=null"]
    grid = [*base, "seed=0", f"profile.max_epochs={TKO_PAPER_GRID_EPOCHS}", f"paths.runs={results / 'runs'}"]
    select = [SELECT, "--experiment", name, "--profile", "paper", "--runs", str(results / "runs"),
              "--tables", str(results / "tables"), "--max-epochs", str(TKO_PAPER_GRID_EPOCHS)]
    return [[*grid, f"optimizer={_csv(TKO_PRIMARY)}", "search=small"],
            [*grid, "optimizer=sgd,adam", "search=small_lr"],
            select,
            [*base, "use_best=true", f"seed={_csv(SEEDS)}", f"optimizer={_csv([*TKO_PRIMARY, 'sgd'])}",
             f"paths.runs={results / 'final'}"]]


def command(step: list[str]) -> list[str]:
    """The command line of one plan step: the selection, or a ``kfac2l.train`` multirun."""
    if step[0] == SELECT:
        return [sys.executable, "-m", *step]
    return [sys.executable, "-m", "kfac2l.train", "-m", *step]


def run_arms(plan: dict[str, list[list[str]]], names, run: bool) -> None:
    """Print (and with ``run`` launch, one after the other) the steps of the arms ``names``."""
    for arm in names:
        for step in plan[arm]:
            cmd = command(step)
            print(f"[plan:{arm}] {' '.join(cmd[1:])}", flush=True)
            if run:
                subprocess.run(cmd, check=False)


def _at_selected(results: Path, launcher: str, name: str, optimizers, extra: list[str]) -> list[list[str]]:
    """``optimizers`` at their selected settings (the deep_linear_a selection table) under arm ``name``."""
    from kfac2l.select import read_selection

    table = results / "tables" / "paper" / "deep_linear_a"
    best = read_selection(table) if (table / "best_settings.yaml").exists() else {}
    return [[*_base(results, launcher, name), f"optimizer={o}", f"optimizer.lr={best[o]['lr']:g}",
             f"optimizer.damping={best[o]['damping']:g}", *extra] for o in optimizers if o in best]


STANDIN_B = "deep_linear_b_fmnist"
STANDIN_B_EPOCHS = 10


def standin_b_arm(results: Path, launcher: str) -> list[list[str]]:
    """Issue 17, item 8 (only if the budget is left): the deep linear B architecture on Fashion-MNIST,
    a stand-in for C3 on the paper's Figure 4b: KFAC and NICO at KFAC's selected setting on deep
    linear A (lr 1e-2, damping 1e-3), SGD at its (lr 1e-2) and ADAM at its (lr 1e-3), seed 1,
    10 epochs, no grid (descriptive)."""
    base = ["experiment=deep_linear_b_fmnist", "profile=paper", f"launcher={launcher}",
            f"paths.tables={results / 'tables'}", f"paths.runs={results / 'final'}", "seed=1",
            f"profile.max_epochs={STANDIN_B_EPOCHS}"]
    return [[*base, "optimizer=kfac,nico", f"optimizer.lr={MATCHED['lr']}", f"optimizer.damping={MATCHED['damping']}"],
            [*base, "optimizer=sgd", "optimizer.lr=0.01", "optimizer.damping=null"],
            [*base, "optimizer=adam", "optimizer.lr=0.001", "optimizer.damping=null"]]


def _select11(results: Path, launcher: str) -> list[list[str]]:
    """The three best cells of each optimiser's seed-0 grid, rerun on seed 11 for 30 epochs."""
    table = results / "tables" / "paper" / "deep_linear_a" / "runs.csv"
    if not table.exists():
        return []
    grid = pd.read_csv(table)
    grid = grid[grid["status"] == "completed"].sort_values("best_train_loss")
    calls = []
    for opt, cells in grid.groupby("optimizer", sort=False):
        for _, cell in cells.head(SELECT11_CELLS).iterrows():
            damping = "null" if pd.isna(cell["damping"]) else f"{cell['damping']:g}"
            calls.append([*_base(results, launcher, SELECT11_PANEL), f"seed={SELECT11_SEED}", f"optimizer={opt}",
                          f"optimizer.lr={cell['lr']:g}", f"optimizer.damping={damping}",
                          f"profile.max_epochs={SELECT11_EPOCHS}"])
    calls += [[*_base(results, launcher, SELECT11_PANEL), f"seed={SELECT11_SEED}", "optimizer=kry-nico",
               "optimizer.lr=0.01", f"optimizer.damping={d}", f"profile.max_epochs={SELECT11_EPOCHS}"]
              for d in SELECT11_EDGE]
    return calls  # (KRY-NICO's damping beyond the grid's edge, 1e-1, as well)


def _overrides(step: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in step if "=" in item and not item.startswith("+"))


def _setting(value: str | None):
    """An override's lr or damping: None when not given (any value matches), 'null' kept as is."""
    return None if value is None else value if value == "null" else float(value)


def _matches(summary: dict, key: str, want) -> bool:
    got = summary.get(key)
    if want is None:
        return True
    if want == "null":
        return got is None
    return got is not None and abs(float(got) - want) <= 1e-9 * abs(want)


def step_status(step: list[str]) -> dict | None:
    """One training step's expected runs (optimiser x seed, at its lr and damping when the step sets
    them) against the complete runs under its experiment folder; None for a selection or grid step
    (grids: ``python -m kfac2l.status``)."""
    if step[0] == SELECT or any(item.startswith("search=") for item in step):
        return None
    ov = _overrides(step)
    name = ov.get("experiment.name", ov.get("experiment"))
    root = Path(ov["paths.runs"]) / ov.get("profile", "paper") / name
    lr, damping = _setting(ov.get("optimizer.lr")), _setting(ov.get("optimizer.damping"))
    done = [r.summary for r in iter_runs(root)] if root.exists() else []
    at = "" if lr is None and damping is None else f" @{ov.get('optimizer.lr', '-')}/{ov.get('optimizer.damping', '-')}"
    missing = [f"{opt} s{seed}{at}" for opt in ov["optimizer"].split(",") for seed in map(int, ov["seed"].split(","))
               if not any(s.get("optimizer") == opt and int(s.get("seed", -1)) == seed and _matches(s, "lr", lr)
                          and _matches(s, "damping", damping) for s in done)]
    expected = len(ov["optimizer"].split(",")) * len(ov["seed"].split(","))
    return {"experiment": name, "expected": expected, "complete": expected - len(missing), "missing": missing}


def status_table(plan: dict[str, list[list[str]]], names, shown: int = 6) -> pd.DataFrame:
    """Per arm and experiment folder: complete runs of those expected, and the first missing ones."""
    rows = [{"arm": arm, **row} for arm in names for row in map(step_status, plan[arm]) if row is not None]
    frame = pd.DataFrame(rows, columns=["arm", "experiment", "expected", "complete", "missing"])
    if frame.empty:
        return frame
    frame = frame.groupby(["arm", "experiment"], sort=False, as_index=False).agg(
        {"expected": "sum", "complete": "sum", "missing": "sum"})
    frame["missing"] = [", ".join(m[:shown]) + (f" (+{len(m) - shown})" if len(m) > shown else "")
                        for m in frame["missing"]]
    return frame


def yield_cpu() -> None:
    """Lower this process group's CPU share below any interactive work. ``nice`` alone does not do
    it under Linux's autogroup scheduling (on by default), where each session gets an equal share
    whatever its nice value: the session's autogroup gets nice 19 too (inherited by the runs)."""
    os.nice(19 - os.nice(0))
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:
        pass  # no autogroup (other OS, or not permitted): nice alone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--launcher", default="joblib", choices=["local", "joblib", "slurm", "submitit_local"])
    parser.add_argument("--only", nargs="*", default=None, help="arms to run, in this order (default: all)")
    parser.add_argument("--run", action="store_true", help="launch (default: print the commands)")
    parser.add_argument("--status", action="store_true", help="only count the complete runs of each arm")
    args = parser.parse_args(argv)
    plan = arms(Path(args.results), args.launcher)
    unknown = [a for a in args.only or [] if a not in plan]
    if unknown:
        print(f"kfac2l.plan: unknown arm(s) {unknown}; valid: {', '.join(plan)}", file=sys.stderr)
        return 2
    if args.status:
        print(status_table(plan, args.only or list(plan)).to_markdown(index=False))
        return 0
    if args.run:
        yield_cpu()
    run_arms(plan, args.only or list(plan), args.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
