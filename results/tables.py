"""The paper's VTAB-1k tables from run directories, selected as each protocol prescribes.

    python scripts/collect_results.py [--runs outputs/runs] [--protocol paper|final|search]
                                      [--out outputs/tables] [--search method.ne,method.scale]
                                      [--where method.ne.in_proj=3,6]

Rules (one place, used by the tables, the figures and scripts/clean_protocol.py):
- Only ``finished`` runs are used; every other status is counted and listed, never used.
- Variant = a run's identity minus the searched keys (the union of ``searched`` over the
  runs, plus ``--search``), the seed and the task (results/runs.py). Each variant is one
  row; variants are never merged.
- Grid point = the searched values. Per (variant, task) the protocol selects one grid point:
  * paper:  the highest mean over seeds of ``best_acc`` (best-of-test every N epochs: this
    selects on the test set, as the authors did);
  * search: the highest mean over seeds of ``final_acc`` (= the last val200 accuracy after
    training on train800): stage 1 of the clean protocol;
  * final:  ``final_acc`` (test, after the last epoch) of the configuration stage 1 chose;
    if a variant holds several final-stage configurations of one task, the one with the
    best stage-1 (val200) mean is reported, never the best on test (none found: the cell
    is left empty and the table says why).
  Ties: more seeds, then fewer parameters, then the grid point's text.
- A cell is the selected grid point's mean +- sample std (ddof=1; no std for n = 1) over
  its seeds; n is given in the caption (cells with another n say so).
- Group means over the tasks present; a group mean over an incomplete group, and averages
  built from one, carry ``*`` and a footnote (k of n tasks). "VTAB avg" is the mean of the
  three group means (PETL papers); "mean over tasks" the plain mean. Non-VTAB tasks (the
  demo ``digits``) get their own table and never enter a VTAB average.
- Params(M): trainable parameters without the head, mean over the selected configurations.
- One table per (backbone, protocol, recipe, precision, normalisation, epochs, evaluation
  interval): a table never mixes them, and its caption names them.
- Data: a cell whose runs recorded different ``data_digest`` values (different copies of the
  task), or some recorded one and some none, is marked ``‡`` with a footnote naming the
  digests and seeds; a task whose rows read different copies gets a footnote too.
- ``--baseline ROW [--level 0.05]``: cells whose difference from that row is not significant
  at the level, by the paired test of results/paired.py on the runs' saved predictions, are
  marked ``†`` (cells that cannot be tested are named in a footnote, never marked).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.errors import UserError
from data.registry import GROUPS, TASKS, VTAB_TASKS
from results.labels import Label, latex_escape, method_label, unique_labels
from results.runs import assign_variants, load_runs, not_used, searched_keys, status_summary, under, where

PROTOCOLS = ("paper", "final", "search")
METRIC = {"paper": "best_acc", "final": "final_acc", "search": "final_acc"}
DISPLAY = {"cifar": "Cifar100", "caltech101": "Caltech101", "dtd": "DTD", "oxford_flowers102": "Flowers102",
           "oxford_iiit_pet": "Pets", "svhn": "SVHN", "sun397": "Sun397", "patch_camelyon": "Camelyon",
           "eurosat": "EuroSAT", "resisc45": "Resisc45", "diabetic_retinopathy": "Retinopathy",
           "clevr_count": "Clevr-Count", "clevr_dist": "Clevr-Dist", "dmlab": "DMLab", "kitti": "KITTI-Dist",
           "dsprites_loc": "dSpr-Loc", "dsprites_ori": "dSpr-Ori", "smallnorb_azi": "sNORB-Azim",
           "smallnorb_ele": "sNORB-Ele", "digits": "Digits (demo)"}
VTAB_AVG, TASK_MEAN = "VTAB avg (mean of group means)", "mean over tasks"
MISSING = "–"
DATA_MARK = "‡"        # the runs of a cell read different copies of the task (or some did not record theirs)
NOT_SIG_MARK = "†"     # not significantly different from the named baseline (mark_significance)


# -- selection ------------------------------------------------------------------------------
def grid_value(grid: tuple, key: str):
    """The value of ``key`` at a grid point (a dict when only sub-keys were searched)."""
    d = dict(grid)
    if key in d:
        return d[key]
    sub = {k[len(key) + 1:]: v for k, v in d.items() if k.startswith(key + ".")}
    return json.dumps(sub, sort_keys=True) if sub else None


def grid_points(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (variant, task, grid point): mean, std (ddof=1), n over seeds, and more."""
    rows = []
    for (vid, task, grid), g in df.groupby(["variant", "task", "grid"], sort=False):
        acc = g[metric].astype(float)
        rows.append({"variant": vid, "family": g["family"].iloc[0], "task": task, "grid": grid,
                     "mean": acc.mean(), "std": acc.std(ddof=1) if len(acc) > 1 else math.nan, "n": len(acc),
                     "seeds": tuple(sorted(g["seed"].tolist())),
                     "params": g["trainable_params"].astype(float).mean(),
                     "run_dirs": tuple(g.sort_values("seed")["run_dir"]), "metric": metric,
                     "digests": tuple(_digest(v) for v in g.sort_values("seed")["data_digest"])
                     if "data_digest" in g.columns else (None,) * len(g)})
    return pd.DataFrame(rows, columns=["variant", "family", "task", "grid", "mean", "std", "n", "seeds", "params",
                                       "run_dirs", "metric", "digests"])


def _digest(v):
    """A run's data_digest, None when it did not record one (older runs)."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _best(points: pd.DataFrame) -> pd.Series:
    order = sorted(points.index, key=lambda i: (-points.at[i, "mean"], -points.at[i, "n"], points.at[i, "params"],
                                                str(points.at[i, "grid"])))
    return points.loc[order[0]]


def select(df: pd.DataFrame, protocol: str, keep: tuple[str, ...] = (), stage1: pd.DataFrame | None = None):
    """Per (variant, task[, values of ``keep``]) the grid point the protocol selects.

    ``df``: finished runs of ``protocol`` with variants assigned. ``keep``: searched keys held
    fixed (Figure 3 selects over the others at each N_e). ``stage1``: the search-stage runs
    (variants assigned with the same searched keys), used by ``final`` when a variant holds
    several final-stage configurations of one task. Returns the selected grid points with
    ``n_grid`` (grid points considered) and ``selected_by``.
    """
    pts = grid_points(df, METRIC[protocol])
    for k in keep:
        pts[k] = [grid_value(g, k) for g in pts["grid"]]
    s1 = grid_points(stage1, METRIC["search"]) if stage1 is not None and not stage1.empty else None
    out = []
    for _, g in pts.groupby(["variant", "task", *keep], sort=False, dropna=False):
        if protocol != "final":
            row = _best(g).copy()
            row["selected_by"] = "only configuration" if len(g) == 1 else f"highest mean {METRIC[protocol]}"
        elif len(g) == 1:
            row = g.iloc[0].copy()
            row["selected_by"] = "the configuration run"
        else:
            cand = None if s1 is None else s1[(s1["family"] == g["family"].iloc[0]) & (s1["task"] == g["task"].iloc[0])
                                              & s1["grid"].isin(set(g["grid"]))]
            if cand is not None and not cand.empty:
                row = g[g["grid"] == _best(cand)["grid"]].iloc[0].copy()
                row["selected_by"] = "stage-1 val200 mean"
            else:
                row = g.iloc[0].copy()
                row["mean"] = row["std"] = math.nan
                row["selected_by"] = (f"ambiguous: {len(g)} final-stage configurations and no stage-1 runs "
                                      "to choose between them")
        row["n_grid"] = len(g)
        out.append(row)
    cols = [*pts.columns, "n_grid", "selected_by"]
    return pd.DataFrame(out, columns=cols).reset_index(drop=True)


def prepare(runs: pd.DataFrame, protocol: str, search=()) -> tuple[pd.DataFrame, dict, pd.DataFrame | None]:
    """Finished runs of ``protocol`` with variants assigned, the variants' info, and for
    ``final`` the search-stage runs assigned with the same searched keys."""
    fin = runs[runs["status"] == "finished"]
    this = fin[fin["protocol"] == protocol]
    extra = list(search)
    stage1 = fin[fin["protocol"] == "search"] if protocol == "final" else None
    if stage1 is not None:
        extra += list(searched_keys(stage1))
    keys = searched_keys(this, extra)
    this, info = assign_variants(this, keys)
    if stage1 is not None:
        stage1, _ = assign_variants(stage1, keys)
    return this, info, stage1


# -- tables ---------------------------------------------------------------------------------
@dataclass
class Row:
    variant: str
    label: Label
    cells: dict                     # task -> selected grid point (a Series)
    summary: dict = field(default_factory=dict)   # column -> (value, incomplete?, note)
    params: float = math.nan
    method_id: str | None = None


@dataclass
class Table:
    title: str
    caption: str
    tasks: list
    summary_cols: list
    rows: list
    n_common: int
    footnotes: list

    def frame(self) -> pd.DataFrame:
        """Numeric: one row per variant; task means, summaries, Params(M)."""
        recs = []
        for r in self.rows:
            rec = {"table": self.title, "label": r.label.text, "variant": r.variant}
            for t in self.tasks:
                c = r.cells.get(t)
                rec[t] = None if c is None else c["mean"]
                rec[f"{t} std"] = None if c is None else c["std"]
                rec[f"{t} n"] = None if c is None else c["n"]
            for col in self.summary_cols:
                v, incomplete, _ = r.summary.get(col, (None, False, ""))
                rec[col], rec[f"{col} incomplete"] = v, incomplete
            rec["Params(M)"] = r.params
            recs.append(rec)
        return pd.DataFrame(recs)

    def cells(self) -> pd.DataFrame:
        """Long: one row per (variant, task): the selected grid point and its runs."""
        recs = []
        for r in self.rows:
            for t in self.tasks:
                c = r.cells.get(t)
                if c is not None:
                    recs.append({"table": self.title, "label": r.label.text, "variant": r.variant, "task": t,
                                 "mean": c["mean"], "std": c["std"], "n": c["n"], "metric": c["metric"],
                                 "seeds": " ".join(map(str, c["seeds"])),
                                 "grid": json.dumps(dict(c["grid"]), default=str), "n_grid": c["n_grid"],
                                 "selected_by": c["selected_by"], "params": c["params"],
                                 "run_dirs": ";".join(c["run_dirs"]), "marks": c.get("marks") or "",
                                 "p_vs_baseline": c.get("p_vs_baseline"),
                                 "data_digests": ";".join(d or "" for d in (c.get("digests") or ()))})
        return pd.DataFrame(recs)


def _kind(task: str) -> str:
    return "vtab" if task in VTAB_TASKS else (TASKS[task].group if task in TASKS else "other")


def _caption(protocol: str, first: pd.Series, seeds: list, n_common: int, n_other: bool, searched) -> str:
    every = first.get("eval_every")
    what = {
        "paper": (f"protocol paper: trained on train800val200; test accuracy evaluated every {every} epochs and the "
                  f"best of those reported (best-of-test every {every} epochs: this selects on the test set, as "
                  "the authors did)"),
        "search": ("protocol search (clean protocol, stage 1): trained on train800; val200 accuracy after the last "
                   "epoch; the test set is never used"),
        "final": ("protocol final (clean protocol, stage 2): hyper-parameters chosen per task on val200 after "
                  "training on train800; retrained on train800val200; test accuracy after the last epoch, "
                  "evaluated once"),
    }[protocol]
    sel = {"paper": "highest mean best-of-test accuracy over seeds", "search": "highest mean val200 accuracy over seeds",
           "final": ""}[protocol]
    grid = ("; no hyper-parameter searched" if not searched else
            f"; per task the grid point of {', '.join(searched)} " + ("chosen in stage 1 on val200" if protocol == "final"
                                                                      else f"with the {sel}"))
    seeds_txt = ", ".join(map(str, seeds))
    n_txt = f"n = {n_common} seed{'s' if n_common != 1 else ''} per cell" + (" unless marked (n=k)" if n_other else "")
    return (f"{what}{grid}. Backbone {first['backbone']}; recipe {first['recipe']}; precision {first['precision']}; "
            f"normalisation {first['normalization']}; {first['epochs']} epoch{'' if first['epochs'] == 1 else 's'}; seeds {seeds_txt} ({n_txt}); "
            "cells: mean ± sample std over seeds (no ± when n = 1); Params(M): trainable parameters without the "
            "head, mean over the selected configurations.")


def _summaries(row: Row, kind: str, tasks: list) -> list:
    notes = []
    present = [t for t in tasks if t in row.cells and not math.isnan(row.cells[t]["mean"])]
    if kind == "vtab":
        gmeans = []
        for g in GROUPS:
            members = [t for t in VTAB_TASKS if TASKS[t].group == g]
            have = [row.cells[t]["mean"] for t in members if t in present]
            if have:
                incomplete = len(have) < len(members)
                row.summary[g] = (sum(have) / len(have), incomplete, f"{len(have)} of {len(members)}")
                gmeans.append((g, sum(have) / len(have), incomplete))
                if incomplete:
                    notes.append(f"{g}: mean over {len(have)} of {len(members)} tasks")
        if gmeans:
            incomplete = len(gmeans) < len(GROUPS) or any(i for _, _, i in gmeans)
            row.summary[VTAB_AVG] = (sum(v for _, v, _ in gmeans) / len(gmeans), incomplete, "")
            if incomplete:
                have = [g for g, _, _ in gmeans]
                missing = [g for g in GROUPS if g not in have]
                bad = [g for g, _, i in gmeans if i]
                text = f"VTAB avg: mean of {len(have)} of {len(GROUPS)} group means" if missing else \
                    f"VTAB avg: mean of the {len(GROUPS)} group means"
                if missing:
                    text += f" (no task of {', '.join(missing)})"
                if bad:
                    text += f", incomplete: {', '.join(bad)}"
                notes.append(text)
    if present:
        incomplete = len(present) < len(tasks)
        row.summary[TASK_MEAN] = (sum(row.cells[t]["mean"] for t in present) / len(present), incomplete, "")
        if incomplete:
            notes.append(f"mean over tasks: {len(present)} of {len(tasks)} tasks")
    return notes


def build_tables(runs: pd.DataFrame, protocol: str, search=()) -> list[Table]:
    """The tables of one protocol from ``load_runs`` output (every status; finished ones used)."""
    this, info, stage1 = prepare(runs, protocol, search)
    if this.empty:
        return []
    chosen = select(this, protocol, stage1=stage1)
    first = this.groupby("variant").first()
    split_cols = ["backbone", "recipe", "precision", "normalization", "epochs"] + (["eval_every"] if protocol == "paper"
                                                                                     else [])
    chosen["kind"] = chosen["task"].map(_kind)
    chosen["split"] = [(k, *(str(first.at[v, c]) for c in split_cols)) for k, v in zip(chosen["kind"], chosen["variant"])]
    tables, splits = [], sorted(chosen["split"].unique(), key=lambda s: (s[0] != "vtab", s))
    for split in splits:
        part = chosen[chosen["split"] == split]
        kind, vids = split[0], list(dict.fromkeys(part["variant"]))
        labels = unique_labels({v: method_label(info[v]["identity"], info[v]["grids"], first.at[v, "method_id"])
                                for v in vids}, {v: info[v]["items"] for v in vids})
        tasks = list(VTAB_TASKS) if kind == "vtab" else sorted(part["task"].unique())
        rows, footnotes = [], []
        for v in sorted(vids, key=lambda v: labels[v].sort_key()):
            cells = {r["task"]: r for _, r in part[part["variant"] == v].iterrows()}
            row = Row(v, labels[v], cells, method_id=first.at[v, "method_id"])
            params = [c["params"] for c in cells.values() if not math.isnan(c["params"])]
            row.params = sum(params) / len(params) / 1e6 if params else math.nan
            notes = _summaries(row, kind, tasks)
            if notes:
                footnotes.append(f"\\* {labels[v].text}: " + "; ".join(notes) + ".")
            for t, c in cells.items():
                if math.isnan(c["mean"]):
                    footnotes.append(f"? {labels[v].text}, {t}: {c['selected_by']}.")
                c["marks"] = ""
                note = _digest_note(c)
                if note:
                    c["marks"] += DATA_MARK
                    footnotes.append(f"{DATA_MARK} {labels[v].text}, {t}: {note}.")
            rows.append(row)
        footnotes += _column_digest_notes(rows, tasks)
        ns = part["n"].tolist()
        n_common = max(set(ns), key=ns.count)
        runs_used = this[this["variant"].isin(vids) & this["task"].isin(tasks)]
        seeds = sorted(set(runs_used["seed"]))
        searched = sorted({k for v in vids for g in info[v]["grids"] for k, _ in g})
        searched = [s for s in info[vids[0]]["searched"] if any(under(k, [s]) for k in searched)] or searched
        caption = _caption(protocol, first.loc[vids[0]], seeds, n_common, len(set(ns)) > 1, searched)
        name = "VTAB-1k" if kind == "vtab" else f"{kind} tasks (not part of VTAB-1k)"
        title = f"{name}, {first.at[vids[0], 'backbone']}, protocol {protocol}"
        summary_cols = ([*GROUPS, VTAB_AVG] if kind == "vtab" else []) + [TASK_MEAN]
        tables.append(Table(title, caption, tasks, summary_cols, rows, n_common, footnotes))
    same = {}
    for t, split in zip(tables, splits):  # tables with one title: name what differs (recipe paper, ...)
        same.setdefault(t.title, []).append((t, split))
    for group in same.values():
        if len(group) > 1:
            differ = [i for i in range(1, len(split_cols) + 1) if len({s[i] for _, s in group}) > 1]
            for t, s in group:
                t.title += "".join(f", {split_cols[i - 1].replace('_', ' ')} {s[i]}" for i in differ)
    return tables


# -- the data a cell saw, and significance against a baseline --------------------------------
def _digest_note(c) -> str | None:
    """Why a cell's runs may not have read the same data (None when they did, or none recorded it)."""
    dg = list(c.get("digests") or ())
    known = sorted({d for d in dg if d})
    seeds = list(c["seeds"])
    if len(known) > 1:
        by = {d: [s for s, x in zip(seeds, dg) if x == d] for d in known}
        return ("its runs read different copies of the task: " +
                "; ".join(f"data_digest {d[:12]} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))})"
                          for d, v in by.items()))
    if known and None in dg:
        unknown = [s for s, x in zip(seeds, dg) if x is None]
        return (f"seed{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} recorded no data_digest, "
                f"the others {known[0][:12]}: not known to have read the same data")
    return None


def _column_digest_notes(rows: list, tasks: list) -> list:
    """A footnote per task whose rows (variants) read different copies of the task."""
    notes = []
    for t in tasks:
        seen = {}
        for r in rows:
            c = r.cells.get(t)
            for d in (c.get("digests") or ()) if c is not None else ():
                if d:
                    seen.setdefault(d, []).append(r.label.text)
        if len(seen) > 1:
            notes.append(f"{DATA_MARK} {DISPLAY.get(t, t)}: the rows read different copies of the task (" +
                         "; ".join(f"data_digest {d[:12]}: {', '.join(dict.fromkeys(v))}" for d, v in seen.items())
                         + ").")
    return notes


def _baseline_row(t: Table, baseline: str) -> list:
    return [r for r in t.rows if baseline in (r.variant, r.label.text, r.method_id)]


def mark_significance(tables: list, baseline: str, level: float = 0.05) -> list:
    """Mark (with NOT_SIG_MARK) every cell whose difference from the ``baseline`` row of its table is
    not significant at ``level``, and say so in a footnote.

    ``baseline`` names a row by its variant id, its label or its method config name. The test is the
    paired one of results/paired.py on the runs' saved predictions (those of the evaluation the cell
    reports: ``selected`` for best-of accuracies, ``final`` otherwise), runs paired by seed: exact
    McNemar for one seed, the exact image-level sign test over seeds. A cell that cannot be tested
    (no predictions, no common seed, different images) is named in a footnote and not marked.
    Returns the tables (changed in place). A UserError when no table holds the baseline.
    """
    from results import paired
    if not 0 < level < 1:
        raise UserError(f"--level must lie in (0, 1), got {level}")
    found = False
    for t in tables:
        base = _baseline_row(t, baseline)
        if len(base) > 1:
            t.footnotes.append(f"{NOT_SIG_MARK} baseline '{baseline}' names {len(base)} rows of this table "
                               f"({', '.join(r.label.text for r in base)}): not tested; name one by its variant id.")
            found = True
            continue
        if not base:
            continue
        found, base = True, base[0]
        untested = []
        for r in t.rows:
            if r is base:
                continue
            for task in t.tasks:
                c, b = r.cells.get(task), base.cells.get(task)
                if c is None or b is None or math.isnan(c["mean"]) or math.isnan(b["mean"]):
                    continue
                which = "selected" if c["metric"] == "best_acc" else "final"
                ca, cb = dict(zip(c["seeds"], c["run_dirs"])), dict(zip(b["seeds"], b["run_dirs"]))
                common = sorted(set(ca) & set(cb))
                try:
                    if not common:
                        raise UserError(f"no seed in common with the baseline (seeds {sorted(ca)} vs {sorted(cb)})")
                    pairs = [((s, paired.load_predictions(ca[s], which)), (s, paired.load_predictions(cb[s], which)))
                             for s in common]
                    comp = paired.compare(pairs, task=task, level=level, n_boot=0, names=(r.label.text, baseline))
                except UserError as e:
                    untested.append(f"{r.label.text}, {DISPLAY.get(task, task)}: {e}")
                    continue
                c["p_vs_baseline"] = comp.combined["p"]
                if not comp.significant(level):
                    c["marks"] = (c.get("marks") or "") + NOT_SIG_MARK
        t.footnotes.append(f"{NOT_SIG_MARK} not significantly different from {base.label.text} at level {level:g} "
                           "(paired test on the saved per-image predictions, runs paired by seed: exact McNemar for "
                           "one seed, exact image-level sign test over seeds; results/paired.py).")
        t.footnotes += [f"{NOT_SIG_MARK} not tested: {u}" for u in untested]
    if not found:
        raise UserError(f"baseline '{baseline}' is no row of any table (name a row by its label, its method config "
                        f"name or its variant id; rows: {', '.join(r.label.text for t in tables for r in t.rows)})")
    return tables


# -- formatting -----------------------------------------------------------------------------
def fmt_cell(c, decimals: int, n_common: int, pm: str = " ± ") -> str:
    if c is None:
        return MISSING
    if math.isnan(c["mean"]):
        return "?"
    s = f"{c['mean']:.{decimals}f}"
    if c["n"] > 1 and not math.isnan(c["std"]):
        s += f"{pm}{c['std']:.{decimals}f}"
    if c["n"] != n_common:
        s += f" (n={c['n']})"
    return s + (c.get("marks") or "")


def fmt_summary(row: Row, col: str, decimals: int) -> str:
    if col not in row.summary:
        return MISSING
    v, incomplete, _ = row.summary[col]
    return f"{v:.{decimals}f}" + ("*" if incomplete else "")


def fmt_params(v: float) -> str:
    return MISSING if math.isnan(v) else f"{v:.3f}"


def _header(t: Table) -> list[str]:
    return ["Method", *(DISPLAY.get(x, x) for x in t.tasks), *(c.capitalize() if c in GROUPS else c
                                                              for c in t.summary_cols), "Params(M)"]


def to_markdown(t: Table, decimals: int = 1) -> str:
    def esc(s):
        return str(s).replace("|", "\\|")
    lines = [f"### {t.title}", "", t.caption, ""]
    head = _header(t)
    lines.append("| " + " | ".join(map(esc, head)) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in t.rows:
        cells = [r.label.text, *(fmt_cell(r.cells.get(x), decimals, t.n_common) for x in t.tasks),
                 *(fmt_summary(r, c, decimals) for c in t.summary_cols), fmt_params(r.params)]
        lines.append("| " + " | ".join(map(esc, cells)) + " |")
    if t.footnotes:
        lines.append("")
        lines += [f"- {f}" for f in t.footnotes]
    return "\n".join(lines) + "\n"


def to_latex(t: Table, decimals: int = 1) -> str:
    head = [latex_escape(h) for h in _header(t)]
    lines = ["% needs \\usepackage{booktabs}", "\\begin{table*}", "\\centering", "\\scriptsize",
             f"\\caption{{{latex_escape(t.title)}. {latex_escape(t.caption)}}}",
             "\\begin{tabular}{l" + "r" * (len(head) - 1) + "}", "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
    for r in t.rows:
        cells = [r.label.latex, *(latex_escape(fmt_cell(r.cells.get(x), decimals, t.n_common, pm=" ± "))
                                  for x in t.tasks),
                 *(latex_escape(fmt_summary(r, c, decimals)) for c in t.summary_cols), latex_escape(fmt_params(r.params))]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if t.footnotes:
        lines.append("\\\\[2pt]" + " ".join(latex_escape(f.replace("\\*", "*")) for f in t.footnotes))
    lines.append("\\end{table*}")
    return "\n".join(lines) + "\n"


def status_block(runs: pd.DataFrame, root) -> str:
    lines = [f"Runs under {root}: {status_summary(runs)}. Only finished runs are used."]
    bad = not_used(runs)
    for _, r in bad.iterrows():
        msg = f": {r['message']}" if isinstance(r["message"], str) and r["message"] else ""
        lines.append(f"- not used ({r['status']}): {r['run_dir']}{msg}")
    return "\n".join(lines) + "\n"


def write(tables: list[Table], protocol: str, out: Path, status: str, decimals: int = 1) -> list[Path]:
    """table_<protocol>.md / .csv / .tex and cells_<protocol>.csv (the selected runs)."""
    out.mkdir(parents=True, exist_ok=True)
    md = "\n".join(to_markdown(t, decimals) for t in tables) + "\n" + status
    paths = [out / f"table_{protocol}.md", out / f"table_{protocol}.csv", out / f"table_{protocol}.tex",
             out / f"cells_{protocol}.csv"]
    paths[0].write_text(md)
    pd.concat([t.frame() for t in tables], ignore_index=True).to_csv(paths[1], index=False)
    paths[2].write_text("\n".join(to_latex(t, decimals) for t in tables))
    pd.concat([t.cells() for t in tables], ignore_index=True).to_csv(paths[3], index=False)
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="VTAB-1k tables from run directories (see results/tables.py).")
    ap.add_argument("--runs", type=Path, default=Path("outputs/runs"), help="folder of run directories")
    ap.add_argument("--protocol", choices=PROTOCOLS, default=None,
                    help="default: paper and final (whichever have runs); search only when asked")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <runs>/../tables)")
    ap.add_argument("--search", default="", help="extra searched keys, comma-separated (e.g. method.ne,method.scale)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=V1,V2",
                    help="only runs whose identity has one of these values (repeatable), e.g. method.ne.in_proj=3,6")
    ap.add_argument("--decimals", type=int, default=1)
    ap.add_argument("--baseline", default=None, metavar="ROW",
                    help="mark (with a dagger) cells not significantly different from this row (its label, method "
                         "config name or variant id), by a paired test on the runs' saved predictions")
    ap.add_argument("--level", type=float, default=0.05, help="significance level for --baseline")
    args = ap.parse_args(argv)
    if not args.runs.is_dir():
        sys.exit(f"error: {args.runs} is not a folder (pass --runs <output_dir>/runs)")
    try:
        runs = where(load_runs(args.runs), args.where)
    except ValueError as e:
        sys.exit(f"error: {e}")
    status = status_block(runs, args.runs)
    if not (runs["status"] == "finished").any():
        sys.exit(f"error: no finished run under {args.runs}.\n{status}")
    protocols = [args.protocol] if args.protocol else [p for p in ("paper", "final")
                                                       if ((runs["status"] == "finished") & (runs["protocol"] == p)).any()]
    out = args.out or args.runs.parent / "tables"
    search = [s.strip() for s in args.search.split(",") if s.strip()]
    result = {}
    for p in protocols:
        tables = build_tables(runs, p, search)
        if not tables:
            print(f"no finished run of protocol {p} under {args.runs}")
            continue
        if args.baseline:
            try:
                mark_significance(tables, args.baseline, args.level)
            except UserError as e:
                sys.exit(f"error: {e}")
        paths = write(tables, p, out, status, args.decimals)
        print("\n".join(to_markdown(t, args.decimals) for t in tables))
        print(f"wrote {', '.join(map(str, paths))}\n")
        result[p] = tables
    if not result:
        sys.exit(f"error: no finished run of protocol {', '.join(protocols) or 'paper/final'} under {args.runs} "
                 f"(stage-1 tables: --protocol search)")
    print(status)
    return result
