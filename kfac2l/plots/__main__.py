"""Draw a figure from the committed result files, training nothing.

    python -m kfac2l.plots --figure 8 --profile paper [--panels tko_toy ...] [--results results] [--out DIR]

Writes ``figureN.png``, ``figureN.csv`` (what it plots) and, where the figure has one,
``figureN_summary.csv`` under ``<results>/figures/<profile>/`` (or ``--out``). ``python -m
kfac2l.reproduce --figure N`` makes the runs first.
"""

from __future__ import annotations

import argparse
import sys

from kfac2l.plots.figures import FIGURES, plot_figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=int, required=True, choices=sorted(FIGURES))
    parser.add_argument("--profile", default="quick", choices=["quick", "paper"])
    parser.add_argument("--panels", nargs="+", default=None, help="a subset of the figure's panels")
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default=None, help="output folder (default: <results>/figures/<profile>)")
    args = parser.parse_args(argv)
    try:
        paths = plot_figure(args.figure, args.results, args.profile, args.panels, args.out)
    except ValueError as err:
        print(f"kfac2l.plots: {err}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
