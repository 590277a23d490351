"""The report's tables and numbers, computed from committed result files only (``kfac2l.report``
writes them into ``docs/report.md`` and ``README.md`` between markers; a test fails when the
documents and the files disagree).

Tables (``<!-- table:KIND:PROFILE:PANEL -->``): ``paired`` (the primary family, ``kfac2l.analysis``),
``secondary`` (descriptive endpoints), ``clip`` (the KL-clip regime), ``distance`` (the exact-NG
diagnostics of the paper's Figures 5-6), ``cost`` (seconds per iteration), ``ablation-seed`` (Figure
7 seed against seed) and ``claims`` (the claims table, statuses decided by declared rules).
Inline numbers (``<!-- value:KEY -->...<!-- /value -->``), KEY one of
``endpoint:PROFILE:PANEL:OPTIMIZER:ENDPOINT:STAT`` (STAT median, min, max, n) or
``paired:PROFILE:PANEL:OPTIMIZER:FIELD`` (FIELD median_diff, ci_low, ci_high, lower, n, p, p_holm).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from kfac2l.analysis import CHECKPOINT_EPOCHS, MIN_PAIRS, THRESHOLD, family, load_endpoints
from kfac2l.names import LABELS, ORDER, TWO_LEVEL
from kfac2l.runs import iter_runs


def _g(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}g}"


def _p(x) -> str:
    return "-" if x is None else f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


@lru_cache(maxsize=32)
def endpoints(results: Path, profile: str, panel: str) -> pd.DataFrame:
    return load_endpoints(Path(results) / "final" / profile / panel)


def _present(frame: pd.DataFrame) -> list[str]:
    return [o for o in ORDER if not frame.empty and o in set(frame["optimizer"])]


def comparisons(results: Path, profile: str, panel: str, endpoint: str = "best"):
    frame = endpoints(results, profile, panel)
    return family(frame, [o for o in _present(frame) if o != "kfac"], "kfac", endpoint) if not frame.empty else []


def paired_table(results: Path, profile: str, panel: str) -> str:
    """The primary family: each optimiser against KFAC, paired by seed, on the best training loss."""
    frame = endpoints(results, profile, panel)
    if frame.empty:
        return "_no results_\n"
    rows = []
    for c in sorted(comparisons(results, profile, panel), key=lambda c: c.median_diff):
        own = frame[frame["optimizer"] == c.optimizer]["best"]
        rows.append({
            "optimizer": LABELS[c.optimizer], "pairs (n)": c.n,
            "best loss, median": _g(own.median()),
            "paired difference to KFAC, median": f"{c.median_diff:+.4f}",
            "95 % bootstrap interval": "-" if c.ci_low is None else f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]",
            "lower than KFAC on": f"{c.lower}/{c.n} seeds", "Wilcoxon p": _p(c.p), "Holm p": _p(c.p_holm),
            "reading": c.verdict,
        })
    kfac = frame[frame["optimizer"] == "kfac"]["best"]
    note = (f"\nKFAC best loss, median {_g(kfac.median())} [min {_g(kfac.min())}, max {_g(kfac.max())}], n = "
            f"{len(kfac)}. Difference = optimiser - KFAC on the same seed (negative: lower loss than KFAC). "
            f"Exact two-sided Wilcoxon signed-rank test; Holm over the {sum(c.p is not None for c in comparisons(results, profile, panel))}"  # noqa: E501
            f" comparisons tested; bootstrap: 10000 percentile resamples of the median difference. "
            f"Fewer than {MIN_PAIRS} pairs: descriptive only.\n")
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n" + note


def secondary_table(results: Path, profile: str, panel: str) -> str:
    """Descriptive endpoints per optimiser: median over seeds (carried-forward or censored counts)."""
    frame = endpoints(results, profile, panel)
    if frame.empty:
        return "_no results_\n"
    rows = []
    for opt in _present(frame):
        sub = frame[frame["optimizer"] == opt]
        row = {"optimizer": LABELS[opt], "n": len(sub)}
        for e in CHECKPOINT_EPOCHS:
            carried = int(sub[f"carried_{e}"].sum())
            row[f"epoch {e}"] = _g(sub[f"loss_at_{e}"].median()) + (f" ({carried} c.f.)" if carried else "")
        reached = sub["epochs_to_threshold"].dropna()
        censored = len(sub) - len(reached)
        row[f"epochs to {THRESHOLD:.2f}"] = (_g(reached.median()) if len(reached) else "never") + (
            f" ({censored} never)" if censored and len(reached) else "")
        row["mean of last 5 epochs"] = _g(sub["last5_mean"].median())
        rows.append(row)
    note = ("\nMedians over seeds. c.f.: runs that had stopped early, their last loss carried forward. "
            f"Epochs to {THRESHOLD:.2f}: median over the runs that reached it; 'never': censored runs.\n")
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n" + note


def _nu(record) -> pd.Series | None:
    """Per-iteration KL-clip factor nu of a run (kl_clip.csv.gz, else the diagnostics' kl_scale)."""
    clip = record.read_csv("kl_clip.csv")
    if clip is not None and "nu" in clip:
        return clip["nu"]
    diag = record.read_csv("diagnostics.csv")
    return diag["kl_scale"] if diag is not None and "kl_scale" in diag else None


def clip_table(results: Path, profile: str, panel: str) -> str:
    """Per optimiser: how often the KL clip acted (nu < 1) and the distribution of nu, per run."""
    rows = []
    for record in iter_runs(Path(results) / "final" / profile / panel):
        nu = _nu(record)
        if nu is not None and len(nu):
            rows.append({"optimizer": record.summary["optimizer"], "seed": record.summary["seed"],
                         "clipped": float((nu < 1).mean()), "q10": nu.quantile(0.1), "median": nu.median(),
                         "q90": nu.quantile(0.9)})
    if not rows:
        return "_no KL-clip records_\n"
    frame = pd.DataFrame(rows)
    out = []
    for opt in _present(frame):
        sub = frame[frame["optimizer"] == opt]
        out.append({"optimizer": LABELS[opt], "runs with a record": len(sub),
                    "steps clipped (nu < 1), min over runs": f"{100 * sub['clipped'].min():.1f} %",
                    "median nu (median over runs)": _g(sub["median"].median()),
                    "nu, 10th-90th percentile (median over runs)": f"{_g(sub['q10'].median())}-{_g(sub['q90'].median())}"})
    return pd.DataFrame(out).to_markdown(index=False, disable_numparse=True) + "\n"


def distance_table(results: Path, profile: str, panel: str) -> str:
    """The exact-reference diagnostics (analogue of the paper's Figures 5-6): per two-level run,
    medians over iterations of the relative squared F-distances and cosines to the exact step."""
    rows = []
    for record in iter_runs(Path(results) / "final" / profile / panel):
        diag = record.read_csv("diagnostics.csv")
        if diag is None or "dist_two_level" not in diag:
            continue
        s = record.summary
        rows.append({"optimizer": LABELS[s["optimizer"]], "seed": s["seed"], "damping": _g(s["damping"]),
                     "iterations": len(diag),
                     "KFAC rel. distance": _g(diag["rel_dist_kfac"].median()),
                     "two-level rel. distance": _g(diag["rel_dist_two_level"].median()),
                     "ratio two-level / KFAC": _g((diag["dist_two_level"] / diag["dist_kfac"]).median()),
                     "ratio < 1": f"{100 * (diag['dist_two_level'] < diag['dist_kfac']).mean():.0f} %",
                     "cos KFAC": _g(diag["cos_kfac"].median(), 2), "cos two-level": _g(diag["cos_two_level"].median(), 2),
                     "gap (4.6) < 0": f"{100 * (diag['gap'] < 0).mean():.0f} %" if "gap" in diag else "-",
                     "_o": ORDER.index(s["optimizer"])})
    if not rows:
        return "_no exact-reference diagnostics_\n"
    frame = pd.DataFrame(rows).sort_values(["_o", "seed"]).drop(columns="_o")
    return frame.to_markdown(index=False, disable_numparse=True) + (
        "\n\nMedians over the iterations of one run. Relative distance: ||zeta_x - zeta||^2_F / ||zeta||^2_F "
        "with zeta the exact regularised natural-gradient step on the Fisher batch (the zero step has 1). "
        "cos: Euclidean cosine with zeta.\n")


def cost_table(results: Path, profile: str, panel: str) -> str:
    """Seconds per iteration from the committed wall times (runs without the exact reference),
    and the per-seed ratio to KFAC, median over seeds."""
    frame = endpoints(results, profile, panel)
    if frame.empty or "seconds_per_iteration" not in frame:
        return "_no results_\n"
    plain = frame[~frame["diagnostics"]]
    kfac = plain[plain["optimizer"] == "kfac"].set_index("seed")["seconds_per_iteration"]
    rows = []
    for opt in _present(plain):
        sub = plain[plain["optimizer"] == opt].set_index("seed")["seconds_per_iteration"]
        ratio = (sub / kfac).dropna()
        rows.append({"optimizer": LABELS[opt], "runs": len(sub), "ms per iteration, median": _g(1e3 * sub.median()),
                     "ratio to KFAC (same seed), median": _g(ratio.median()) if len(ratio) else "-"})
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + (
        "\n\nWall time of a whole epoch loop (training steps, Fisher passes, evaluation) over iterations, one "
        "thread per run, two runs at a time at nice 19 on a shared 2-core CPU: indicative only "
        "(`docs/benchmarks.md` has the controlled step-time ratios).\n")


def ablation_seed_table(results: Path, profile: str, arms) -> str:
    """Figure 7 like with like: every optimiser's seed-1 run in every arm, and the 3-seed median
    only where an optimiser has 3 seeds."""
    cells: dict[str, dict[str, str]] = {}
    for arm in arms:
        frame = endpoints(results, profile, arm.panel)
        for opt in _present(frame):
            sub = frame[frame["optimizer"] == opt].set_index("seed")["best"]
            cell = _g(sub.get(1))
            if len(sub) > 1:
                cell += f" (median of {len(sub)}: {_g(sub.median())})"
            cells.setdefault(opt, {})[arm.label] = cell
    if not cells:
        return "_no results_\n"
    frame = pd.DataFrame([{"optimizer": LABELS[o], **{a.label: cells[o].get(a.label, "-") for a in arms}}
                          for o in ORDER if o in cells])
    return frame.to_markdown(index=False, disable_numparse=True) + "\n\nBest training loss of seed 1 (the seed every arm ran); in brackets the median over all seeds where there are more.\n"  # noqa: E501


def value(key: str, results: Path) -> str:
    """An inline number (see the module docstring)."""
    kind, *parts = key.split(":")
    if kind == "endpoint":
        profile, panel, opt, col, stat = parts
        frame = endpoints(results, profile, panel)
        sub = frame[frame["optimizer"] == opt][col]
        return str(len(sub)) if stat == "n" else _g(getattr(sub, stat)())
    if kind == "paired":
        profile, panel, opt, field = parts
        comp = next((c for c in comparisons(results, profile, panel) if c.optimizer == opt), None)
        v = None if comp is None else getattr(comp, field)
        if field in ("p", "p_holm"):
            return _p(v)
        if field in ("lower", "n"):
            return str(v)
        return "-" if v is None else f"{v:+.4f}"
    raise ValueError(f"unknown value kind {kind!r}; valid: endpoint, paired")


def significant(results: Path, profile: str, panel: str) -> tuple[list[str], list[str], int]:
    """(optimisers significantly lower than KFAC, significantly higher, the smallest n of the family)."""
    comps = comparisons(results, profile, panel)
    lower = [c.optimizer for c in comps if c.p_holm is not None and c.p_holm < 0.05 and c.median_diff < 0]
    higher = [c.optimizer for c in comps if c.p_holm is not None and c.p_holm < 0.05 and c.median_diff > 0]
    return lower, higher, min((c.n for c in comps), default=0)


def c3_status(results: Path, profile: str = "paper", panel: str = "deep_linear_a") -> tuple[str, str]:
    """Claim C3 (two-level slightly better than KFAC on deep linear nets), by the declared rule."""
    lower, higher, n = significant(results, profile, panel)
    tl_lower = [o for o in lower if o in TWO_LEVEL]
    tl_higher = [o for o in higher if o in TWO_LEVEL]
    if n < MIN_PAIRS:
        return "descriptive only", f"n = {n} pairs per comparison (< {MIN_PAIRS}): no test possible"
    if tl_lower and not tl_higher:
        return "reproduced", f"lower than KFAC at Holm 0.05: {', '.join(LABELS[o] for o in tl_lower)}"
    if tl_higher and not tl_lower:
        return "contradicted", f"higher than KFAC at Holm 0.05: {', '.join(LABELS[o] for o in tl_higher)}"
    if not tl_lower and not tl_higher:
        return "not reproduced", f"no two-level method differs from KFAC at Holm 0.05 (n = {n} pairs)"
    return "mixed", (f"lower: {', '.join(LABELS[o] for o in tl_lower)}; higher: "
                     f"{', '.join(LABELS[o] for o in tl_higher)}")


def _distance_frame(results: Path, profile: str, panel: str) -> pd.DataFrame:
    rows = []
    for record in iter_runs(Path(results) / "final" / profile / panel):
        diag = record.read_csv("diagnostics.csv")
        if diag is not None and "dist_two_level" in diag:
            rows.append({"optimizer": record.summary["optimizer"],
                         "ratio": (diag["dist_two_level"] / diag["dist_kfac"]).median(),
                         "gap_negative": (diag["gap"] < 0).mean() if "gap" in diag else np.nan,
                         "kfac_rel": diag["rel_dist_kfac"].median()})
    return pd.DataFrame(rows)


def c4_status(results: Path, profile: str = "paper", panel: str = "deep_linear_a") -> tuple[str, str]:
    """Claim C4 (two-level steps closer to the exact natural gradient, Fig. 5), by the declared rule:
    reproduced in sign when every multiplicative two-level run has a median distance ratio < 1."""
    frame = _distance_frame(results, profile, panel)
    if frame.empty:
        return "not testable here", "no exact-reference diagnostics"
    mult = frame[frame["optimizer"] != "previous"]
    add = frame[frame["optimizer"] == "previous"]
    sign = bool(len(mult)) and bool((mult["ratio"] < 1).all())
    text = (f"deep linear A analogue, {len(frame)} runs: median ratio two-level / KFAC {_g(mult['ratio'].min(), 2)}"
            f"-{_g(mult['ratio'].max(), 2)} (multiplicative); PREVIOUS (additive) {_g(add['ratio'].median(), 4)}; "
            f"KFAC's own relative distance {_g(frame['kfac_rel'].median(), 3)} (the zero step has 1)")
    return ("reproduced in sign, small in size" if sign else "not reproduced"), text


def c5_status(results: Path, profile: str = "paper", panel: str = "deep_linear_a") -> tuple[str, str]:
    """Claim C5 (two-level methods cost more than KFAC per iteration)."""
    frame = endpoints(results, profile, panel)
    if frame.empty or "seconds_per_iteration" not in frame:
        return "not testable here", "no runs"
    plain = frame[~frame["diagnostics"]]
    kfac = plain[plain["optimizer"] == "kfac"].set_index("seed")["seconds_per_iteration"]
    ratios = {o: (plain[plain["optimizer"] == o].set_index("seed")["seconds_per_iteration"] / kfac).dropna().median()
              for o in TWO_LEVEL if o in set(plain["optimizer"])}
    if not ratios:
        return "not testable here", "no two-level runs"
    lo, hi = min(ratios.values()), max(ratios.values())
    return ("reproduced" if lo > 1 else "partly reproduced"), (
        f"deep linear A wall time per iteration, two-level / KFAC (same seed, median): {_g(lo, 3)}-{_g(hi, 3)}; "
        "step-time ratios on the auto-encoder and CNN shapes in docs/benchmarks.md")


STANDIN_PANELS = ("mnist_ae_fmnist",)


def claims_table(results: Path, profile: str = "paper") -> str:
    """The paper's claims, each with a status decided by a declared rule and its evidence."""
    results = Path(results)
    standin = any((results / "final" / profile / p).exists() for p in STANDIN_PANELS)
    c3, c3_text = c3_status(results, profile)
    c4, c4_text = c4_status(results, profile)
    c5, c5_text = c5_status(results, profile)
    pending = "stand-in runs pending (issue 17)"
    rows = [
        ("C1", "Natural-gradient methods (KFAC, two-level) beat ADAM and SGD on the three auto-encoders (Fig. 2)",
         "tested on a stand-in" if standin else "not testable here",
         "CURVES, MNIST and FACES are not on this machine; " + ("see the stand-in section" if standin else pending)),
        ("C2", "Two-level curves overlay KFAC's on the auto-encoders and CNNs (Figs. 2-3)",
         "tested on a stand-in" if standin else "not testable here",
         "CIFAR-10/100, SVHN, MNIST, CURVES, FACES not on this machine; " + ("see the stand-in section" if standin
                                                                           else pending)),
        ("C3", "Two-level methods slightly better than KFAC on deep linear nets (Fig. 4a, deep linear A)", c3,
         c3_text + "; primary endpoint best training loss, paired Wilcoxon, Holm over the family"),
        ("C3b", "ADAM and SGD behind KFAC on deep linear A (Fig. 4a)",
         *_baseline_status(results, profile)),
        ("C4", "Two-level steps closer to the exact natural gradient than KFAC's (Fig. 5, gap (4.6) < 0)", c4, c4_text),
        ("C5", "Two-level corrections cost more computation time than KFAC (section 4.3, abstract)", c5, c5_text),
        ("C6", "Tselepidis et al.: two-level K-FAC beats K-FAC on their 64-layer linear toy problem (disputed by "
               "the paper as hasty)", "not yet tested", "their generator and protocol: issue 17"),
    ]
    frame = pd.DataFrame(rows, columns=["", "claim", "status", "evidence (n, statistic)"])
    return frame.to_markdown(index=False) + "\n"


def _baseline_status(results: Path, profile: str) -> tuple[str, str]:
    comps = {c.optimizer: c for c in comparisons(results, profile, "deep_linear_a")}
    parts, verdicts = [], []
    for opt in ("adam", "sgd"):
        c = comps.get(opt)
        if c is None:
            continue
        parts.append(f"{LABELS[opt]} - KFAC median {c.median_diff:+.3f} (n = {c.n}, Holm p {_p(c.p_holm)})")
        verdicts.append(c.p_holm is not None and c.p_holm < 0.05 and c.median_diff > 0)
    if not parts:
        return "not testable here", "no runs"
    if any(c.p_holm is None for c in comps.values() if c.optimizer in ("adam", "sgd")):
        return "descriptive only", "; ".join(parts)
    status = "reproduced" if all(verdicts) else "partly reproduced" if any(verdicts) else "not reproduced"
    return status, "; ".join(parts)


def selection_table(results: Path, profile: str, panel: str) -> str:
    """How decisive the selection was: per optimiser the best and second-best grid cells (seed 0,
    the selection budget), their gap, and beside it the spread of the final runs over seeds."""
    path = Path(results) / "tables" / profile / panel / "runs.csv"
    if not path.exists():
        return "_no grid table_\n"
    grid = pd.read_csv(path)
    grid = grid[(grid["status"] == "completed") & grid["best_train_loss"].notna()]
    final = endpoints(results, profile, panel)
    rows = []
    for opt in [o for o in ORDER if o in set(grid["optimizer"])]:
        cells = grid[grid["optimizer"] == opt].sort_values("best_train_loss")
        best = cells.iloc[0]

        def cell(r) -> str:
            return f"lr {r['lr']:g}" + ("" if pd.isna(r["damping"]) else f", damping {r['damping']:g}")

        second = cells.iloc[1] if len(cells) > 1 else None
        seeds = final[final["optimizer"] == opt]["best"] if not final.empty else pd.Series(dtype=float)
        edge = "" if pd.isna(best["damping"]) else (
            " (grid edge)" if best["damping"] in (grid["damping"].min(), grid["damping"].max()) else "")
        rows.append({"optimizer": LABELS[opt], "cells": len(cells), "selected": cell(best) + edge,
                     "its loss": _g(best["best_train_loss"]),
                     "second": "-" if second is None else cell(second),
                     "gap to second": "-" if second is None
                     else f"{second['best_train_loss'] - best['best_train_loss']:.4f}",
                     "final runs: max - min over seeds": f"{seeds.max() - seeds.min():.4f} (n={len(seeds)})"
                     if len(seeds) > 1 else "-"})
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n"
