"""Load run directories and group them into variants and grid points.

A run directory (engine/run.py) holds ``results.json`` with ``status``, ``identity`` (the
result-relevant resolved config, nested) and ``searched`` (the dotted keys its multirun
swept as hyper-parameters). Here:

- a run's *grid point* is the part of its identity under the searched keys (the union of
  ``searched`` over the runs considered, plus keys named by the caller);
- its *variant* is everything else in its identity except ``seed`` and ``task``: two runs
  of one variant differ only in task, seed and searched values. Variants are never merged;
- its *family* is the variant without ``protocol.*``: the search-stage and final-stage runs
  of one clean-protocol experiment share a family.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import pandas as pd

from data.registry import TASKS
from engine.run import FINISHED, STATUSES, RunDir, find_run_dirs

# Top-level fields of results.json copied into the table (the rest stays in the file).
FIELDS = ("status", "message", "run_id", "method_id", "task", "group", "backbone", "seed", "protocol", "recipe",
          "precision", "normalization", "epochs", "final_acc", "best_acc", "best_epoch", "train_split",
          "eval_split", "trainable_params", "head_params", "data_digest")
PER_TASK = "<per task: ${by_task:...}>"   # the variant value of a key chosen by a method's per-task table
NOT_VARIANT = ("seed", "task")  # identity keys that never define a variant (the repeats, the columns)


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"method": {"rank": {"k": 16}}} -> {"method.rank.k": 16}``; lists become tuples."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = _hashable(v)
    return out


def under(key: str, prefixes: Iterable[str]) -> bool:
    """True when ``key`` is one of ``prefixes`` or lies below one (``method.ne.in_proj`` under ``method.ne``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def short_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def load_runs(root: str | Path, run_dirs: Iterable[str | Path] | None = None) -> pd.DataFrame:
    """One row per run directory (its results.json, read through engine.run.RunDir) under ``root``
    (or in ``run_dirs`` only), every status.

    Columns: ``run_dir``, the top-level fields (FIELDS), ``searched`` (tuple), ``eval_every``,
    ``identity`` (nested dict) and ``flat`` (dotted keys). A results.json without an
    ``identity`` (written before run identities existed) gets status ``no-identity``.
    """
    if run_dirs is not None:
        dirs = sorted({Path(d).resolve() for d in run_dirs if RunDir(d).results_path.is_file()})
    else:
        dirs = find_run_dirs(root)
    rows, seen = [], set()
    for d in dirs:
        try:
            r = RunDir(d).read_results()
        except (OSError, ValueError) as e:
            rows.append({"run_dir": str(d), "status": "unreadable", "message": str(e)})
            continue
        ident = r.get("identity")
        row = {k: r.get(k) for k in FIELDS}
        row["run_dir"] = str(d)
        if not isinstance(ident, dict):
            row.update(status="no-identity", message=f"{RunDir(d).results_path.name} has no identity (older format): not used")
            rows.append(row)
            continue
        if row["run_id"] in seen and row["status"] == FINISHED:  # a copied run directory: count it once
            row.update(status="duplicate", message=f"same run_id as another run directory ({row['run_id']})")
        elif row["status"] == FINISHED:
            seen.add(row["run_id"])
        row["group"] = row["group"] or (TASKS[row["task"]].group if row["task"] in TASKS else "other")
        row["searched"] = tuple(r.get("searched") or ())
        row["per_task"] = tuple(r.get("per_task") or ())
        row["eval_every"] = ident.get("eval_every")
        row["identity"] = ident
        row["flat"] = flatten(ident)
        rows.append(row)
    df = pd.DataFrame(rows, columns=["run_dir", *FIELDS, "searched", "per_task", "eval_every", "identity", "flat"])
    df["status"] = df["status"].fillna("unknown")
    return df


def status_summary(df: pd.DataFrame) -> str:
    """'12 finished, 1 failed (not used), ...' over every run loaded."""
    counts = df["status"].value_counts()
    parts = [f"{counts[s]} {s}" for s in [*STATUSES, *sorted(set(counts.index) - set(STATUSES))] if s in counts]
    return ", ".join(parts) if parts else "no run"


def not_used(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that never enter a table: every status but ``finished``."""
    return df[df["status"] != FINISHED][["run_dir", "status", "message"]]


def searched_keys(df: pd.DataFrame, extra: Iterable[str] = ()) -> tuple[str, ...]:
    keys = {k for s in df["searched"] for k in (s or ())} | {k for k in extra if k}
    return tuple(sorted(keys))


def assign_variants(df: pd.DataFrame, searched: Iterable[str]) -> tuple[pd.DataFrame, dict]:
    """Add ``variant``, ``family`` and ``grid`` columns; return (df, {variant: info}).

    ``grid`` is a tuple of (key, value) for the identity keys under a searched key;
    ``info`` holds ``items`` (the variant's flat identity), ``identity`` (one run's nested
    identity), ``grids`` (the set of grid points seen) and ``searched``.
    """
    searched = tuple(searched)
    df = df.copy()
    variants, fam, grids, info = [], [], [], {}
    per_task_runs = df["per_task"] if "per_task" in df else [()] * len(df)
    for flat, ident, per_task in zip(df["flat"], df["identity"], per_task_runs):
        # a value the run took from its method's per-task table (${by_task:...}) is one variant
        # across tasks; the same key set by hand is that value, a variant of its own
        items = {k: (PER_TASK if under(k, per_task or ()) else v) for k, v in flat.items()
                 if not under(k, NOT_VARIANT) and not under(k, searched)}
        grid = tuple(sorted((k, v) for k, v in flat.items() if under(k, searched) and not under(k, NOT_VARIANT)))
        vid = short_hash(sorted(items.items()))
        variants.append(vid)
        fam.append(short_hash(sorted((k, v) for k, v in items.items() if not under(k, ("protocol",)))))
        grids.append(grid)
        v = info.setdefault(vid, {"items": items, "identity": ident, "grids": set(), "searched": searched})
        v["grids"].add(grid)
    df["variant"], df["family"], df["grid"] = variants, fam, grids
    return df, info


def _same(value, wanted: str) -> bool:
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return str(value) == wanted


def where(df: pd.DataFrame, conditions: Iterable[str]) -> pd.DataFrame:
    """Keep the runs whose identity matches every ``key=v1,v2`` (dotted key, any listed value).

    E.g. ``method.ne.in_proj=3,6`` (one search space of several that share runs) or
    ``optim.epochs=30``. Runs without an identity are kept (they are never used anyway).
    """
    for cond in conditions:
        key, sep, values = cond.partition("=")
        if not sep or not key:
            raise ValueError(f"--where expects key=value[,value...], got '{cond}'")
        wanted = values.split(",")
        keep = [not isinstance(flat, dict) or any(_same(flat.get(key.strip()), w.strip()) for w in wanted)
                for flat in df["flat"]]
        df = df[keep]
    return df
