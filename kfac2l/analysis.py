"""Paired statistics over runs: the unit is the run (one seed), never an iteration or an epoch.

Declared in commit 57cc3cd (2026-12-02), after the 3-seed runs of de9c3f4 (which are therefore
exploratory) and before the 10-seed runs of issue 15 (docs/report.md, "Statistics"):

- **Primary endpoint**: a run's best epoch training loss (early stopping as in the protocol).
- **Primary family**: the paired comparisons of each optimiser with KFAC on the seeds both have
  (a seed fixes the initialisation and the data order for every optimiser): the Wilcoxon
  signed-rank test (exact, two-sided, ``scipy.stats.wilcoxon``; with zero or tied differences the
  exact permutation distribution with zeros split), Holm-corrected over the declared family of
  ``FAMILY_SIZE`` comparisons (``statsmodels.stats.multitest.multipletests``; a comparison not yet
  tested counts as p = 1, so the correction never shrinks while runs arrive), with a bootstrap 95 %
  interval of the median paired difference (``scipy.stats.bootstrap``, percentile, seeded; not
  adjusted for multiplicity). With n pairs the smallest
  exact two-sided p is 2 / 2^n: 0.002 at n = 10 (0.018 after Holm over 9); at n <= 8 no
  Holm-corrected claim over 9 comparisons is possible, so comparisons with fewer than
  ``MIN_PAIRS`` pairs are reported as descriptive (no p-value, no interval). The declared final test
  is at ``PLANNED_PAIRS`` = 10 pairs; a reading at 9 pairs (tables regenerate as runs land) is
  marked interim (amended 2026-12-02, session 7, after an internal review).
- **Secondary summaries** (descriptive): loss at epochs 5, 10, 20, 50 (after an early stop the
  last value carried forward, and counted), epochs to reach a loss threshold (censored when never
  reached, and counted), mean of the last 5 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from kfac2l.runs import iter_runs

MIN_PAIRS = 9
PLANNED_PAIRS = 10             # the declared final test; with MIN_PAIRS <= n < PLANNED_PAIRS a reading is interim
FAMILY_SIZE = 9                # the 9 comparisons of the other optimisers with KFAC
SMALLEST_EFFECT = 0.02         # declared: a gain in best training loss worth detecting (C3)
CHECKPOINT_EPOCHS = (5, 10, 20, 50)
THRESHOLD = 0.50
BOOTSTRAP_RESAMPLES = 10_000
ALPHA = 0.05


def _first_reached(m: pd.DataFrame, loss: np.ndarray, threshold: float, column: str):
    """``column`` (epoch or wall_time) of the first epoch whose loss is at or below ``threshold``;
    None when never reached (censored)."""
    reached = m[column].to_numpy()[loss <= threshold]
    return reached[0].item() if len(reached) else None


def run_endpoints(metrics: pd.DataFrame, threshold: float = THRESHOLD,
                  epochs: tuple[int, ...] = CHECKPOINT_EPOCHS, thresholds: tuple[float, ...] = (),
                  accuracy: bool = False) -> dict:
    """Endpoints of one run from its per-epoch ``metrics`` (columns epoch, train_loss, wall_time,
    iterations): best loss, loss at ``epochs`` (carried forward after the run ended, flagged),
    first epoch at or below ``threshold`` (None = censored), mean of the last 5 epochs, seconds per
    iteration. Optional: for each of ``thresholds`` the first epoch and the wall time (seconds) at
    or below it (``epochs_to_T``, ``seconds_to_T``; None = censored), and with ``accuracy`` the
    last epoch's test accuracy (``final_test_accuracy``)."""
    m = metrics.sort_values("epoch")
    loss = m["train_loss"].to_numpy(dtype=float)
    ep = m["epoch"].to_numpy()
    out = {"best": float(np.nanmin(loss)) if len(loss) else np.nan, "epochs_run": int(len(loss)),
           "last5_mean": float(np.mean(loss[-5:])) if len(loss) else np.nan}
    for e in epochs:
        upto = loss[ep <= e]
        out[f"loss_at_{e}"] = float(upto[-1]) if len(upto) else np.nan
        out[f"carried_{e}"] = bool(len(loss) and ep[-1] < e)
    out["epochs_to_threshold"] = _first_reached(m, loss, threshold, "epoch")
    for t in thresholds:
        out[f"epochs_to_{t:g}"] = _first_reached(m, loss, t, "epoch")
        out[f"seconds_to_{t:g}"] = _first_reached(m, loss, t, "wall_time")
    if accuracy:
        out["final_test_accuracy"] = float(m["test_accuracy"].iloc[-1]) if len(m) else np.nan
    if len(m) and "wall_time" in m and "iterations" in m and m["iterations"].iloc[-1] > 0:
        out["seconds_per_iteration"] = float(m["wall_time"].iloc[-1] / m["iterations"].iloc[-1])
    return out


def load_endpoints(root: str | Path, **options) -> pd.DataFrame:
    """One row per complete run under ``root``: optimizer, seed, status, lr, damping, commit, cpu
    (torch's SIMD capability of the machine that made it, which decides float rounding; None when
    not recorded), diagnostics (whether the run computed the exact reference every step) and the endpoints
    (``run_endpoints`` with ``options``)."""
    rows = []
    for record in iter_runs(root):
        metrics = record.read_csv("metrics.csv")
        if metrics is None or metrics.empty:
            continue
        s = record.summary
        opts = s.get("options") or {}
        rows.append({"optimizer": s.get("optimizer"), "seed": int(s.get("seed")), "status": s.get("status"),
                     "lr": s.get("lr"), "damping": s.get("damping"), "commit": s.get("git_commit"),
                     "cpu": (s.get("machine") or {}).get("cpu_capability"),
                     "diagnostics": bool(opts.get("exact_reference")), "path": str(record.path),
                     **run_endpoints(metrics, **options)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of ``optimizer`` with ``reference`` on ``endpoint`` (lower is better)."""

    optimizer: str
    reference: str
    n: int
    median_diff: float          # median over seeds of (optimizer - reference)
    ci_low: float | None        # bootstrap 95 % interval of that median (n >= MIN_PAIRS)
    ci_high: float | None
    lower: int                  # seeds on which the optimiser is lower than the reference
    p: float | None             # exact two-sided Wilcoxon signed-rank p (n >= MIN_PAIRS)
    p_holm: float | None = None

    @property
    def verdict(self) -> str:
        """The declared reading: Holm-corrected significance at ALPHA, or descriptive."""
        if self.p_holm is None:
            return f"descriptive (n = {self.n} < {MIN_PAIRS})"
        reading = ("not significant at Holm 0.05" if self.p_holm >= ALPHA
                   else f"{'lower' if self.median_diff < 0 else 'higher'} than {self.reference.upper()}")
        return reading + interim(self.n)


def interim(n: int) -> str:
    """'' for the declared final test (n >= PLANNED_PAIRS), else the mark of an interim reading."""
    return "" if n >= PLANNED_PAIRS else f" (interim: n = {n} of {PLANNED_PAIRS})"


def paired_differences(frame: pd.DataFrame, optimizer: str, reference: str, endpoint: str) -> pd.Series:
    """(optimizer - reference) per seed, on the seeds both have."""
    dup = frame.duplicated(["optimizer", "seed"])
    if dup.any():
        raise ValueError(f"more than one run for (optimizer, seed) {frame[dup][['optimizer', 'seed']].values.tolist()}; "
                         "valid: one run per optimiser and seed in a panel")
    wide = frame.pivot(index="seed", columns="optimizer", values=endpoint)
    if optimizer not in wide or reference not in wide:
        return pd.Series(dtype=float)
    return (wide[optimizer] - wide[reference]).dropna()


def compare(diffs: pd.Series, optimizer: str, reference: str, seed: int = 0) -> Comparison:
    """Median paired difference, its bootstrap interval and the exact Wilcoxon p (n >= MIN_PAIRS)."""
    d = diffs.to_numpy(dtype=float)
    n = len(d)
    med = float(np.median(d)) if n else np.nan
    lower = int((d < 0).sum())
    if n < MIN_PAIRS:
        return Comparison(optimizer, reference, n, med, None, None, lower, None)
    boot = stats.bootstrap((d,), np.median, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                           method="percentile", rng=np.random.default_rng(seed))
    clean = np.all(d != 0) and len(np.unique(np.abs(d))) == n
    method = "exact" if clean else stats.PermutationMethod(n_resamples=np.inf)
    p = float(stats.wilcoxon(d, zero_method="wilcox" if clean else "zsplit", alternative="two-sided",
                             method=method).pvalue)
    return Comparison(optimizer, reference, n, med, float(boot.confidence_interval.low),
                      float(boot.confidence_interval.high), lower, p)


def hodges_lehmann(diffs, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """The Hodges-Lehmann estimate of paired differences (the median of their Walsh averages) and
    the interval consistent with the exact Wilcoxon signed-rank test (the set of shifts it does not
    reject): the k-th smallest and k-th largest Walsh averages, k the largest with P(T < k) <=
    (1 - confidence) / 2 under the exact null distribution of the signed-rank statistic T.
    Returns (estimate, low, high, achieved confidence); low and high are NaN when n is too small."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2)
    counts = np.zeros(n * (n + 1) // 2 + 1)   # sign patterns by rank sum: the null distribution of T
    counts[0] = 1
    for rank in range(1, n + 1):
        counts[rank:] += counts[:-rank].copy()
    cdf = np.cumsum(counts) / 2.0 ** n
    k = int(np.searchsorted(cdf, (1 - confidence) / 2, side="right"))
    if k == 0:
        return float(np.median(walsh)), np.nan, np.nan, np.nan
    return float(np.median(walsh)), float(walsh[k - 1]), float(walsh[len(walsh) - k]), float(1 - 2 * cdf[k - 1])


def holm(comparisons: list[Comparison], family_size: int = FAMILY_SIZE) -> list[Comparison]:
    """Holm-corrected p-values over the declared family of ``family_size`` comparisons: those not
    tested (yet) count as p = 1, so that a partial family is never corrected less than the whole."""
    tested = [c for c in comparisons if c.p is not None]
    if not tested:
        return comparisons
    padded = [c.p for c in tested] + [1.0] * max(0, family_size - len(tested))
    adjusted = multipletests(padded, alpha=ALPHA, method="holm")[1][: len(tested)]
    corrected = {c.optimizer: float(a) for c, a in zip(tested, adjusted)}
    return [Comparison(**{**c.__dict__, "p_holm": corrected.get(c.optimizer)}) for c in comparisons]


def family(frame: pd.DataFrame, optimizers, reference: str = "kfac", endpoint: str = "best",
           family_size: int = FAMILY_SIZE) -> list[Comparison]:
    """A declared family: each of ``optimizers`` against ``reference``, Holm over ``family_size``."""
    return holm([compare(paired_differences(frame, o, reference, endpoint), o, reference) for o in optimizers
                 if o != reference], family_size)
