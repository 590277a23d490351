"""Figures 2-9 from the final runs under ``<results>/final/<profile>/<panel>``.

  Figure 2  training loss vs epoch, CURVES / MNIST / FACES auto-encoders x three batch sizes
  Figure 3  Cuda-convnet/CIFAR-10, ResNet18/CIFAR-100, ResNet34/SVHN
  Figure 4  deep linear A/Fashion-MNIST, deep linear B/MNIST
  Figure 5  gap E(beta*) - E(0) of eq. (4.6) vs iteration, two-level methods, Gaussian smoothing
            sigma = 3, first 20000 iterations, zero line
  Figure 6  true squared F_bullet-distances of the KFAC and two-level steps to the exact natural
            gradient step (top) and their ratio (bottom) vs iteration: the paper's claim tested.
  Figure 7  ablation on deep linear A at the authors' selected settings: best training loss per
            optimiser under convention=paper, convention=authors and each authors' ingredient
            alone (identical init, frozen KFAC curvature, KL-clip form), with curves.
  Figure 8  Tselepidis et al.'s toy problem (claim C6): training loss per seed, paired differences of
            the mean loss of the last 5 epochs to KFAC, and that endpoint against depth.
  Figure 9  the stand-in for claims C1/C2: the MNIST auto-encoder architecture on Fashion-MNIST.
Loss curves: one thin line per seed and the median over seeds while every seed runs; every optimiser has its own colour,
line style and marker. Each figure is written as PNG with a CSV of exactly what it plots and a summary CSV (best training
loss per optimiser per panel, epochs run). Titles state the profile and the data source.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import pandas as pd
from scipy.ndimage import gaussian_filter1d

from kfac2l.io import atomic_write_csv
from kfac2l.names import COLORS, LABELS, LINESTYLES, MARKERS, ORDER, PAPER_OPTIMIZERS, TWO_LEVEL
from kfac2l.plan import PANEL_ARMS, TKO_DEPTHS, TKO_OTHERS, TKO_PRIMARY
from kfac2l.plots.results import load_curves, load_diagnostics, selection_budget, summary_table


@dataclass(frozen=True)
class Panel:
    """One problem of a figure: a run directory name, the experiment config and its overrides."""

    name: str
    experiment: str
    title: str
    overrides: tuple[str, ...] = ()
    diagnostics: bool = False
    optimizers: tuple[str, ...] = field(default=PAPER_OPTIMIZERS)


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
    # ours: stand-ins and Tselepidis et al.'s toy problem (issue 17)
    Panel("mnist_ae_fmnist", "mnist_ae_fmnist", "STAND-IN: MNIST AE architecture on Fashion-MNIST", diagnostics=True,
          optimizers=("kfac", "nico", "residu", "previous", "adam", "sgd")),
    # its runs come from kfac2l.plan's arm standin_b (no grid), never from the figure pipeline's grid
    Panel("deep_linear_b_fmnist", "deep_linear_b_fmnist", "STAND-IN: deep linear B architecture on Fashion-MNIST",
          optimizers=("kfac", "nico", "adam", "sgd")),
    # the toy problem's runs come from kfac2l.plan's arms (PANEL_ARMS), never from a grid here
    Panel("tko_toy", "tko_toy", "TKO toy problem, their protocol (convention=tko)",
          optimizers=(*TKO_PRIMARY, *TKO_OTHERS, "adam", "sgd")),
    Panel("tko_toy_paper", "tko_toy", "TKO toy problem, the paper's protocol (batch 512)",
          ("experiment.name=tko_toy_paper",), optimizers=(*TKO_PRIMARY, "adam", "sgd")),
    *[Panel(f"tko_toy_depth{d}", "tko_toy", f"TKO toy problem, depth {d}", (f"experiment.name=tko_toy_depth{d}",),
            optimizers=TKO_PRIMARY) for d in TKO_DEPTHS],
]}
DEPTH_PANELS = {f"tko_toy_depth{d}": d for d in TKO_DEPTHS}

# The authors' selected settings on deep linear A (docs/protocol.md, "The authors' public code"):
# KFAC lr 1e-2, damping 1e-2 (natural-gradients@97105b6 apps/mlp_cnn/results_ref/twolevel_kfac/F_MNIST/
# outputs_512/kfac_params.npy), SGD and Adam lr 1e-3; the two-level arms run at KFAC's settings, which are
# those of their PREVIOUS run (kfac_2L_dd_ones); their other two-level runs used lr 1e-3, damping 1e-3 and c.
AUTHORS_SETTINGS = {"sgd": (1e-3, None), "adam": (1e-3, None), **{o: (1e-2, 1e-2) for o in ("kfac", *TWO_LEVEL)}}


@dataclass(frozen=True)
class Variant:
    """One arm of the Figure 7 ablation: overrides, optimisers and seeds (two-level: ``tl_seeds``)."""

    name: str
    label: str
    overrides: tuple[str, ...]
    optimizers: tuple[str, ...]
    seeds: tuple[int, ...] = (1, 2, 3)
    tl_seeds: tuple[int, ...] = (1,)

    @property
    def panel(self) -> str:
        return f"deep_linear_a_abl_{self.name}"

    def seeds_for(self, optimizer: str) -> tuple[int, ...]:
        return self.tl_seeds if optimizer in TWO_LEVEL else self.seeds


ABLATION = [
    Variant("paper", "convention=paper", (), ("kfac", *TWO_LEVEL, "adam", "sgd")),
    Variant("authors", "convention=authors", ("convention=authors",), ("kfac", *TWO_LEVEL, "adam", "sgd")),
    Variant("init", "identical init only", ("model.init=identical",), ("kfac", "adam", "sgd")),
    Variant("frozen", "frozen KFAC curvature only", ("+optimizer.options.freeze_factors=true",), ("kfac",)),
    Variant("clip", "KL clip with lr^2 only", ("+optimizer.options.kl_clip_form=lr_squared",), ("kfac",)),
]
for _v in ABLATION:
    PANELS[_v.panel] = Panel(_v.panel, "deep_linear_a", f"Deep linear A, {_v.label}",
                             (*_v.overrides, f"experiment.name={_v.panel}"), optimizers=_v.optimizers)

FIGURES: dict[int, list[str]] = {
    2: [f"{ae}_ae_bs{b}" for ae, bs in (("curves", (64, 128, 256)), ("mnist", (512, 1024, 2048)),
                                          ("faces", (1024, 2048, 4096))) for b in bs],
    3: ["cuda_convnet", "resnet18", "resnet34"],
    4: ["deep_linear_a", "deep_linear_b"],
    5: ["curves_ae_bs128", "mnist_ae_bs1024", "faces_ae_bs2048", "cuda_convnet"],
    6: ["curves_ae_bs128", "mnist_ae_bs1024", "faces_ae_bs2048", "cuda_convnet"],
    7: [v.panel for v in ABLATION],
    8: [p for p in PANEL_ARMS if p.startswith("tko_toy")],  # ours: the toy problem (C6), kfac2l.plan's tko arms
    9: ["mnist_ae_fmnist", "deep_linear_b_fmnist"],  # ours: the stand-ins (C1/C2; C3 on Figure 4b's network)
}


def figure_panels(figure: int, panels: list[str] | None) -> list[str]:
    """The figure's panels (all of them when ``panels`` is None); ValueError naming unknown ones."""
    unknown = [p for p in panels or [] if p not in PANELS]
    if unknown:
        raise ValueError(f"unknown panel(s) {unknown}; valid: {', '.join(FIGURES[figure])}")
    return list(panels or FIGURES[figure])


def default_seeds(profile: str) -> list[int]:
    """Final-run seeds: 1 2 3 under the paper profile, 1 under quick."""
    return [1, 2, 3] if profile == "paper" else [1]


SMOOTH = 101  # iterations of the running median of Figure 6
BN_NOTE = "; with BatchNorm, F is the pseudo-Fisher of the per-sample losses through batch statistics"


def _grid(n: int) -> tuple[int, int]:
    return (3, 3) if n == 9 else (1, n)


def _width(n_cols: int) -> float:
    return max(4.4 * n_cols, 7.5)


STANDIN_FIGURES = {9: "STAND-INs for the paper's Figures 2 and 4b (claims C1/C2, C3)"}


def _figure_name(figure: int) -> str:
    """'Figure N (our runs, as the paper's Figure N)' for the paper's Figures 1-5, 'Figure N (ours)'
    after, and the stand-in's label where the figure is one."""
    if figure <= 5:
        return f"Figure {figure} (our runs, as the paper's Figure {figure})"
    return f"Figure {figure} (ours" + (f", {STANDIN_FIGURES[figure]})" if figure in STANDIN_FIGURES else ")")


def _title(fig, text: str) -> None:
    fig.suptitle(textwrap.fill(text, 95), fontsize=9)


def _provenance(frames: list[pd.DataFrame], profile: str) -> str:
    sources = sorted({str(s) for f in frames if "data_source" in f for s in f["data_source"].dropna().unique()})
    data = "; ".join(s.split(" md5")[0] for s in sources) if sources else "no results"
    warn = " - SYNTHETIC DATA" if any("SYNTHETIC" in s for s in sources) else ""
    return f"profile={profile}{' (not the paper protocol)' if profile != 'paper' else ''}; data: {data}{warn}"


def seed_bands(curves: pd.DataFrame, value: str = "train_loss", x: str = "epoch") -> pd.DataFrame:
    """Per optimiser and ``x``: median, min and max of ``value`` over the seeds still running, how
    many seeds reached that ``x`` (``seeds``) and how many the optimiser has (``total``). The
    median is ``all_running`` only where every seed still runs (runs stopped early end)."""
    grouped = curves.groupby(["optimizer", x])[value]
    bands = grouped.agg(median="median", low="min", high="max", seeds="count").reset_index()
    bands["total"] = bands["optimizer"].map(curves.groupby("optimizer")["seed"].nunique())
    bands["all_running"] = bands["seeds"] == bands["total"]
    return bands


def draw_seeds(ax, curves: pd.DataFrame, bands: pd.DataFrame, optimizers, x: str = "epoch",
               value: str = "train_loss") -> None:
    """Thin line per seed and a bold median drawn only while every seed runs (a cross where the
    first seed stops), per optimiser in its colour, line style and marker; n in the label."""
    for opt in optimizers:
        sub = bands[(bands["optimizer"] == opt) & bands["all_running"]].sort_values(x)
        runs = curves[curves["optimizer"] == opt]
        if runs.empty:
            continue
        for _, seed_run in runs.groupby("seed"):
            seed_run = seed_run.sort_values(x)
            ax.plot(seed_run[x], seed_run[value], color=COLORS[opt], lw=0.5, alpha=0.35)
        n = int(runs["seed"].nunique())
        if sub.empty:
            continue
        every = max(1, len(sub) // 8)
        ax.plot(sub[x], sub["median"], label=f"{LABELS[opt]} (n={n})", color=COLORS[opt], ls=LINESTYLES[opt],
                marker=MARKERS[opt], markevery=every, markersize=4, lw=1.4)
        if len(sub) < len(bands[bands["optimizer"] == opt]):
            ax.plot(sub[x].iloc[-1], sub["median"].iloc[-1], marker="x", color=COLORS[opt], ms=7, mew=1.5)


def zoom(ax, curves: pd.DataFrame, value: str = "train_loss", head: int = 5) -> None:
    """Linear y axis on the informative band: from just below the lowest loss to the highest loss
    after the first ``head`` epochs (earlier epochs leave the frame; the caption says so)."""
    late = curves[curves["epoch"] > head][value].dropna()
    if late.empty:
        return
    low, high = float(curves[value].min()), float(late.quantile(0.98))
    pad = 0.05 * max(high - low, 1e-6)
    ax.set_ylim(low - pad, high + pad)


ENDPOINT_NAMES = {"best": "best loss", "last5_mean": "last-5-epoch mean loss"}


def run_values(curves: pd.DataFrame, endpoint: str = "best") -> pd.DataFrame:
    """Per run (optimizer, seed): ``endpoint`` of ``analysis.run_endpoints`` on its curve."""
    from kfac2l.analysis import run_endpoints

    rows = [{"optimizer": opt, "seed": seed, endpoint: run_endpoints(run)[endpoint]}
            for (opt, seed), run in curves.groupby(["optimizer", "seed"])]
    return pd.DataFrame(rows, columns=["optimizer", "seed", endpoint])


def draw_paired(ax, curves: pd.DataFrame, reference: str = "kfac", endpoint: str = "best",
                optimizers=ORDER) -> pd.DataFrame:
    """Paired differences of ``endpoint`` (default the best training loss) to ``reference`` (same
    seed) for ``optimizers``: a dot per seed, the median as a bar, the bootstrap 95 % interval
    where n >= MIN_PAIRS; zero line."""
    from kfac2l.analysis import compare, paired_differences

    values = run_values(curves, endpoint)
    opts = [o for o in optimizers if o in set(values["optimizer"]) and o != reference]
    rows = []
    for k, opt in enumerate(opts):
        d = paired_differences(values, opt, reference, endpoint)
        if d.empty:
            continue
        c = compare(d, opt, reference)
        ax.scatter(k + 0.08 * (pd.Series(range(len(d))) - len(d) / 2) / max(len(d), 1), d, s=10, color=COLORS[opt],
                   alpha=0.7, lw=0)
        ax.plot([k - 0.3, k + 0.3], [c.median_diff] * 2, color=COLORS[opt], lw=2)
        if c.ci_low is not None:
            ax.plot([k, k], [c.ci_low, c.ci_high], color=COLORS[opt], lw=1)
        rows.append(pd.DataFrame({"optimizer": opt, "seed": d.index, "paired_difference": d.to_numpy(),
                                  "median_difference": c.median_diff, "ci_low": c.ci_low, "ci_high": c.ci_high,
                                  "n": c.n}))
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(opts)), [LABELS[o] for o in opts], rotation=60, fontsize=7)
    ax.set_ylabel(f"{ENDPOINT_NAMES[endpoint]} - {LABELS[reference]} (same seed)")
    ax.set_title(f"paired differences to {LABELS[reference]}", fontsize=10)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _budget_note(results_root: Path, profile: str, panels: list[str]) -> str:
    budgets = sorted({b for p in panels if (b := selection_budget(results_root, profile, p))})
    return f"; lr/damping selected on {' | '.join(budgets)}" if budgets else ""


SEED_LINES = ("Thin lines: one run (seed) each; bold: median over seeds, drawn only while every seed runs (x: the "
              "first seed stops early); n = seeds, per optimiser in the legend (it differs between optimisers while "
              "runs land)")
PAIRED_MARKS = ("dots per seed, bar the median, vertical line its bootstrap 95 % interval (n >= 9; not adjusted for "
                "multiplicity")


def plot_loss_figure(figure: int, panels: list[str], root: Path, out: Path, profile: str):
    """Figures 2-4: per panel, the training loss per seed (thin) with the median over seeds drawn
    while every seed runs (linear axis zoomed on the informative band), and the paired
    differences of the best loss to KFAC. Summary CSV: per optimiser the median best loss."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 4.2 * len(panels) + 1.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    plotted, summaries, frames = [], [], []
    for (ax, pax), name in zip(axes, panels):
        panel = PANELS[name]
        curves = load_curves(root / profile / name)
        frames.append(curves)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.set_title(panel.title, fontsize=10)
        if curves.empty:
            for a in (ax, pax):
                a.text(0.5, 0.5, "no results", ha="center", va="center", transform=a.transAxes)
            continue
        bands = seed_bands(curves)
        opts = [o for o in ORDER if o in set(bands["optimizer"])]
        draw_seeds(ax, curves, bands, opts)
        zoom(ax, curves)
        ax.legend(fontsize=7, ncol=2)
        plotted.append(bands.rename(columns={"median": "train_loss"}).assign(panel=name))
        paired = draw_paired(pax, curves)
        if not paired.empty:
            plotted.append(paired.assign(panel=name, kind="paired"))
        summaries.append(summary_table(root / profile / name).assign(panel=name))
    _title(fig, f"{_figure_name(figure)}: training loss per seed and paired differences to KFAC")
    _caption(fig, (
        f"{SEED_LINES}. Linear axis zoomed: the first epochs lie above the frame. Right: best training loss minus "
        f"KFAC's on the same seed, {PAIRED_MARKS}, the Holm-corrected tests are in docs/report.md). "
        f"{_provenance(frames, profile)}{_budget_note(root.parent, profile, panels)}."), 170)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return _save(fig, out, figure, plotted, summaries)


def _caption(fig, text: str, width: int) -> None:
    """The figure's caption (what is drawn, the statistic, the data source) under the panels."""
    fig.text(0.01, 0.01, textwrap.fill(text, width), fontsize=7, va="bottom")


def plot_ablation_figure(figure: int, panels: list[str], root: Path, out: Path, profile: str):
    """Figure 7: best training loss per optimiser and ablation arm (median, min-max over seeds),
    and the KFAC, ADAM and SGD curves of each arm."""
    arms = [v for v in ABLATION if v.panel in panels]
    frames, rows = [], []
    for arm in arms:
        curves = load_curves(root / profile / arm.panel)
        frames.append(curves)
        if curves.empty:
            continue
        best = curves.groupby(["optimizer", "seed"])["train_loss"].min().reset_index()
        for opt, sub in best.groupby("optimizer"):
            rows.append({"arm": arm.name, "label": arm.label, "optimizer": opt, "median": sub["train_loss"].median(),
                         "low": sub["train_loss"].min(), "high": sub["train_loss"].max(), "seeds": len(sub)})
    table = pd.DataFrame(rows, columns=["arm", "label", "optimizer", "median", "low", "high", "seeds"])
    focus = ["kfac", "adam", "sgd"]
    fig, axes = plt.subplots(1, 1 + len(focus), figsize=(4.6 * (1 + len(focus)), 4.6), squeeze=False)
    ax = axes[0, 0]
    opts = [o for o in ORDER if o in set(table["optimizer"])]
    arm_styles = {a.name: (m, c) for a, m, c in zip(arms, "oDs^v", ["#000000", "#d62728", "#1f77b4", "#2ca02c",
                                                                    "#9467bd"])}
    seed_rows = []
    for k, (arm, frame) in enumerate(zip(arms, frames)):
        if frame.empty:
            continue
        best = frame.groupby(["optimizer", "seed"])["train_loss"].min().reset_index()
        marker, colour = arm_styles[arm.name]
        offset = (k - (len(arms) - 1) / 2) * 0.14
        for seed, sub in best.groupby("seed"):
            xs = [opts.index(o) + offset for o in sub["optimizer"]]
            ax.scatter(xs, sub["train_loss"], marker=marker, s=26 if seed == 1 else 12,
                       facecolors=colour if seed == 1 else "none", edgecolors=colour, lw=0.8,
                       label=arm.label if seed == 1 else None)
        seed_rows.append(best.assign(arm=arm.name))
    ax.set_xticks(range(len(opts)), [LABELS[o] for o in opts], rotation=60, fontsize=7)
    ax.set_ylabel("best training loss (filled: seed 1; hollow: other seeds)")
    ax.set_title("best training loss per arm, seed by seed", fontsize=10)
    if len(table):
        ax.legend(fontsize=7)
    plotted = [table.assign(kind="best"), *[r.assign(kind="seed") for r in seed_rows]]
    for ax, opt in zip(axes[0, 1:], focus):
        ax.set_title(f"{LABELS[opt]}: training loss", fontsize=10)
        ax.set_xlabel("epoch")
        for arm, frame in zip(arms, frames):
            if frame.empty or opt not in set(frame["optimizer"]):
                continue
            bands = seed_bands(frame[frame["optimizer"] == opt])
            marker, colour = arm_styles[arm.name]
            running = bands[bands["all_running"]]  # median and band only while every seed runs
            ax.plot(running["epoch"], running["median"], color=colour, marker=marker,
                    markevery=max(1, len(running) // 8), ms=4, lw=1.2,
                    label=f"{arm.label} (n={int(bands['total'].iloc[0])})")
            ax.fill_between(running["epoch"], running["low"], running["high"], color=colour, alpha=0.12, lw=0)
            if len(running) < len(bands):
                ax.plot(running["epoch"].iloc[-1], running["median"].iloc[-1], marker="x", color=colour, ms=7, mew=1.5)
            plotted.append(bands.assign(kind="curve", arm=arm.name))
        zoom(ax, pd.concat([f[f["optimizer"] == opt] for f in frames if not f.empty and opt in set(f["optimizer"])]))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    settings = ", ".join(f"{LABELS[o]} lr {AUTHORS_SETTINGS[o][0]:g}" + (
        f" damping {AUTHORS_SETTINGS[o][1]:g}" if AUTHORS_SETTINGS[o][1] else "") for o in ("kfac", "adam", "sgd"))
    _title(fig, "Figure 7 (ours): ablation on deep linear A at the authors' selected settings")
    _caption(fig, (
        f"Settings: {settings}; two-level as KFAC. Left: every committed run's best training loss, seed 1 filled "
        f"(compare filled with filled; a missing filled marker: that seed-1 run is not committed), other seeds "
        f"hollow. Right: median over seeds "
        f"with min-max band while every seed runs (x: the first stops), linear axis zoomed (first epochs above the "
        f"frame). {_provenance(frames, profile)}."), 190)
    fig.tight_layout(rect=(0, 0.08, 1, 0.92))
    return _save(fig, out, figure, plotted, [table])


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
    _title(fig, f"{_figure_name(figure)}: gap of eq. (4.6) (negative = closer to the natural gradient than KFAC){BN_NOTE} - "
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
            sub = mean[mean["optimizer"] == opt].sort_values("iteration").copy()
            # per-iteration values scatter over decades: running medians (centred, window SMOOTH)
            for col in ("dist_kfac", "dist_two_level", "ratio"):
                sub[f"{col}_median"] = sub[col].rolling(SMOOTH, center=True, min_periods=1).median()
            style = {"color": COLORS[opt], "ls": LINESTYLES[opt]}
            top.plot(sub["iteration"], sub["dist_kfac_median"], color=COLORS[opt], lw=0.8, ls=":", alpha=0.8)
            top.plot(sub["iteration"], sub["dist_two_level_median"], lw=1.2, label=LABELS[opt], **style)
            bottom.plot(sub["iteration"], sub["ratio_median"], lw=1.2, label=LABELS[opt], **style)
            plotted.append(sub.assign(panel=name))
        top.set_yscale("log")
        bottom.set_yscale("log")
        top.legend(fontsize=7, title="two-level (dotted: KFAC on the same run)", title_fontsize=7)
        bottom.legend(fontsize=7)
    _title(fig, f"{_figure_name(figure)}: true squared F-distance to the exact natural-gradient step, running median over "
                f"{SMOOTH} iterations{BN_NOTE} - "
                f"{_provenance(frames, profile)}")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, out, figure, plotted, [])


TKO_CURVES = ("kfac", "nico", "previous", "sgd")   # Figure 8a: KFAC and its declared family


def _tko_provenance(frames: list[pd.DataFrame], profile: str) -> str:
    """``_provenance`` with the toy problem's per-seed source names folded into one."""
    folded = [f.assign(data_source=f["data_source"].astype(str).str.replace(
        r"teacher and data seed \d+ \(their --seed \d+\)", "teacher and data seed = run seed + 1", regex=True))
        for f in frames if "data_source" in f]
    return _provenance(folded, profile)


def _endpoint_summary(values: pd.DataFrame, endpoint: str, panel: str) -> pd.DataFrame:
    """Per optimiser: median, min and max over seeds of ``endpoint`` (named in the columns), seeds."""
    table = values.groupby("optimizer")[endpoint].agg(["median", "min", "max", "count"])
    table.columns = [f"{endpoint}_median", f"{endpoint}_min", f"{endpoint}_max", "seeds"]
    return table.reset_index().assign(panel=panel, depth=DEPTH_PANELS.get(panel))


def _tko_row(ax, pax, curves: pd.DataFrame, name: str, endpoint: str, family, thresholds) -> list[pd.DataFrame]:
    """Figure 8, one protocol: a) training loss per seed (log axis, the declared thresholds dotted),
    b) paired differences of ``endpoint`` to KFAC for ``family``; returns what it plotted."""
    ax.set_title(f"a) {PANELS[name].title}", fontsize=10)
    pax.set_title("b) paired differences to KFAC", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    curves = curves[curves["optimizer"].isin(TKO_CURVES)] if not curves.empty else curves
    if curves.empty:
        for a in (ax, pax):
            a.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=a.transAxes)
        return []
    bands = seed_bands(curves)
    draw_seeds(ax, curves, bands, [o for o in ORDER if o in set(bands["optimizer"])])
    for t in thresholds:
        ax.axhline(t, color="0.5", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    paired = draw_paired(pax, curves, "kfac", endpoint, [o for o in ORDER if o in family])
    pax.set_title("b) paired differences to KFAC", fontsize=10)  # draw_paired titles it too
    plotted = [bands.rename(columns={"median": "train_loss"}).assign(panel=name, kind="curve")]
    return plotted + ([paired.assign(panel=name, kind="paired", endpoint=endpoint)] if not paired.empty else [])


def _tko_depth(ax, root: Path, profile: str, panels: list[str], endpoint: str, frames: list) -> list[pd.DataFrame]:
    """Figure 8c: ``endpoint`` per seed (points) and its median (line) against the number of linear
    layers (depth + 2) for KFAC, PREVIOUS and NICO; returns the per-run values it plotted."""
    ax.set_title("c) depth sweep", fontsize=10)
    ax.set_xlabel("linear layers (depth + 2)")
    ax.set_ylabel(ENDPOINT_NAMES[endpoint])
    runs = []
    for name in panels:
        curves = load_curves(root / profile / name)
        frames.append(curves)
        if not curves.empty:
            runs.append(run_values(curves, endpoint).assign(panel=name, layers=DEPTH_PANELS[name] + 2))
    if not runs:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
        return []
    values = pd.concat(runs, ignore_index=True)
    for k, opt in enumerate([o for o in ORDER if o in set(values["optimizer"])]):
        sub = values[values["optimizer"] == opt]
        shift = 2 ** (0.06 * (k - 1))  # methods side by side on the log axis
        ax.scatter(sub["layers"] * shift, sub[endpoint], s=10, color=COLORS[opt], alpha=0.6, lw=0)
        med = sub.groupby("layers")[endpoint].median()
        n = int(sub.groupby("layers").size().min())
        ax.plot(med.index * shift, med.to_numpy(), color=COLORS[opt], ls=LINESTYLES[opt], marker=MARKERS[opt],
                ms=4, lw=1.2, label=f"{LABELS[opt]} (n={n})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(values["layers"].unique()), [str(v) for v in sorted(values["layers"].unique())])
    ax.legend(fontsize=7)
    return [values.assign(kind="depth")]


def plot_tko_figure(figure: int, panels: list[str], root: Path, out: Path, profile: str):
    """Figure 8 (ours): Tselepidis et al.'s toy problem. A row per protocol panel (``tko_toy``, their
    protocol; ``tko_toy_paper``, the paper's): a) training loss per seed of KFAC, PREVIOUS, NICO and
    SGD, median while every seed runs; b) paired differences of the primary endpoint (mean training
    loss of the last 5 epochs) to KFAC, the declared family; c) the depth sweep. Draws what is
    present. Summary CSV: per panel and optimiser the endpoint's median, min, max over seeds."""
    from kfac2l.evidence_tko import ENDPOINT, FAMILY, THRESHOLDS

    rows = [p for p in panels if p not in DEPTH_PANELS] or [None]
    depth = [p for p in panels if p in DEPTH_PANELS]
    fig = plt.figure(figsize=(16 if depth else 11, 4.6 * len(rows) + 1.4))
    grid = fig.add_gridspec(len(rows), 3 if depth else 2, width_ratios=[1.5, 1, 1.1] if depth else [1.5, 1])
    plotted, summaries, frames = [], [], []
    for row, name in enumerate(rows):
        if name is None:
            continue
        curves = load_curves(root / profile / name)
        frames.append(curves)
        plotted += _tko_row(fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1]), curves, name, ENDPOINT,
                            FAMILY, THRESHOLDS)
        if not curves.empty:
            summaries.append(_endpoint_summary(run_values(curves, ENDPOINT), ENDPOINT, name))
    if depth:
        values = _tko_depth(fig.add_subplot(grid[:, 2]), root, profile, depth, ENDPOINT, frames)
        plotted += values
        summaries += [_endpoint_summary(v, ENDPOINT, p) for p, v in values[0].groupby("panel")] if values else []
    _title(fig, f"Figure {figure} (ours): Tselepidis et al.'s toy problem - does two-level K-FAC beat K-FAC?")
    _caption(fig, (
        f"a) {SEED_LINES}; log axis; dotted: the losses {' and '.join(map(str, THRESHOLDS))} of the secondary "
        f"endpoints. b) Mean training loss of the last 5 epochs minus KFAC's on the same seed: {PAIRED_MARKS}; the "
        f"Holm-corrected tests over the family of 3 are in docs/report.md, section C6). c) The same endpoint per "
        f"seed (points) and its median over seeds (line) against the number of linear layers, n = seeds per depth. "
        f"{_tko_provenance(frames, profile)}."), 230)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return _save(fig, out, figure, plotted, summaries)


def _save(fig, out: Path, figure: int, plotted: list[pd.DataFrame], summaries: list[pd.DataFrame]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # per-iteration data (Figures 5, 6) run to megabytes: gzipped
    data_name = f"figure{figure}.csv.gz" if figure in (5, 6) else f"figure{figure}.csv"
    paths = {"figure": out / f"figure{figure}.png", "data": out / data_name}
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
    """Draw figure 2-9 from ``<results>/final/<profile>/<panel>``; returns the written paths."""
    if figure not in FIGURES:
        raise ValueError(f"figure={figure!r} is not valid; choose one of {sorted(FIGURES)}")
    panels = panels or FIGURES[figure]
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        raise ValueError(f"unknown panel(s) {unknown}; valid panels: {', '.join(PANELS)}")
    root = Path(results) / "final"
    out = Path(out) if out else Path(results) / "figures" / profile
    draw = {5: plot_gap_figure, 6: plot_distance_figure, 7: plot_ablation_figure,
            8: plot_tko_figure}.get(figure, plot_loss_figure)
    return draw(figure, panels, root, out, profile)
