"""Collect run directories into the paper's VTAB-1k tables.

    python scripts/collect_results.py [--runs outputs/runs] [--protocol paper|clean] [--out results/]

Per (backbone, method, task) the hyper-parameter configuration (e.g. N_e x s) is chosen as
the protocol prescribes:
- paper: the configuration with the highest ``best_acc`` (the best test accuracy seen
  during training: what the authors report; it selects on the test set);
- clean: the configuration with the highest ``val_acc`` (val200 after training on
  train800); its ``final_acc`` (retrained on train800val200, last epoch) is reported.
Averages: per group, "VTAB avg" = mean of the three group means (PETL papers), and the
plain mean over the 19 tasks. Params(M) is the mean over the chosen configurations,
head excluded (as the paper's Lily rows).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.registry import GROUPS, TASKS, VTAB_TASKS  # noqa: E402


def load_runs(runs: Path) -> pd.DataFrame:
    rows = []
    for f in sorted(runs.rglob("results.json")):
        r = json.loads(f.read_text())
        if r.get("finished"):
            rows.append({**{k: v for k, v in r.items() if not isinstance(v, (list, dict))},
                         "config": str(f.parent.relative_to(runs))})
    return pd.DataFrame(rows)


def select(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One row per (backbone, method, task): the configuration the protocol selects."""
    df = df[df.protocol == protocol]
    if df.empty:
        return df
    key, score = ("best_acc", "best_acc") if protocol == "paper" else ("val_acc", "final_acc")
    chosen = df.loc[df.groupby(["backbone", "method", "task"])[key].idxmax()].copy()
    chosen["acc"] = chosen[score]
    return chosen


def table(chosen: pd.DataFrame) -> pd.DataFrame:
    """Rows (backbone, method); columns: the tasks present, group means, averages, Params(M)."""
    acc = chosen.pivot_table(index=["backbone", "method"], columns="task", values="acc")
    tasks = [t for t in VTAB_TASKS if t in acc.columns] + [t for t in acc.columns if t not in VTAB_TASKS]
    out = acc[tasks].copy()
    groups = []
    for g in GROUPS:
        cols = [t for t in tasks if TASKS.get(t) and TASKS[t].group == g]
        if cols:
            out[g] = acc[cols].mean(axis=1)
            groups.append(g)
    if groups:
        out["VTAB avg (mean of group means)"] = out[groups].mean(axis=1)
    out["mean over tasks"] = acc[tasks].mean(axis=1)
    out["n_tasks"] = acc[tasks].notna().sum(axis=1)
    out["Params(M)"] = chosen.pivot_table(index=["backbone", "method"], values="trainable_params")["trainable_params"] / 1e6
    return out.round(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("outputs/runs"))
    ap.add_argument("--protocol", choices=["paper", "clean"], default="paper")
    ap.add_argument("--out", type=Path, default=None, help="folder for table.csv, table.md and chosen.csv")
    args = ap.parse_args(argv)
    df = load_runs(args.runs)
    if df.empty:
        sys.exit(f"error: no finished run (results.json) under {args.runs}")
    chosen = select(df, args.protocol)
    if chosen.empty:
        sys.exit(f"error: no finished run with protocol={args.protocol} under {args.runs}")
    t = table(chosen)
    title = (f"VTAB-1k, protocol={args.protocol} "
             f"({'best test accuracy over evaluations, selected on test' if args.protocol == 'paper' else 'selected on val200, final test accuracy'})")
    print(title)
    print(t.to_markdown() if _has_tabulate() else t.to_string())
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        t.to_csv(args.out / f"table_{args.protocol}.csv")
        chosen.to_csv(args.out / f"chosen_{args.protocol}.csv", index=False)
        print(f"wrote {args.out}/table_{args.protocol}.csv and chosen_{args.protocol}.csv")
    return t


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
