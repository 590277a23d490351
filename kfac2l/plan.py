"""The deep-linear-A evidence of docs/report.md as a plan of Hydra multiruns, in priority order.

    python -m kfac2l.plan                 # print the commands (nothing runs)
    python -m kfac2l.plan --run [--only selected matched ...] [--launcher joblib]

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

SEEDS = list(range(1, 11))
CURVATURE = [o for o in PAPER_OPTIMIZERS if o not in NO_CURVATURE]
MATCHED = {"lr": 1e-2, "damping": 1e-3}
EXACTREF_PANEL = "deep_linear_a_matched_exactref"
REFBATCH_PANEL = "deep_linear_a_refbatch{}"   # .format(samples of the reference's own Fisher batch)
REFBATCH_SIZES = (32, 128, 512)
REFBATCH_OPTIMIZERS = ("kfac", "nico", "kry-nico")
REFBATCH_EPOCHS = 10


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
        "noclip": _at_selected(results, launcher, "deep_linear_a_noclip", ("kfac", "nico", "residu"),
                               ["experiment.kl_clip=null", "seed=1,2,3"]),
        "clipgrid": [[*_base(results, launcher, f"deep_linear_a_clip_lr2_kappa{k}"), "seed=1", "optimizer=kfac",
                      "optimizer.lr=0.01", "optimizer.damping=0.001", "+optimizer.options.kl_clip_form=lr_squared",
                      f"experiment.kl_clip={k}"] for k in ("1e-3", "1e-4", "1e-5", "1e-6")],
        "exactref": [[*_base(results, launcher, EXACTREF_PANEL), "seed=1,2,3",
                      f"optimizer={_csv(['kfac', *TWO_LEVEL])}", f"optimizer.lr={MATCHED['lr']}",
                      f"optimizer.damping={MATCHED['damping']}", "profile.max_epochs=20", "diagnostics=true",
                      "exact_reference=true"]],
    }
    out["refbatch"] = [[*_base(results, launcher, REFBATCH_PANEL.format(n)), "seed=1",
                        f"optimizer={_csv(REFBATCH_OPTIMIZERS)}", f"optimizer.lr={MATCHED['lr']}",
                        f"optimizer.damping={MATCHED['damping']}", f"profile.max_epochs={REFBATCH_EPOCHS}",
                        "diagnostics=true", "exact_reference=true", f"reference_fisher_batch={n}"]
                       for n in REFBATCH_SIZES]
    out["select11"] = _select11(results, launcher)
    out.update(tko_arms(results, launcher))
    return out


TKO_PRIMARY = ("kfac", "previous", "nico")   # with SGD: 10 paired seeds (issue 17, declared before the runs)
TKO_OTHERS = ("spectral", "residu", "kry-nico", "kry-residu", "taylor")


def tko_arms(results: Path, launcher: str) -> dict[str, list[list[str]]]:
    """Issue 17: Tselepidis et al.'s toy problem at their protocol (convention=tko, their lr 1e-2 and
    damping 1e-3; 10 seeds for the primary optimisers, 3 for the others) and the depth sweep."""
    def base(name: str) -> list[str]:
        return ["experiment=tko_toy", f"experiment.name={name}", "convention=tko", "profile=paper",
                f"launcher={launcher}", f"paths.tables={results / 'tables'}", f"paths.runs={results / 'final'}"]
    curv = ["optimizer.lr=0.01", "optimizer.damping=0.001"]
    return {
        "tko": [[*base("tko_toy"), f"seed={_csv(SEEDS)}", f"optimizer={_csv(TKO_PRIMARY)}", *curv],
                [*base("tko_toy"), f"seed={_csv(SEEDS)}", "optimizer=sgd", "optimizer.lr=0.01",
                 "optimizer.damping=null"],
                [*base("tko_toy"), "seed=1,2,3", f"optimizer={_csv(TKO_OTHERS)}", *curv],
                [*base("tko_toy"), "seed=1,2,3", "optimizer=adam", "optimizer.lr=0.001", "optimizer.damping=null"]],
        "tko_depth": [[*base(f"tko_toy_depth{d}"), f"model.depth={d}", "seed=1,2,3,4,5", "profile.max_epochs=20",
                       f"optimizer={_csv(TKO_PRIMARY)}", *curv] for d in (14, 30, 62, 126)],
    }


def _at_selected(results: Path, launcher: str, name: str, optimizers, extra: list[str]) -> list[list[str]]:
    """``optimizers`` at their selected settings (the deep_linear_a selection table) under arm ``name``."""
    from kfac2l.select import read_selection

    table = results / "tables" / "paper" / "deep_linear_a"
    best = read_selection(table) if (table / "best_settings.yaml").exists() else {}
    return [[*_base(results, launcher, name), f"optimizer={o}", f"optimizer.lr={best[o]['lr']:g}",
             f"optimizer.damping={best[o]['damping']:g}", *extra] for o in optimizers if o in best]


def _select11(results: Path, launcher: str) -> list[list[str]]:
    """The three best cells of each optimiser's seed-0 grid, rerun on seed 11 for 30 epochs."""
    table = results / "tables" / "paper" / "deep_linear_a" / "runs.csv"
    if not table.exists():
        return []
    grid = pd.read_csv(table)
    grid = grid[grid["status"] == "completed"].sort_values("best_train_loss")
    calls = []
    for opt, cells in grid.groupby("optimizer", sort=False):
        for _, cell in cells.head(3).iterrows():
            damping = "null" if pd.isna(cell["damping"]) else f"{cell['damping']:g}"
            calls.append([*_base(results, launcher, "deep_linear_a_select11"), "seed=11", f"optimizer={opt}",
                          f"optimizer.lr={cell['lr']:g}", f"optimizer.damping={damping}", "profile.max_epochs=30"])
    calls += [[*_base(results, launcher, "deep_linear_a_select11"), "seed=11", "optimizer=kry-nico",
               "optimizer.lr=0.01", f"optimizer.damping={d}", "profile.max_epochs=30"] for d in ("1", "10")]
    return calls  # (KRY-NICO's damping beyond the grid's edge, 1e-1, as well)


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
    args = parser.parse_args(argv)
    plan = arms(Path(args.results), args.launcher)
    unknown = [a for a in args.only or [] if a not in plan]
    if unknown:
        print(f"kfac2l.plan: unknown arm(s) {unknown}; valid: {', '.join(plan)}", file=sys.stderr)
        return 2
    if args.run:
        yield_cpu()
    for arm in args.only or list(plan):
        for overrides in plan[arm]:
            cmd = [sys.executable, "-m", "kfac2l.train", "-m", *overrides]
            print(f"[plan:{arm}] {' '.join(cmd[1:])}", flush=True)
            if args.run:
                subprocess.run(cmd, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
