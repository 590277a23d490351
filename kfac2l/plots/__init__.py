"""Figures of the paper (2-5) and Figure 6 (true distances), from result files only.

Nothing here trains: every figure is drawn from the ``metrics.csv``, ``summary.json`` and
``diagnostics.csv`` files of finished runs, and each figure is written together with a CSV of
exactly what it plots and a summary table.
"""

from kfac2l.plots.figures import FIGURES, PANELS, plot_figure
from kfac2l.plots.results import load_curves, load_diagnostics, summary_table

__all__ = ["FIGURES", "PANELS", "plot_figure", "load_curves", "load_diagnostics", "summary_table"]
