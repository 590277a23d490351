"""What a run leaves behind: its identity, its record files (the one reader and writer of
``summary.json``, ``metrics.csv`` and ``diagnostics.csv``) and its checkpoint."""

from kfac2l.runs.identity import identity_diff, identity_id
from kfac2l.runs.records import (
    RunRecord,
    iter_runs,
    read_summary,
    write_diagnostics,
    write_metrics,
    write_summary,
)

__all__ = [
    "RunRecord",
    "identity_diff",
    "identity_id",
    "iter_runs",
    "read_summary",
    "write_diagnostics",
    "write_metrics",
    "write_summary",
]
