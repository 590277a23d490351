"""Tables of issue 15's small arms on deep linear A, from committed result files only: the KL clip
(item 6: ``clip-arms``, the ``noclip`` and ``clipgrid`` arms of ``kfac2l.plan``) and the robustness of
the selection (item 5: ``select11``). Both descriptive (1-3 seeds): no test.

Tables (``<!-- table:KIND:PROFILE:PANEL -->``, PANEL the selected arm's, ``deep_linear_a``):
``clip-arms`` one row per run of the clip arms, beside the selected arm's run of the same optimiser,
seed and setting (the paper's unscaled clip, kappa 1e-2); ``select11`` the three best cells of each
optimiser's seed-0 grid, rerun on seed 11, ranked on both seeds.
Inline numbers (``<!-- value:arms:KEY -->``): ``arms:select11:PROFILE:PANEL:BUDGET`` (BUDGET ``grid`` or
``full``: how many optimisers' seed-0 choice held on seed 11, of how many; ``epochs``: the grid's budget), and
``arms:clip:PROFILE:PANEL:ARM:OPTIMIZER:STAT`` (ARM ``noclip`` or a kappa of ``CLIPGRID_KAPPAS``; STAT
``median``, ``min``, ``max`` of the difference to the clipped run over the runs that neither diverged
nor failed, or ``n``), and
``arms:clip-reading:PROFILE:PANEL`` (``clip_reading``, the declared rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kfac2l.analysis import SMALLEST_EFFECT
from kfac2l.evidence import FAILED, _g, _nu
from kfac2l.names import LABELS, ORDER
from kfac2l.plan import (
    CLIPGRID_KAPPAS,
    CLIPGRID_PANEL,
    NOCLIP_OPTIMIZERS,
    NOCLIP_PANEL,
    NOCLIP_SEEDS,
    SELECT11_EPOCHS,
    SELECT11_PANEL,
    SELECT11_SEED,
)
from kfac2l.runs import iter_runs

GRID_EPOCHS = 10   # the grid's budget where its table does not record one (max_epochs)
SHOWN = ("completed", *FAILED)    # statuses of runs the tables show (not running or interrupted ones)


def _setting(lr, damping) -> str:
    return f"lr {float(lr):g}" + ("" if damping is None or pd.isna(damping) else f", damping {float(damping):g}")


def _same(a, b) -> bool:
    """Two settings (lr or damping; None for none) are the same."""
    if a is None or b is None or pd.isna(a) or pd.isna(b):
        return (a is None or pd.isna(a)) and (b is None or pd.isna(b))
    return bool(np.isclose(float(a), float(b)))


def _machine(summary: dict) -> str:
    return f"{str(summary.get('git_commit'))[:7]} ({(summary.get('machine') or {}).get('cpu_capability') or 'unrecorded'})"


def clip_arms(profile_root: Path, selected: str) -> pd.DataFrame:
    """One row per completed, diverged or failed run of the ``noclip`` and ``clipgrid`` arms under ``profile_root``
    (``results/final/<profile>``), with the selected arm's run of the same optimiser and seed where its
    lr and damping are the same (else its cells are empty)."""
    base = {(r.summary["optimizer"], int(r.summary["seed"])): r.summary for r in iter_runs(profile_root / selected)}
    arms = [("noclip", "no clip", NOCLIP_PANEL)] + [
        (k, f"lr^2 form, kappa {k}", CLIPGRID_PANEL.format(k)) for k in CLIPGRID_KAPPAS]
    rows = []
    for key, label, panel in arms:
        for record in iter_runs(profile_root / panel, complete_only=False):
            if record.summary.get("status") not in SHOWN:
                continue
            s = record.summary
            ref = base.get((s["optimizer"], int(s["seed"])))
            if ref is not None and not (_same(ref.get("lr"), s.get("lr")) and _same(ref.get("damping"), s.get("damping"))):
                ref = None
            nu = _nu(record)
            rows.append({"arm": key, "label": label, "optimizer": s["optimizer"], "seed": int(s["seed"]),
                         "setting": _setting(s.get("lr"), s.get("damping")), "best": s.get("best_train_loss"),
                         "clipped_best": None if ref is None else ref.get("best_train_loss"),
                         "clipped_share": None if nu is None or not len(nu) else float((nu < 1).mean()),
                         "nu_median": None if nu is None or not len(nu) else float(nu.median()),
                         "status": s.get("status"),
                         "code": _machine(s) + ("" if ref is None else f" / {_machine(ref)}")})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["difference"] = pd.to_numeric(frame["best"]) - pd.to_numeric(frame["clipped_best"])
    return frame


def clip_arms_table(results: Path, profile: str, panel: str) -> str:
    """Issue 15, item 6: no clip at all, and the lr^2 clip form on a small kappa grid, each run beside
    the run with the paper's unscaled clip (kappa 1e-2) of the same optimiser, seed and setting."""
    frame = clip_arms(Path(results) / "final" / profile, panel)
    if frame.empty:
        return "_no runs yet (`make evidence-paired ARMS=\"noclip clipgrid\"`)_\n"
    frame["_o"] = frame["optimizer"].map(ORDER.index)
    frame = frame.sort_values(["_o", "arm", "seed"], key=lambda c: c.map(_arm_rank) if c.name == "arm" else c)
    out = pd.DataFrame({
        "arm": frame["label"], "optimizer": frame["optimizer"].map(LABELS), "seed": frame["seed"].astype(str),
        "setting": frame["setting"], "status": frame["status"], "best loss": frame["best"].map(lambda v: _g(v, 4)),
        "with the unscaled clip, kappa 1e-2 (same seed)": frame["clipped_best"].map(lambda v: _g(v, 4)),
        "difference": [st if st in FAILED else "-" if pd.isna(v) else f"{v:+.4f}"
                       for v, st in zip(frame["difference"], frame["status"])],
        "steps clipped (nu < 1)": frame["clipped_share"].map(lambda v: "-" if v is None or pd.isna(v)
                                                             else f"{100 * v:.1f} %"),
        "median nu": frame["nu_median"].map(_g),
        "commits (CPU): this run / the clipped one": frame["code"]})
    return out.to_markdown(index=False, disable_numparse=True) + (
        "\n\nOne row per run that completed, diverged or failed (descriptive: 3 seeds or 1, no test). Best loss: "
        "the lowest epoch training loss (for a diverged run, before it diverged). Difference: this run's best "
        "training loss minus that of the selected arm's run of the same optimiser, seed, lr and damping, which clips "
        "with the paper's unscaled form at kappa 1e-2 (negative: this arm's run is lower). Steps clipped: the share "
        "of iterations whose "
        "clip factor nu (the factor applied to the step) is below 1; '-' where the run does not clip. Commits "
        "(CPU): the code of each run and torch's SIMD capability of the machine that ran it; a pair that crosses "
        "them adds the rerun noise of section \"Statistics\".\n")


def clip_reading(results: Path, profile: str, panel: str) -> str:
    """The clip arms read by the rule declared before they ran (2026-12-02, session 10, margin
    ``SMALLEST_EFFECT``; a diverged or failed run counts as higher). No clip: *needed* when every
    run without it ends more than the margin above its clipped pair or diverges, *not needed* when
    none does, *mixed* otherwise. The lr^2 form (KFAC, seed 1): the kappas whose run ends within the
    margin of the unscaled clip's, or lower; with one, the clip's strength decides, not its form."""
    frame = clip_arms(Path(results) / "final" / profile, panel)
    higher = (frame["status"].isin(FAILED) | (frame["difference"] > SMALLEST_EFFECT)) if len(frame) else frame
    parts = []
    noclip = frame[frame["arm"] == "noclip"] if len(frame) else frame
    expected = len(NOCLIP_OPTIMIZERS) * len(NOCLIP_SEEDS)
    if len(noclip) < expected or noclip["clipped_best"].isna().any():
        parts.append(f"without the clip: no reading yet ({len(noclip)} of {expected} runs paired)")
    else:
        k = int(higher[noclip.index].sum())
        side = ("needed: every run without it ends higher or diverges" if k == expected else
                "not needed here: no run without it ends higher" if k == 0 else
                f"mixed: {k} of {expected} runs without it end higher or diverge")
        parts.append(f"the clip is {side} (higher: by more than {SMALLEST_EFFECT:g} in best loss)")
    grid = frame[frame["arm"] != "noclip"] if len(frame) else frame
    if len(grid) < len(CLIPGRID_KAPPAS) or grid["clipped_best"].isna().any():
        parts.append(f"the lr^2 form: no reading yet ({len(grid)} of {len(CLIPGRID_KAPPAS)} kappas)")
    else:
        reach = [k for k, h in zip(grid["arm"], higher[grid.index]) if not h]
        parts.append(f"under the lr^2 form kappa {', '.join(reach)} reach the unscaled clip's seed-1 loss within "
                     f"{SMALLEST_EFFECT:g}: the clip's strength decides, not its form (one seed)" if reach else
                     f"no kappa of the lr^2 grid reaches the unscaled clip's seed-1 loss within {SMALLEST_EFFECT:g} "
                     "(one seed: the form may matter, not shown)")
    return "; ".join(parts)


def _arm_rank(arm: str) -> int:
    return 0 if arm == "noclip" else 1 + CLIPGRID_KAPPAS.index(arm)


def _grid(results: Path, profile: str, panel: str) -> pd.DataFrame:
    path = Path(results) / "tables" / profile / panel / "runs.csv"
    if not path.exists():
        return pd.DataFrame()
    grid = pd.read_csv(path)
    return grid[(grid["status"] == "completed") & grid["best_train_loss"].notna()]


def _at_cell(cells: pd.DataFrame, lr, damping) -> np.ndarray:
    """Which rows of a grid table are the cell (lr, damping)."""
    return np.array([_same(a, lr) and _same(b, damping) for a, b in zip(cells["lr"], cells["damping"])])


def select11_frame(results: Path, profile: str, panel: str) -> pd.DataFrame:
    """Per run of the ``select11`` arm (completed, diverged or failed): its cell, its seed-0 grid
    loss and rank (the grid's budget, ``max_epochs`` of its table), and on seed 11 its best loss
    within the same budget and within ``SELECT11_EPOCHS`` epochs, each ranked among the optimiser's
    grid cells run there (a diverged or failed run last; cells beyond the grid are not ranked)."""
    grid = _grid(results, profile, panel)
    budget = int(grid["max_epochs"].max()) if "max_epochs" in grid and grid["max_epochs"].notna().any() else GRID_EPOCHS
    rows = []
    for record in iter_runs(Path(results) / "final" / profile / SELECT11_PANEL, complete_only=False):
        s, metrics = record.summary, record.read_csv("metrics.csv")
        if s.get("status") not in SHOWN or int(s.get("seed", -1)) != SELECT11_SEED:
            continue
        metrics = metrics if metrics is not None else pd.DataFrame({"epoch": [], "train_loss": []})
        cells = grid[grid["optimizer"] == s["optimizer"]].sort_values("best_train_loss") if len(grid) else grid
        at = _at_cell(cells, s.get("lr"), s.get("damping")) if len(cells) else []
        rank = int(np.flatnonzero(at)[0]) + 1 if np.any(at) else None
        loss = pd.to_numeric(metrics["train_loss"], errors="coerce")
        rows.append({"optimizer": s["optimizer"], "lr": s.get("lr"), "damping": s.get("damping"),
                     "grid_loss": cells["best_train_loss"].iloc[rank - 1] if rank else np.nan, "grid_rank": rank,
                     "grid_cells": len(cells), "grid_epochs": budget,
                     "at_grid_budget": loss[metrics["epoch"] <= budget].min(), "full": loss.min(),
                     "epochs": int(metrics["epoch"].max()) if len(metrics) else 0, "status": s.get("status")})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    in_grid, failed = frame["grid_rank"].notna(), frame["status"].isin(FAILED)
    for col in ("at_grid_budget", "full"):
        ranked = frame[col].where(~failed, np.inf).fillna(np.inf).where(in_grid)
        frame[f"{col}_rank"] = ranked.groupby(frame["optimizer"]).rank(method="min").astype("Int64")
        best = ranked.groupby(frame["optimizer"]).transform("min")
        frame[f"{col}_behind"] = ranked - best   # how far above the optimiser's lowest grid cell on seed 11
    return frame


def select11_held(frame: pd.DataFrame, budget: str) -> tuple[int, int]:
    """The declared reading (2026-12-02, session 10, before any select11 run): an optimiser's seed-0
    choice *held* when on seed 11 it ranks first among its grid cells or ends within SMALLEST_EFFECT
    of the first (and did not diverge or fail); ``budget`` ``grid`` (the grid's epochs, like with like:
    the primary reading) or ``full`` (``SELECT11_EPOCHS``). Returns (held, optimisers with the choice run)."""
    col = "at_grid_budget" if budget == "grid" else "full"
    chosen = frame[frame["grid_rank"] == 1] if not frame.empty else frame
    if not len(chosen):
        return 0, 0
    held = (chosen[f"{col}_rank"] == 1) | (chosen[f"{col}_behind"] <= SMALLEST_EFFECT)
    return int(held.sum()), len(chosen)


def select11_table(results: Path, profile: str, panel: str) -> str:
    """Issue 15, item 5: is the seed-0 selection robust? Each optimiser's three best grid cells (and
    KRY-NICO's damping beyond the grid's edge) rerun on seed 11, ranked on both seeds."""
    frame = select11_frame(results, profile, panel)
    if frame.empty:
        return "_no runs yet (`make evidence-paired ARMS=select11`)_\n"
    frame["_o"] = frame["optimizer"].map(ORDER.index)
    frame = frame.sort_values(["_o", "grid_rank"], na_position="last")
    budget = int(frame["grid_epochs"].iloc[0])

    def rank(v, n=None) -> str:
        return "-" if v is None or pd.isna(v) else f"{int(v)}" + ("" if n is None else f" of {n}")

    def cell(loss, r, n=None) -> str:
        return f"{_g(loss, 4)} ({rank(r, n)})"

    out = pd.DataFrame({
        "optimizer": frame["optimizer"].map(LABELS),
        "cell": [_setting(lr, d) for lr, d in zip(frame["lr"], frame["damping"])],
        f"seed 0 grid, {budget} epochs: best loss (rank)": [
            cell(v, r, n) if r is not None and not pd.isna(r) else "beyond the grid"
            for v, r, n in zip(frame["grid_loss"], frame["grid_rank"], frame["grid_cells"])],
        f"seed {SELECT11_SEED}, first {budget} epochs (rank)": [
            cell(v, r) for v, r in zip(frame["at_grid_budget"], frame["at_grid_budget_rank"])],
        f"seed {SELECT11_SEED}, {SELECT11_EPOCHS} epochs (rank)": [
            cell(v, r) for v, r in zip(frame["full"], frame["full_rank"])],
        "status": frame["status"], "epochs run": frame["epochs"].astype(str)})
    held = {b: select11_held(frame, b) for b in ("grid", "full")}
    return out.to_markdown(index=False, disable_numparse=True) + (
        f"\n\nRanks on seed {SELECT11_SEED} are among the optimiser's grid cells run there (1 = lowest best loss; "
        "a diverged or failed run last; a cell beyond the grid is shown, not ranked). Held (declared before the "
        f"runs): the seed-0 choice ranks first on seed {SELECT11_SEED} or ends within {SMALLEST_EFFECT:g} of the "
        f"first: {held['grid'][0]} of {held['grid'][1]} optimisers within the grid's {budget} epochs (the primary "
        f"reading, like with like), {held['full'][0]} of {held['full'][1]} within {SELECT11_EPOCHS} epochs (early "
        "stopping as in the protocol; 'epochs run'). One seed: descriptive, no test.\n")


def value(key: str, results: Path) -> str:
    """An inline number (see the module docstring); ``key`` without its leading ``arms:``."""
    kind, *parts = key.split(":")
    if kind == "select11":
        profile, panel, budget = parts
        frame = select11_frame(results, profile, panel)
        if budget == "epochs":
            return str(int(frame["grid_epochs"].iloc[0])) if len(frame) else "-"
        held, of = select11_held(frame, budget)
        return f"{held} of {of}"
    if kind == "clip-reading":
        return clip_reading(results, *parts)
    if kind == "clip":
        profile, panel, arm, opt, stat = parts
        frame = clip_arms(Path(results) / "final" / profile, panel)
        runs = frame[(frame["arm"] == arm) & (frame["optimizer"] == opt)] if len(frame) else frame
        paired = runs[runs["difference"].notna()] if len(runs) else runs
        if stat == "n":
            return str(len(paired))
        ended = paired[~paired["status"].isin(FAILED)]["difference"] if len(paired) else paired
        lost = len(paired) - len(ended)
        if not len(paired):
            return "-"
        if not len(ended):
            return "every run diverged or failed"
        return f"{getattr(ended, stat)():+.4f}" + (f" ({lost} diverged or failed, left out)" if lost else "")
    raise ValueError(f"unknown value kind arms:{kind!r}; valid: arms:select11, arms:clip, arms:clip-reading")


TABLES = {"clip-arms": clip_arms_table, "select11": select11_table}
