"""Claims C1 and C2 on a stand-in (issue 17, item 7): the paper's MNIST auto-encoder architecture
trained on Fashion-MNIST (panel ``mnist_ae_fmnist``), because MNIST, CURVES and FACES are not on
our machines. Every table and status here says "stand-in".

Declared in this module before any of its runs (docs/report.md, "Stand-in"):

- **Runs**: KFAC, NICO, RESIDU, PREVIOUS, SGD and ADAM; lr and damping on a 2 x 2 grid over 3
  epochs of seed 0, then seeds 1-3 for 20 epochs (the paper: 300 epochs on MNIST); seed 1 records
  the exact-reference diagnostics (the gap of the paper's Figure 5).
- **Endpoint**: a run's best epoch training loss (the report's primary endpoint); a run that
  diverged or failed takes the worst rank (``evidence.failures_ranked_worst``).
- **Descriptive only**: 3 paired seeds, so no p-value; every status is a direction, read only once
  all 18 declared runs are complete (before that: *not yet tested*, with the count).
- **C1** (natural-gradient methods beat ADAM and SGD): for each pair of a natural-gradient method
  (``NATURAL``) and a baseline (``BASELINES``) the median over seeds of the paired difference
  (baseline - method); *in line with the claim* when every such median is above 0, *against the
  claim* when none is, *mixed* otherwise.
- **C2** (two-level curves overlay KFAC's; the auto-encoder half only, the CNNs stay untested):
  for each two-level method (``TWO_LEVEL``) the median paired difference to KFAC relative to KFAC's
  median endpoint; *in line with the claim* when every one is within ``OVERLAY`` (2 %, a
  convention: no published effect size anchors it), *against the claim* when none is, *mixed*
  otherwise; a method with a failed run (or KFAC with one on its seed) is not within.

Tables (``<!-- table:KIND:PROFILE:PANEL -->``, registered in ``kfac2l.report``): ``standin`` (per
optimiser, with the paired difference to KFAC) and ``standin-c1`` (the baseline-minus-method
medians of C1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kfac2l.analysis import paired_differences
from kfac2l.evidence import FAILED, _g, all_none_mixed, endpoints_ranked
from kfac2l.names import LABELS, ORDER

PANEL = "mnist_ae_fmnist"
ENDPOINT = "best"
NATURAL = ("kfac", "nico", "residu", "previous")
TWO_LEVEL = ("nico", "residu", "previous")
BASELINES = ("adam", "sgd")
SEEDS = (1, 2, 3)
OVERLAY = 0.02          # |median paired difference to KFAC| / KFAC's median endpoint (C2)
LABEL = "STAND-IN (MNIST AE architecture on Fashion-MNIST)"


def standin_endpoints(results: Path, profile: str, panel: str = PANEL) -> pd.DataFrame:
    """The stand-in's runs with their endpoints, failed or diverged ones (even without metrics) ranked worst."""
    return endpoints_ranked(results, profile, panel, ENDPOINT)


def _failed(frame: pd.DataFrame) -> pd.Series:
    return frame["status"].isin(FAILED)


def _no_runs(profile: str, panel: str) -> str:
    return f"_no runs yet (nothing complete under final/{profile}/{panel}; the stand-in of issue 17)_\n"


def _median_difference(frame: pd.DataFrame, optimizer: str, reference: str) -> tuple[float, int]:
    """(median over seeds of optimizer - reference, pairs); NaN without pairs."""
    d = paired_differences(frame, optimizer, reference, ENDPOINT)
    return (float(d.median()) if len(d) else np.nan), len(d)


def standin_table(results: Path, profile: str, panel: str = PANEL) -> str:
    """Per optimiser: runs (failed), best loss median [min, max], the median paired difference to
    KFAC, absolute and relative to KFAC's median, and the seeds below KFAC."""
    frame = standin_endpoints(results, profile, panel)
    if frame.empty:
        return _no_runs(profile, panel)
    ok = frame[~_failed(frame)]
    kfac = ok[ok["optimizer"] == "kfac"][ENDPOINT].median()
    rows = []
    for opt in [o for o in ORDER if o in set(frame["optimizer"])]:
        sub, fine = frame[frame["optimizer"] == opt], ok[ok["optimizer"] == opt][ENDPOINT]
        failed = int(_failed(sub).sum())
        d = paired_differences(frame, opt, "kfac", ENDPOINT) if opt != "kfac" else pd.Series(dtype=float)
        # a pair with a failed run has a rank, not a loss: its differences are not printed as numbers
        clean = not _failed(frame[frame["optimizer"].isin([opt, "kfac"])]).any()
        rows.append({"optimizer": LABELS[opt], "runs": f"{len(sub)}" + (f" ({failed} failed)" if failed else ""),
                     "best loss, median [min, max] (runs that did not fail)":
                         f"{_g(fine.median(), 4)} [{_g(fine.min(), 4)}, {_g(fine.max(), 4)}]" if len(fine) else "-",
                     "paired difference to KFAC, median": "-" if not len(d) else f"{d.median():+.4g}" if clean
                     else "n/a (failed run)",
                     "relative to KFAC's median": f"{100 * d.median() / kfac:+.2f} %" if len(d) and clean and kfac
                     else "-",
                     "lower than KFAC on": f"{int((d < 0).sum())}/{len(d)} seeds" if len(d) else "-"})
    return (pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
            + f"\n\n{LABEL}. Best epoch training loss; difference = optimiser - KFAC on the same seed (negative: "
              "lower than KFAC); relative: that median over KFAC's median best loss. Descriptive only (declared: "
              "3 seeds, no test). A diverged or failed run takes the worst rank.\n")


def c1_table(results: Path, profile: str, panel: str = PANEL) -> str:
    """C1's comparisons: per natural-gradient method, the median over seeds of (baseline - method)."""
    frame = standin_endpoints(results, profile, panel)
    if frame.empty:
        return _no_runs(profile, panel)
    present = set(frame["optimizer"])
    rows = []
    for m in [o for o in NATURAL if o in present]:
        row = {"method": LABELS[m]}
        for b in BASELINES:
            med, n = _median_difference(frame, b, m)
            row[f"{LABELS[b]} - method, median (n)"] = "-" if not n else f"{med:+.4g} ({n})"
        rows.append(row)
    return (pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
            + f"\n\n{LABEL}. Best epoch training loss, baseline minus method on the same seed, median over the "
              "seeds both have (positive: the method lower than the baseline). Descriptive only.\n")


def _incomplete(frame: pd.DataFrame) -> tuple[str, str] | None:
    """The status while the declared design (``NATURAL`` and ``BASELINES`` x ``SEEDS``) is not
    complete: no reading on part of it; None once complete."""
    have = set(zip(frame["optimizer"], frame["seed"]))
    design = [(o, s) for o in (*NATURAL, *BASELINES) for s in SEEDS]
    missing = [d for d in design if d not in have]
    if not missing:
        return None
    return "not yet tested", (f"{LABEL}: {len(design) - len(missing)} of {len(design)} declared runs complete; "
                              "read once all are in (issue 17)")


def _complete_design(results: Path, profile: str, panel: str):
    """(the stand-in's endpoints, None) once its declared design is complete; before that (None, the
    *not yet tested* status), and (None, None) without any run."""
    frame = standin_endpoints(results, profile, panel)
    if frame.empty:
        return None, None
    pending = _incomplete(frame)
    return (None, pending) if pending is not None else (frame, None)


def c1_status(results: Path, profile: str = "paper", panel: str = PANEL) -> tuple[str, str] | None:
    """C1 on the stand-in by the declared rule; None without any (method, baseline) pair."""
    frame, early = _complete_design(results, profile, panel)
    if frame is None:
        return early
    pairs = {(m, b): _median_difference(frame, b, m) for m in NATURAL for b in BASELINES}
    pairs = {k: v for k, v in pairs.items() if v[1]}
    if not pairs:
        return None
    ahead = [med > 0 for med, _ in pairs.values()]
    n = min(n for _, n in pairs.values())
    return (f"tested on a stand-in; descriptive only: {all_none_mixed(ahead)}",
            f"{LABEL}, n = {n} pairs: the method below the baseline (median of baseline - method > 0) in "
            f"{sum(ahead)} of {len(ahead)} (natural-gradient method, ADAM or SGD) pairs; best training loss, "
            f"20 epochs; see the stand-in section")


def c2_status(results: Path, profile: str = "paper", panel: str = PANEL) -> tuple[str, str] | None:
    """C2's auto-encoder half on the stand-in by the declared rule; None without two-level pairs."""
    frame, early = _complete_design(results, profile, panel)
    if frame is None:
        return early
    ok = frame[~_failed(frame)]
    kfac = ok[ok["optimizer"] == "kfac"][ENDPOINT].median()
    diffs = {o: _median_difference(frame, o, "kfac") for o in TWO_LEVEL}
    diffs = {o: v for o, v in diffs.items() if v[1]}
    if not diffs or not np.isfinite(kfac) or kfac == 0:
        return None
    # a method (or KFAC) with a failed run does not overlay KFAC, whatever its rank-filled difference
    broken = {o for o in diffs if _failed(frame[frame["optimizer"].isin([o, "kfac"])]).any()}
    relative = {o: np.nan if o in broken else med / kfac for o, (med, _) in diffs.items()}
    within = [o not in broken and abs(r) <= OVERLAY for o, r in relative.items()]
    n = min(n for _, n in diffs.values())
    text = ", ".join(f"{LABELS[o]} " + ("a failed run" if o in broken else f"{100 * r:+.2f} %")
                     for o, r in relative.items())
    return (f"tested on a stand-in; descriptive only: {all_none_mixed(within)}",
            f"{LABEL}, n = {n} pairs: median paired difference to KFAC relative to KFAC's median best loss: {text} "
            f"(overlay: within {100 * OVERLAY:g} %); the CNN half (CIFAR-10/100, SVHN) not testable here")


TABLES = {"standin": standin_table, "standin-c1": c1_table}
