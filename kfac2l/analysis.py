"""Paired statistics over runs: the unit is the run (one seed), never an iteration or an epoch.

Declared before the runs of issue 15 (docs/report.md, "Statistics"):

- **Primary endpoint**: a run's best epoch training loss (early stopping as in the protocol).
- **Primary family**: the paired comparisons of each optimiser with KFAC on the seeds both have
  (a seed fixes the initialisation and the data order for every optimiser): the Wilcoxon
  signed-rank test (exact, two-sided, ``scipy.stats.wilcoxon``), Holm-corrected over the family
  (``statsmodels.stats.multitest.multipletests``), with a bootstrap 95 % interval of the median
  paired difference (``scipy.stats.bootstrap``, percentile, seeded). With n pairs the smallest
  exact two-sided p is 2 / 2^n: 0.002 at n = 10 (0.018 after Holm over 9); at n <= 8 no
  Holm-corrected claim over 9 comparisons is possible, so comparisons with fewer than
  ``MIN_PAIRS`` pairs are reported as descriptive (no p-value, no interval).
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
CHECKPOINT_EPOCHS = (5, 10, 20, 50)
THRESHOLD = 0.50
BOOTSTRAP_RESAMPLES = 10_000
ALPHA = 0.05


def run_endpoints(metrics: pd.DataFrame, threshold: float = THRESHOLD,
                  epochs: tuple[int, ...] = CHECKPOINT_EPOCHS) -> dict:
    """Endpoints of one run from its per-epoch ``metrics`` (columns epoch, train_loss, wall_time,
    iterations): best loss, loss at ``epochs`` (carried forward after the run ended, flagged),
    first epoch at or below ``threshold`` (None = censored), mean of the last 5 epochs, seconds per
    iteration."""
    m = metrics.sort_values("epoch")
    loss = m["train_loss"].to_numpy(dtype=float)
    ep = m["epoch"].to_numpy()
    out = {"best": float(np.nanmin(loss)) if len(loss) else np.nan, "epochs_run": int(len(loss)),
           "last5_mean": float(np.mean(loss[-5:])) if len(loss) else np.nan}
    for e in epochs:
        upto = loss[ep <= e]
        out[f"loss_at_{e}"] = float(upto[-1]) if len(upto) else np.nan
        out[f"carried_{e}"] = bool(len(loss) and ep[-1] < e)
    reached = ep[loss <= threshold]
    out["epochs_to_threshold"] = int(reached[0]) if len(reached) else None
    if len(m) and "wall_time" in m and "iterations" in m and m["iterations"].iloc[-1] > 0:
        out["seconds_per_iteration"] = float(m["wall_time"].iloc[-1] / m["iterations"].iloc[-1])
    return out


def load_endpoints(root: str | Path) -> pd.DataFrame:
    """One row per complete run under ``root``: optimizer, seed, status, lr, damping, commit,
    diagnostics (whether the run computed the exact reference every step) and the endpoints."""
    rows = []
    for record in iter_runs(root):
        metrics = record.read_csv("metrics.csv")
        if metrics is None or metrics.empty:
            continue
        s = record.summary
        opts = s.get("options") or {}
        rows.append({"optimizer": s.get("optimizer"), "seed": int(s.get("seed")), "status": s.get("status"),
                     "lr": s.get("lr"), "damping": s.get("damping"), "commit": s.get("git_commit"),
                     "diagnostics": bool(opts.get("exact_reference")), "path": str(record.path),
                     **run_endpoints(metrics)})
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
        if self.p_holm >= ALPHA:
            return "no difference detected"
        return f"{'lower' if self.median_diff < 0 else 'higher'} than {self.reference.upper()}"


def paired_differences(frame: pd.DataFrame, optimizer: str, reference: str, endpoint: str) -> pd.Series:
    """(optimizer - reference) per seed, on the seeds both have."""
    wide = frame.pivot_table(index="seed", columns="optimizer", values=endpoint, aggfunc="first")
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
    method = "exact" if np.all(d != 0) else "auto"
    p = float(stats.wilcoxon(d, alternative="two-sided", method=method).pvalue)
    return Comparison(optimizer, reference, n, med, float(boot.confidence_interval.low),
                      float(boot.confidence_interval.high), lower, p)


def holm(comparisons: list[Comparison]) -> list[Comparison]:
    """Holm-corrected p-values over the comparisons that have one (the family)."""
    tested = [c for c in comparisons if c.p is not None]
    if not tested:
        return comparisons
    adjusted = multipletests([c.p for c in tested], alpha=ALPHA, method="holm")[1]
    corrected = {c.optimizer: float(a) for c, a in zip(tested, adjusted)}
    return [Comparison(**{**c.__dict__, "p_holm": corrected.get(c.optimizer)}) for c in comparisons]


def family(frame: pd.DataFrame, optimizers, reference: str = "kfac", endpoint: str = "best") -> list[Comparison]:
    """The primary family: each of ``optimizers`` against ``reference``, Holm over those tested."""
    return holm([compare(paired_differences(frame, o, reference, endpoint), o, reference) for o in optimizers
                 if o != reference])
