"""Reproduce a figure end to end: sweep -> select -> final seeded runs -> plot.

    python -m kfac2l.reproduce --figure 4 [--profile quick|paper] [--launcher local|joblib|slurm]
                               [--panels deep_linear_a ...] [--seeds 1 2 3] [--grid small]
                               [--grid-epochs 10] [--diagnostic-seeds 1] [--optimizers kfac nico]
    python -m kfac2l.reproduce --figure 7 --profile paper      # the ablation (fixed settings, no grid)
    python -m kfac2l.reproduce --figure 8 --profile paper      # the toy problem: kfac2l.plan's tko arms
    (a panel listed in ``kfac2l.plan.PANEL_ARMS`` is made by its plan arm, the others by the grid)

Every step is idempotent: sweep cells and final runs whose summary.json is complete are skipped,
so rerunning after an interruption redoes only what is missing. Layout under ``results/``:

  runs/<profile>/<panel>/<optimizer>/lr=...,damping=...,seed=0/   grid-search runs
  tables/<profile>/<panel>/{runs.csv,best_settings.csv,best_settings.yaml}
  final/<profile>/<panel>/<optimizer>/lr=...,damping=...,seed=S/  runs with the selected setting
  figures/<profile>/figureN.{png,csv}, figureN_summary.csv

A panel whose data set is missing is left out before any training, with the data message; the
figure shows it as "no results" (exit code 3 when no panel of the figure can run).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from kfac2l.data import DataMissingError
from kfac2l.names import NO_CURVATURE
from kfac2l.plan import PANEL_ARMS, arms, run_arms
from kfac2l.plots.figures import ABLATION, AUTHORS_SETTINGS, FIGURES, PANELS, default_seeds, figure_panels, plot_figure
from kfac2l.plots.results import summary_table
from kfac2l.select import read_selection

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# grid per profile: (curvature optimisers, lr-only optimisers)
SEARCH = {"paper": ("grid", "grid_lr"), "quick": ("quick", "quick_lr"), "demo": ("demo", "demo_lr"),
          "small": ("small", "small_lr")}


EXTRA_OVERRIDES: list[str] = []  # --set KEY=VALUE: passed to every run (e.g. device=cuda, a small subset in tests)


def _panel_overrides(panel, profile: str, launcher: str, results: Path, data: str) -> list[str]:
    return [f"experiment={panel.experiment}", *panel.overrides, f"profile={profile}", f"launcher={launcher}",
            f"paths.tables={results / 'tables'}", f"paths.data={data}", *EXTRA_OVERRIDES]


def check_data(panel, profile: str, data: str) -> None:
    """Load the panel's data set (no training) so that a missing file stops everything early."""
    from kfac2l.train import prepare

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={panel.experiment}", *panel.overrides, f"profile={profile}",
                                          f"paths.data={data}", *EXTRA_OVERRIDES])
    prepare(cfg)


def _train(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "kfac2l.train", "-m", *args]
    print("[reproduce] " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def run_panel(panel, profile: str, launcher: str, results: Path, seeds: list[int], grids: tuple[str, str],
              data: str, grid_epochs: int | None = None, diagnostic_seeds: list[int] | None = None) -> None:
    """Grid (seed 0, ``grid_epochs`` epochs if set: the selection budget) -> selection -> final runs
    (the experiment's epochs) for ``seeds``; diagnostics only for ``diagnostic_seeds``."""
    base = _panel_overrides(panel, profile, launcher, results, data)
    curvature = [o for o in panel.optimizers if o not in NO_CURVATURE]
    plain = [o for o in panel.optimizers if o in NO_CURVATURE]
    runs = results / "runs"
    budget = [f"profile.max_epochs={grid_epochs}"] if grid_epochs else []
    # 1. grid search (seed 0)
    if curvature:
        _train([*base, *budget, f"optimizer={','.join(curvature)}", f"search={grids[0]}", f"paths.runs={runs}"])
    if plain:
        _train([*base, *budget, f"optimizer={','.join(plain)}", f"search={grids[1]}", f"paths.runs={runs}"])
    # 2. selection
    select = [sys.executable, "-m", "kfac2l.select", "--experiment", panel.name, "--profile", profile,
              "--runs", str(runs), "--tables", str(results / "tables")]
    if grid_epochs:
        select += ["--max-epochs", str(grid_epochs)]
    subprocess.run(select, check=True)
    # 3. final seeded runs with the selected settings (and the diagnostics of Figures 5-6);
    #    an optimiser none of whose cells completed has no setting and is reported, not run
    best = read_selection(results / "tables" / profile / panel.name)
    missing = [o for o in panel.optimizers if o not in best]
    if missing:
        print(f"[reproduce] {panel.name}: no completed grid cell for {missing}; no final run for them", flush=True)
    final = [*base, "use_best=true", f"paths.runs={results / 'final'}"]
    diag_seeds = [s for s in (diagnostic_seeds if diagnostic_seeds is not None else seeds[:1]) if s in seeds]
    if not panel.diagnostics:
        diag_seeds = []
    plain_seeds = [s for s in seeds if s not in diag_seeds]
    diag = ["diagnostics=true", "exact_reference=true"]
    jobs = [([o for o in curvature if o in best], diag_seeds, diag), ([o for o in curvature if o in best], plain_seeds, []),
            ([o for o in plain if o in best], seeds, [])]
    for group, group_seeds, extra in jobs:
        if group and group_seeds:
            _train([*final, f"seed={','.join(map(str, group_seeds))}", f"optimizer={','.join(group)}", *extra])


def run_ablation_arm(panel, profile: str, launcher: str, results: Path, data: str) -> None:
    """One arm of Figure 7: fixed settings (the authors' selected ones), no grid, its seeds."""
    arm = next(v for v in ABLATION if v.panel == panel.name)
    base = [*_panel_overrides(panel, profile, launcher, results, data), f"paths.runs={results / 'final'}"]
    jobs: dict[tuple, list[str]] = {}
    for opt in arm.optimizers:
        jobs.setdefault((*AUTHORS_SETTINGS[opt], arm.seeds_for(opt)), []).append(opt)
    for (lr, damping, seeds), opts in jobs.items():
        _train([*base, f"optimizer={','.join(opts)}", f"optimizer.lr={lr}",
                f"optimizer.damping={'null' if damping is None else damping}", f"seed={','.join(map(str, seeds))}"])


def run_plan_panels(panels: list[str], launcher: str, results: Path) -> None:
    """Panels whose runs are ``kfac2l.plan`` arms (Figure 8, Figure 9's deep linear B): each arm once,
    in the panels' order; complete runs are skipped, interrupted ones resume (the arms fix their own
    settings and seeds)."""
    run_arms(arms(results, launcher), list(dict.fromkeys(PANEL_ARMS[p] for p in panels)), run=True)


def _with_optimizers(panel, optimizers: list[str] | None, figure: int):
    """``panel`` restricted to ``optimizers`` (all of its own when None); ValueError naming a bad one."""
    if optimizers is None:
        return panel
    if figure == 7 or panel.name in PANEL_ARMS:
        raise ValueError(f"--optimizers {' '.join(optimizers)}: the runs of panel {panel.name} (figure {figure}) "
                         "are fixed arms; valid: leave --optimizers out")
    unknown = [o for o in optimizers if o not in panel.optimizers]
    if unknown:
        raise ValueError(f"--optimizers {' '.join(unknown)} not in panel {panel.name}; "
                         f"valid: {', '.join(panel.optimizers)}")
    return dataclasses.replace(panel, optimizers=tuple(o for o in panel.optimizers if o in optimizers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=int, required=True, choices=sorted(FIGURES))
    parser.add_argument("--profile", default="quick", choices=["quick", "paper"])
    parser.add_argument("--launcher", default="local", choices=["local", "joblib", "slurm"])
    parser.add_argument("--panels", nargs="+", default=None, help="a subset of the figure's panels")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="final-run seeds (quick: 1; paper: 1 2 3)")
    parser.add_argument("--results", default="results")
    parser.add_argument("--data", default="data", help="data root (paths.data)")
    parser.add_argument("--grid", default=None, choices=sorted(SEARCH), help="search grid (default: the profile's)")
    parser.add_argument("--extra-figures", nargs="*", type=int, default=[], help="also draw these figures "
                        "for the same panels (e.g. 5 6 for the diagnostics of a Figure 4 panel)")
    parser.add_argument("--grid-epochs", type=int, default=None, help="epoch budget of the grid runs (the "
                        "selection budget; default: the profile's); final runs use the experiment's epochs")
    parser.add_argument("--diagnostic-seeds", nargs="*", type=int, default=None,
                        help="final seeds that record diagnostics (default: the first seed)")
    parser.add_argument("--optimizers", nargs="+", default=None, help="a subset of the panels' optimisers "
                        "for the grid and the final runs (default: all of them; not for figure 7 or plan arms)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides added to every run (e.g. device=cuda)")
    args = parser.parse_args(argv)
    EXTRA_OVERRIDES[:] = args.set
    try:
        panels = figure_panels(args.figure, args.panels)
    except ValueError as err:
        print(f"kfac2l.reproduce: {err}", file=sys.stderr)
        return 2
    seeds = args.seeds or default_seeds(args.profile)
    results = Path(args.results)
    planned = [p for p in panels if p in PANEL_ARMS]   # panels whose runs are kfac2l.plan arms
    gridded = [p for p in panels if p not in PANEL_ARMS]
    if planned and args.profile != "paper":
        message = (f"kfac2l.reproduce: {', '.join(planned)} of figure {args.figure} come from kfac2l.plan's arms "
                   f"{sorted({PANEL_ARMS[p] for p in planned})}, which are profile=paper; got --profile {args.profile}")
        if not gridded:
            print(f"{message}; valid: --profile paper", file=sys.stderr)
            return 2
        print(f"{message}: left out", file=sys.stderr)
        panels, planned = gridded, []
    available = []
    for name in panels:  # a panel whose data is missing is reported and left out, before any training
        try:
            check_data(PANELS[name], args.profile, args.data)
            available.append(name)
        except DataMissingError as err:
            print(f"kfac2l.reproduce: panel {name} of figure {args.figure} cannot run here: {err}", file=sys.stderr)
    if not available:
        return 3
    try:  # before any training
        chosen = {name: _with_optimizers(PANELS[name], args.optimizers, args.figure) for name in available}
    except ValueError as err:
        print(f"kfac2l.reproduce: {err}", file=sys.stderr)
        return 2
    if planned := [p for p in available if p in PANEL_ARMS]:
        run_plan_panels(planned, args.launcher, results)
    available = [p for p in available if p not in PANEL_ARMS]
    if not available:
        for path in plot_figure(args.figure, results, args.profile, panels).values():
            print(f"  {path}")
        return 0
    start = time.perf_counter()
    for name in available:
        if args.figure == 7:
            run_ablation_arm(PANELS[name], args.profile, args.launcher, results, args.data)
            continue
        run_panel(chosen[name], args.profile, args.launcher, results, seeds, SEARCH[args.grid or args.profile],
                  args.data, args.grid_epochs, args.diagnostic_seeds)
    written = [plot_figure(args.figure, results, args.profile, panels)]
    written += [plot_figure(f, results, args.profile, panels) for f in args.extra_figures]
    for name in available:
        print(f"\n{PANELS[name].title} ({args.profile} profile): best training loss per optimiser")
        print(summary_table(results / "final" / args.profile / name).to_string(index=False))
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; files:")
    for paths in written:
        for path in paths.values():
            print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
