"""Figures 2-6 from the final runs under ``<results>/final/<profile>/<panel>``.

  Figure 2  training loss vs epoch, CURVES / MNIST / FACES auto-encoders x three batch sizes
  Figure 3  Cuda-convnet/CIFAR-10, ResNet18/CIFAR-100, ResNet34/SVHN
  Figure 4  deep linear A/Fashion-MNIST, deep linear B/MNIST
  Figure 5  gap E(beta*) - E(0) of eq. (4.6) vs iteration, two-level methods, Gaussian smoothing
            sigma = 3, first 20000 iterations, zero line
  Figure 6  true squared F_bullet-distances of the KFAC and two-level steps to the exact natural
            gradient step (top) and their ratio (bottom) vs iteration: the paper's claim tested.
Each figure is written as PNG with a CSV of exactly what it plots and a summary CSV (best training
loss per optimiser per panel, epochs run). Titles state the profile and the data source.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.ndimage import gaussian_filter1d  # noqa: E402

from kfac2l.io import atomic_write_csv  # noqa: E402
from kfac2l.plots.results import COLORS, LABELS, ORDER, load_curves, load_diagnostics, summary_table  # noqa: E402

TWO_LEVEL = ["nico", "spectral", "residu", "kry-nico", "kry-residu", "previous", "taylor"]


@dataclass(frozen=True)
class Panel:
    """One problem of a figure: a run directory name, the experiment config and its overrides."""

    name: str
    experiment: str
    title: str
    overrides: tuple[str, ...] = ()
    diagnostics: bool = False
    optimizers: tuple[str, ...] = field(default=("kfac", *TWO_LEVEL, "adam", "sgd"))


def _ae(name, experiment, batch, title, diagnostics=False):
    return Panel(name, experiment, f"{title}, batch {batch}",
                 (f"experiment.batch_size={batch}", f"experiment.name={name}"), diagnostics)


PANELS: dict[str, Panel] = {p.name: p for p in [
    *[_ae(f"curves_ae_bs{b}", "curves_ae", b, "CURVES AE", b == 128) for b in (64, 128, 256)],
    *[_ae(f"mnist_ae_bs{b}", "mnist_ae", b, "MNIST AE", b == 1024) for b in (512, 1024, 2048)],
    *[_ae(f"faces_ae_bs{b}", "faces_ae", b, "FACES AE", b == 2048) for b in (1024, 2048, 4096)],
    Panel("cuda_convnet", "cuda_convnet", "Cuda-convnet / CIFAR-10", diagnostics=True),
    Panel("resnet18", "resnet18", "ResNet18 / CIFAR-100"),
    Panel("resnet34", "resnet34", "ResNet34 / SVHN"),
    Panel("deep_linear_a", "deep_linear_a", "Deep linear A / Fashion-MNIST", diagnostics=True),
    Panel("deep_linear_b", "deep_linear_b", "Deep linear B / MNIST"),
]}

FIGURES: dict[int, list[str]] = {
    2: [f"{ae}_ae_bs{b}" for ae, bs in (("curves", (64, 128, 256)), ("mnist", (512, 1024, 2048)),
                                          ("faces", (1024, 2048, 4096))) for b in bs],
    3: ["cuda_convnet", "resnet18", "resnet34"],
    4: ["deep_linear_a", "deep_linear_b"],
    5: ["curves_ae_bs128", "mnist_ae_bs1024", "faces_ae_bs2048", "cuda_convnet"],
    6: ["curves_ae_bs128", "mnist_ae_bs1024", "faces_ae_bs2048", "cuda_convnet"],
}


def _grid(n: int) -> tuple[int, int]:
    return (3, 3) if n == 9 else (1, n)


def _width(n_cols: int) -> float:
    return max(4.4 * n_cols, 7.5)


def _title(fig, text: str) -> None:
    fig.suptitle(textwrap.fill(text, 95), fontsize=9)


def _provenance(frames: list[pd.DataFrame], profile: str) -> str:
    sources = sorted({str(s) for f in frames if "data_source" in f for s in f["data_source"].dropna().unique()})
    data = "; ".join(s.split(" md5")[0] for s in sources) if sources else "no results"
    warn = " - SYNTHETIC DATA" if any("SYNTHETIC" in s for s in sources) else ""
    return f"profile={profile}{' (not the paper protocol)' if profile != 'paper' else ''}; data: {data}{warn}"


def plot_loss_figure(figure: int, panels: list[str], root: Path, out: Path, profile: str):
    """Figures 2-4: training loss (log) against epoch, mean over seeds, one curve per optimiser."""
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(_width(cols), 3.4 * rows + 1.0), squeeze=False)
    plotted, summaries, frames = [], [], []
    for ax, name in zip(axes.flat, panels):
        panel = PANELS[name]
        curves = load_curves(root / profile / name)
        frames.append(curves)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        if curves.empty:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
            continue
        mean = curves.groupby(["optimizer", "epoch"])["train_loss"].mean().reset_index()
        for opt in [o for o in ORDER if o in set(mean["optimizer"])]:
            sub = mean[mean["optimizer"] == opt]
            ax.plot(sub["epoch"], sub["train_loss"], label=LABELS[opt], color=COLORS[opt], lw=1.4)
            plotted.append(sub.assign(panel=name))
        ax.set_yscale("log")
        table = summary_table(root / profile / name)
        summaries.append(table.assign(panel=name))
    handles, labels = next(((h, lab) for h, lab in (a.get_legend_handles_labels() for a in axes.flat) if h), ([], []))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    _title(fig, f"Figure {figure}: training loss - {_provenance(frames, profile)}")
    fig.tight_layout(rect=(0, 0.1, 1, 0.94))
    return _save(fig, out, figure, plotted, summaries)


def _panel_diagnostics(panel_dir: Path, frames: list[pd.DataFrame]) -> pd.DataFrame:
    """A panel's diagnostics; its curves go to ``frames`` for the title's provenance."""
    frames.append(load_curves(panel_dir))
    return load_diagnostics(panel_dir)


def plot_gap_figure(figure: int, panels: list[str], root: Path, out: Path, profile: str, max_iter: int = 20000):
    """Figure 5: E(beta*) - E(0) (eq. 4.6) of each two-level method, smoothed with sigma = 3."""
    fig, axes = plt.subplots(1, len(panels), figsize=(_width(len(panels)), 4.2), squeeze=False)
    plotted, frames = [], []
    for ax, name in zip(axes.flat, panels):
        diag = _panel_diagnostics(root / profile / name, frames)
        ax.set_title(PANELS[name].title, fontsize=10)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("iteration")
        ax.set_ylabel("E(beta*) - E(0)")
        if diag.empty or "gap" not in diag:
            ax.text(0.5, 0.5, "no diagnostics", ha="center", va="center", transform=ax.transAxes)
            continue
        diag = diag[diag["iteration"] <= max_iter]
        mean = diag.groupby(["optimizer", "iteration"])["gap"].mean().reset_index()
        mine = []
        for opt in [o for o in TWO_LEVEL if o in set(mean["optimizer"])]:
            sub = mean[mean["optimizer"] == opt].sort_values("iteration")
            smooth = gaussian_filter1d(sub["gap"].to_numpy(), sigma=3)
            ax.plot(sub["iteration"], smooth, label=LABELS[opt], color=COLORS[opt], lw=1.2)
            mine.append(sub.assign(gap_smoothed=smooth, panel=name))
        plotted += mine
        if mine:  # symmetric log scale: gaps span many decades and both signs
            values = pd.concat(mine)["gap_smoothed"].abs()
            linthresh = max(float(values.quantile(0.1)), 1e-12)
            ax.set_yscale("symlog", linthresh=linthresh)
            locator = matplotlib.ticker.SymmetricalLogLocator(base=10, linthresh=linthresh)
            locator.set_params(numticks=6)
            ax.yaxis.set_major_locator(locator)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _title(fig, f"Figure {figure}: gap of eq. (4.6) (negative = closer to the natural gradient than KFAC) - "
                f"{_provenance(frames, profile)}")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, out, figure, plotted, [])


def plot_distance_figure(figure: int, panels: list[str], root: Path, out: Path, profile: str):
    """Figure 6: true ||zeta_x - zeta||^2_{F_bullet} for KFAC and each two-level step (top), ratio
    two-level / KFAC (bottom); ratio < 1 means the two-level step is closer to natural gradient."""
    fig, axes = plt.subplots(2, len(panels), figsize=(_width(len(panels)), 7.0), squeeze=False)
    plotted, frames = [], []
    for col, name in enumerate(panels):
        top, bottom = axes[0, col], axes[1, col]
        diag = _panel_diagnostics(root / profile / name, frames)
        top.set_title(PANELS[name].title, fontsize=10)
        bottom.axhline(1.0, color="k", lw=0.8)
        bottom.set_xlabel("iteration")
        top.set_ylabel("squared F-distance to NG step")
        bottom.set_ylabel("two-level / KFAC")
        if diag.empty or "dist_two_level" not in diag:
            top.text(0.5, 0.5, "no exact-reference diagnostics", ha="center", va="center", transform=top.transAxes)
            continue
        mean = diag.groupby(["optimizer", "iteration"])[["dist_kfac", "dist_two_level"]].mean().reset_index()
        mean["ratio"] = mean["dist_two_level"] / mean["dist_kfac"]
        for opt in [o for o in TWO_LEVEL if o in set(mean["optimizer"])]:
            sub = mean[mean["optimizer"] == opt].sort_values("iteration")
            top.plot(sub["iteration"], sub["dist_kfac"], color=COLORS[opt], lw=0.8, ls="--")
            top.plot(sub["iteration"], sub["dist_two_level"], color=COLORS[opt], lw=1.2, label=LABELS[opt])
            bottom.plot(sub["iteration"], sub["ratio"], color=COLORS[opt], lw=1.2, label=LABELS[opt])
            plotted.append(sub.assign(panel=name))
        top.set_yscale("log")
        bottom.set_yscale("log")
        top.legend(fontsize=7, title="solid: two-level, dashed: KFAC", title_fontsize=7)
    _title(fig, f"Figure {figure}: true squared F-distance to the exact natural-gradient step - "
                f"{_provenance(frames, profile)}")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, out, figure, plotted, [])


def _save(fig, out: Path, figure: int, plotted: list[pd.DataFrame], summaries: list[pd.DataFrame]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"figure": out / f"figure{figure}.png", "data": out / f"figure{figure}.csv"}
    tmp = out / f".figure{figure}.tmp.png"
    fig.savefig(tmp, dpi=120)
    tmp.replace(paths["figure"])
    plt.close(fig)
    atomic_write_csv(paths["data"], pd.concat(plotted, ignore_index=True) if plotted else pd.DataFrame())
    if summaries:
        paths["summary"] = out / f"figure{figure}_summary.csv"
        atomic_write_csv(paths["summary"], pd.concat(summaries, ignore_index=True))
    return paths


def plot_figure(figure: int, results: str | Path = "results", profile: str = "quick",
                panels: list[str] | None = None, out: str | Path | None = None) -> dict:
    """Draw figure 2-6 from ``<results>/final/<profile>/<panel>``; returns the written paths."""
    if figure not in FIGURES:
        raise ValueError(f"figure={figure!r} is not valid; choose one of {sorted(FIGURES)}")
    panels = panels or FIGURES[figure]
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        raise ValueError(f"unknown panel(s) {unknown}; valid panels: {', '.join(PANELS)}")
    root = Path(results) / "final"
    out = Path(out) if out else Path(results) / "figures" / profile
    draw = {5: plot_gap_figure, 6: plot_distance_figure}.get(figure, plot_loss_figure)
    return draw(figure, panels, root, out, profile)
