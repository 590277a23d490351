"""The report's ``recheck`` table: the committed records of ``python -m kfac2l.recheck --record``
(``results/recheck/*.json``), one row per record, read from those files only.

    <!-- table:recheck:PROFILE -->   (PROFILE: the profile whose runs were checked; records of others are left out)
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

RECORDS = Path("recheck")   # under results/


def _selection(sel: dict) -> str:
    parts = [f"{k} {' '.join(map(str, v))}" for k, v in (sel or {}).items() if v]
    return "; ".join(parts) if parts else "one run per arm, optimiser, commit and machine kind"


def _epochs(runs: list[dict]) -> str:
    checked = [r for r in runs if r.get("epochs")]
    if not checked:
        return "-"
    whole = all(r.get("epochs_run") == r["epochs"] for r in checked)
    lo, hi = min(r["epochs"] for r in checked), max(r["epochs"] for r in checked)
    return (f"{lo}" if lo == hi else f"{lo}-{hi}") + (" (whole runs)" if whole else "")


def recheck_table(results: Path, profile: str) -> str:
    """One row per committed recheck record: when, which code on which machine, what was selected,
    how many epochs were compared, and the outcomes."""
    rows = []
    for path in sorted((Path(results) / RECORDS).glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("profile", profile) != profile:
            continue
        runs, counts, m = rec.get("runs", []), rec.get("counts", {}), rec.get("machine", {})
        made_with = sorted({str(r.get("made_with"))[:7] for r in runs if r.get("outcome") != "other machine"})
        rows.append({"record": path.name, "date": str(rec.get("date", "-"))[:10],
                     "code checked": str(rec.get("commit"))[:7] + ("+dirty" if "dirty" in str(rec.get("commit")) else ""),
                     "machine": f"{m.get('cpu', '?')} ({m.get('cpu_capability', '?')}, torch {m.get('torch', '?')})",
                     "runs selected": _selection(rec.get("selection")),
                     "runs made with": ", ".join(made_with) or "-", "epochs compared": _epochs(runs),
                     "bit for bit": str(counts.get("same", 0)), "differ": str(counts.get("DIFFERENT", 0)),
                     "made on another kind": str(counts.get("other machine", 0)),
                     "differ, no machine record": str(counts.get("different, machine not recorded", 0))})
    if not rows:
        return "_no recheck records (`python -m kfac2l.recheck --record results/recheck/NAME.json`)_\n"
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + (
        "\n\nEach row: one `python -m kfac2l.recheck --record` run, which reran the selected committed runs from their "
        "own configs and compared the per-epoch training and test losses bit for bit. Differ: made on this kind of "
        "machine (torch's SIMD capability and version) yet different; made on another kind: not comparable there, "
        "not rerun; no machine record: runs made before the field existed, rerun, and when they differ the cause "
        "(code or machine) cannot be told.\n")


TABLES = {"recheck": recheck_table}
