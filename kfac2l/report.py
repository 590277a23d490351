"""Tables and numbers of README.md and docs/report.md generated from committed result files
(never typed by hand).

    python -m kfac2l.report            # rewrite every marked table and number in both documents
    python -m kfac2l.report --check    # exit 1 if a document disagrees with the result files

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table -->``; NAME is
``final:<profile>:<panel>`` (best training loss per optimiser over seeds, with the selected
settings and, where recorded, the distance ratio of Figure 6 and the sign of the gap (4.6)),
``ablation:<profile>`` (Figure 7's arms), or one of ``kfac2l.evidence``'s tables (``paired``,
``secondary``, ``clip``, ``distance``, ``cost``, ``ablation-seed``, ``claims``, ``refbatch``), of
``kfac2l.evidence_arms``'s (``clip-arms``, ``select11``), ``recheck:<profile>`` (``kfac2l.evidence_recheck``: the
committed records of ``kfac2l.recheck --record``) or of
``kfac2l.evidence_tko``'s (``tko-paired``, ``tko-descriptive``, ``tko-secondary``, ``tko-depth``,
``tko-fidelity``) or of ``kfac2l.evidence_standin``'s (``standin``, ``standin-c1``). An inline
number lives between ``<!-- value:KEY -->`` and ``<!-- /value -->`` (keys: ``kfac2l.evidence.value``,
and ``arms:...`` of ``kfac2l.evidence_arms.value``).
Everything is read through ``kfac2l.runs``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from kfac2l import evidence, evidence_arms, evidence_recheck, evidence_standin, evidence_tko
from kfac2l.io import atomic_write_text
from kfac2l.names import LABELS, ORDER
from kfac2l.plots.figures import ABLATION
from kfac2l.plots.results import selection_budget
from kfac2l.runs import iter_runs

MARKER = re.compile(r"(<!-- table:(?P<name>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
VALUE = re.compile(r"(<!-- value:(?P<key>[^ ]+) -->)(?P<body>[^<]*)(<!-- /value -->)")
DOCUMENTS = ("README.md", "docs/report.md", "docs/experiments.md", "docs/benchmarks.md")


def _g(x, digits: int = 3) -> str:
    return "-" if x is None or pd.isna(x) else f"{x:.{digits}g}"


def _loss_cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return _g(values.iloc[0])
    return f"{_g(values.median())} [{_g(values.min())}, {_g(values.max())}]"


def _runs(root: Path) -> pd.DataFrame:
    rows = []
    for record in iter_runs(root):
        s = record.summary
        row = {"optimizer": s.get("optimizer"), "seed": s.get("seed"), "status": s.get("status"),
               "best": s.get("best_train_loss"), "epochs": s.get("epochs_run"), "lr": s.get("lr"),
               "damping": s.get("damping"), "commit": s.get("git_commit")}
        diag = record.read_csv("diagnostics.csv")
        if diag is not None and {"dist_two_level", "dist_kfac"} <= set(diag):
            row["ratio"] = (diag["dist_two_level"] / diag["dist_kfac"]).median()
        if diag is not None and "gap" in diag:
            row["gap_negative"] = (diag["gap"] < 0).mean()
        rows.append(row)
    return pd.DataFrame(rows)


def final_table(results: Path, profile: str, panel: str) -> str:
    """Markdown: per optimiser, selected lr/damping, best training loss median [min, max] over seeds."""
    runs = _runs(results / "final" / profile / panel)
    if runs.empty:
        return "_no results_\n"
    lines = []
    for opt in [o for o in ORDER if o in set(runs["optimizer"])]:
        sub = runs[runs["optimizer"] == opt]
        first = sub.iloc[0]
        diverged = int((sub["status"] == "diverged").sum())
        lines.append({
            "optimizer": LABELS[opt], "lr": _g(first["lr"]), "damping": _g(first["damping"]),
            "best training loss, median [min, max]": _loss_cell(sub["best"]), "seeds": len(sub),
            "epochs run (median)": _g(sub["epochs"].median()), "diverged": diverged,
            "distance ratio (our Fig. 6)": _g(sub["ratio"].dropna().median(), 4) if "ratio" in sub else "-",
            "gap (4.6) < 0": (f"{100 * sub['gap_negative'].dropna().median():.0f} %"
                              if "gap_negative" in sub and sub["gap_negative"].notna().any() else "-"),
            "_sort": sub["best"].median(),
        })
    frame = pd.DataFrame(lines).sort_values("_sort").drop(columns="_sort")
    budget = selection_budget(results, profile, panel)
    commits = sorted({str(c)[:7] + ("+dirty" if "dirty" in str(c) else "") for c in runs["commit"].dropna()})
    note = (f"\n{profile} profile; lr/damping selected on {budget or 'the profile grid'}; final runs with seeds "
            f"{', '.join(map(str, sorted(runs['seed'].unique())))}; commit(s) {', '.join(commits) or '-'}.\n")
    return frame.to_markdown(index=False) + "\n" + note


def ablation_table(results: Path, profile: str) -> str:
    """Markdown: best training loss median [min, max] per optimiser (rows) and arm (columns)."""
    cells: dict[str, dict[str, str]] = {}
    seeds: dict[str, set] = {}
    for arm in ABLATION:
        runs = _runs(results / "final" / profile / arm.panel)
        for opt, sub in (runs.groupby("optimizer") if not runs.empty else []):
            cells.setdefault(opt, {})[arm.label] = f"{_loss_cell(sub['best'])} (n={len(sub)})"
            seeds.setdefault(arm.label, set()).update(sub["seed"])
    if not cells:
        return "_no results_\n"
    frame = pd.DataFrame([{"optimizer": LABELS[o], **{a.label: cells[o].get(a.label, "-") for a in ABLATION}}
                          for o in ORDER if o in cells])
    return frame.to_markdown(index=False) + "\n"


PANEL_TABLES = {"paired": evidence.paired_table, "c3-sensitivity": evidence.c3_sensitivity_table,
                "matched": evidence.matched_table, "perseed": evidence.perseed_table,
                "secondary": evidence.secondary_table, "clip": evidence.clip_table,
                "distance": evidence.distance_table, "cost": evidence.cost_table,
                "selection": evidence.selection_table, **evidence_arms.TABLES, **evidence_tko.TABLES,
                **evidence_standin.TABLES}


def render(name: str, results: Path) -> str:
    kind, _, rest = name.partition(":")
    if kind == "final":
        profile, _, panel = rest.partition(":")
        return final_table(results, profile, panel)
    if kind == "ablation":
        return ablation_table(results, rest)
    if kind == "ablation-seed":
        return evidence.ablation_seed_table(results, rest, ABLATION)
    if kind == "claims":
        return evidence.claims_table(results, rest)
    if kind == "bench":
        return evidence.bench_table(results, rest)
    if kind == "fidelity":
        return evidence.fidelity_table(results, rest)
    if kind == "refbatch":
        return evidence.refbatch_table(results, rest)
    if kind == "recheck":
        return evidence_recheck.recheck_table(results, rest)
    if kind in PANEL_TABLES:
        profile, _, panel = rest.partition(":")
        return PANEL_TABLES[kind](results, profile, panel)
    raise ValueError(f"unknown table {name!r}; valid: final:<profile>:<panel>, ablation:<profile>, bench:<panel>, "
                     f"ablation-seed:<profile>, claims:<profile>, refbatch:<profile>, fidelity:<profile>, "
                     f"recheck:<profile>, "
                     f"{', '.join(PANEL_TABLES)}:<profile>:<panel>")


def update(text: str, results: Path) -> str:
    """``text`` with every marked table and number regenerated from ``results``."""
    evidence.endpoints.cache_clear()
    evidence.c3_readings.cache_clear()
    text = MARKER.sub(lambda m: m.group(1) + render(m.group("name"), results) + m.group(4), text)
    return VALUE.sub(lambda m: m.group(1) + _value(m.group("key"), results) + m.group(4), text)


def _value(key: str, results: Path) -> str:
    """An inline number: ``arms:...`` keys from ``kfac2l.evidence_arms``, the others from ``kfac2l.evidence``."""
    kind, _, rest = key.partition(":")
    return evidence_arms.value(rest, results) if kind == "arms" else evidence.value(key, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", nargs="*", default=None, help=f"documents (default: {' '.join(DOCUMENTS)})")
    parser.add_argument("--results", default="results")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    status = 0
    for name in args.readme or DOCUMENTS:
        path = Path(name)
        text = path.read_text()
        new = update(text, Path(args.results))
        count = len(MARKER.findall(text)) + len(VALUE.findall(text))
        if args.check:
            if new != text:
                print(f"kfac2l.report: the tables or numbers in {path} disagree with {args.results}; "
                      "run `make readme`", file=sys.stderr)
                status = 1
            else:
                print(f"{path}: {count} tables and numbers agree with {args.results}")
            continue
        if new != text:
            atomic_write_text(path, new)
        print(f"{path}: {count} tables and numbers written from {args.results}")
    return status


if __name__ == "__main__":
    sys.exit(main())
