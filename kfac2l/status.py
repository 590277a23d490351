"""Sweep status: which cells of a figure's grids and final runs are done.

    python -m kfac2l.status --figure 4 [--panels deep_linear_a] [--profile paper] [--grid small]
                            [--seeds 1 2 3] [--results results]

Per panel, stage (grid / final) and optimiser: how many cells are complete, diverged, interrupted
(killed or signalled; they resume on relaunch), failed or missing; 'running' are cells whose
process is alive on this host, against the grid of the
``search`` config and the final seeds. Exits 1 while anything is interrupted, failed or missing,
0 when the sweep is done. Reads ``summary.json`` files only (``kfac2l.runs``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from kfac2l.names import NO_CURVATURE
from kfac2l.plan import PANEL_ARMS
from kfac2l.plots.figures import ABLATION, AUTHORS_SETTINGS, FIGURES, PANELS, default_seeds, figure_panels
from kfac2l.runs import read_summary
from kfac2l.train import CONFIGS, run_name

STATES = ("complete", "diverged", "running", "interrupted", "failed", "missing")


def grid_values(search: str) -> dict[str, list]:
    """The sweep values of ``configs/search/<search>.yaml``: {'optimizer.lr': [...], ...}."""
    path = CONFIGS / "search" / f"{search}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in (CONFIGS / "search").glob("*.yaml"))
        raise ValueError(f"unknown search {search!r}; valid: {', '.join(valid)}")
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    return {k: [yaml.safe_load(v) for v in str(val).split(",")] for k, val in params.items()}


def cell_state(run_dir: Path) -> str:
    summary = read_summary(run_dir)
    if summary is None:
        return "missing"
    status = summary.get("status")
    if status == "completed":
        return "complete"
    if status in ("diverged", "failed"):
        return status
    if status == "running" and _alive(summary):
        return "running"
    return "interrupted"  # interrupted, or 'running' left by a killed process


def _alive(summary: dict) -> bool:
    """Whether the process that wrote a 'running' summary is still alive on this host."""
    import os
    import socket

    pid = summary.get("pid")
    if not pid or summary.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def expected_cells(panel: str, figure: int, profile: str, grid: str, seeds: list[int], results: Path):
    """(stage, optimizer, run directory) of every cell the figure's pipeline makes for ``panel``."""
    from kfac2l.reproduce import SEARCH

    if figure == 7:
        arm = next(v for v in ABLATION if v.panel == panel)
        for opt in arm.optimizers:
            lr, damping = AUTHORS_SETTINGS[opt]
            for seed in arm.seeds_for(opt):
                yield "final", opt, results / "final" / profile / panel / opt / run_name(False, lr, damping, seed)
        return
    searches = SEARCH[grid]
    for opt in PANELS[panel].optimizers:
        values = grid_values(searches[1] if opt in NO_CURVATURE else searches[0])
        for lr in values["optimizer.lr"]:
            for damping in values.get("optimizer.damping", [None]):
                name = run_name(False, float(lr), None if damping is None else float(damping), 0)
                yield "grid", opt, results / "runs" / profile / panel / opt / name
        for seed in seeds:
            yield "final", opt, results / "final" / profile / panel / opt / run_name(True, None, None, seed)


def status_table(figure: int, panels: list[str], profile: str, grid: str, seeds: list[int], results: Path):
    rows = []
    for panel in panels:
        for stage, opt, run_dir in expected_cells(panel, figure, profile, grid, seeds, results):
            rows.append({"panel": panel, "stage": stage, "optimizer": opt, "state": cell_state(run_dir)})
    frame = pd.DataFrame(rows, columns=["panel", "stage", "optimizer", "state"])
    table = (frame.groupby(["panel", "stage", "optimizer", "state"]).size().unstack("state", fill_value=0)
             .reindex(columns=list(STATES), fill_value=0).reset_index())
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=int, required=True, choices=sorted(FIGURES))
    parser.add_argument("--panels", nargs="+", default=None)
    parser.add_argument("--profile", default="quick", choices=["quick", "paper"])
    parser.add_argument("--grid", default=None, help="search grid (default: the profile's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    try:
        panels = figure_panels(args.figure, args.panels)
    except ValueError as err:
        print(f"kfac2l.status: {err}", file=sys.stderr)
        return 2
    planned = [p for p in panels if p in PANEL_ARMS]
    if planned:
        print(f"kfac2l.status: the runs of {', '.join(planned)} are kfac2l.plan arms, not a grid; "
              f"`python -m kfac2l.plan --only {' '.join(dict.fromkeys(PANEL_ARMS[p] for p in planned))}` lists them "
              "and `make evidence-paired` skips the complete ones", file=sys.stderr)
        panels = [p for p in panels if p not in PANEL_ARMS]
        if not panels:
            return 2
    seeds = args.seeds or default_seeds(args.profile)
    try:
        table = status_table(args.figure, panels, args.profile, args.grid or args.profile, seeds, Path(args.results))
    except (ValueError, KeyError) as err:
        print(f"kfac2l.status: {err}", file=sys.stderr)
        return 2
    print(table.to_string(index=False))
    todo = int(table[["interrupted", "failed", "missing"]].to_numpy().sum())
    done = int(table[["complete", "diverged"]].to_numpy().sum())
    print(f"\n{done} cells done, {todo} to run (interrupted, failed or missing)")
    return 1 if todo else 0


if __name__ == "__main__":
    sys.exit(main())
