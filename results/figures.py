"""The paper's Figures 3 and 4 from run directories (matplotlib, Agg).

    python scripts/plot_results.py fig3 [--runs outputs/runs] [--protocol paper] [--ne-key method.ne]
                                        [--tasks svhn,patch_camelyon,dmlab,dsprites_loc] [--methods lily_qv,...]
    python scripts/plot_results.py fig4 [--runs outputs/runs] [--protocol paper] [--method lily_vim | --variant LABEL]
                                        [--tasks ...] [--layers 2 13 22] [--kind in_proj] [--where optim.epochs=30]

Figure 3: accuracy vs N_e, one panel per task, one line per variant (the Lily placements);
at each N_e the protocol's selection over the other searched keys (e.g. the best mean over
seeds of s, results/tables.py), shaded +- one sample std over seeds.
Figure 4: for each task, the expert weights of chosen layers in the run the table selected
for that task (the lowest seed of the selected grid point), from the last entry of its
experts.json; one bar group per layer, one bar per HP expert. Default layers: the paper's
2, 13, 22 of Vim-S' 24 scaled to the backbone's depth (shallow, middle, deep).
Both functions return the matplotlib Figure.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from data.registry import VTAB_TASKS  # noqa: E402
from engine.run import RunDir  # noqa: E402
from results.labels import method_label, unique_labels  # noqa: E402
from results.runs import load_runs, where  # noqa: E402
from results.tables import DISPLAY, PROTOCOLS, prepare, select  # noqa: E402

PAPER_LAYERS, PAPER_DEPTH = (2, 13, 22), 24   # Figure 4 of the paper (Vim-S)
KIND_PREFERENCE = ("in_proj", "ffn", "v", "k", "q")
YLABEL = {"paper": "best-of-test accuracy (%)", "search": "val200 accuracy (%)", "final": "test accuracy (%)"}


def _task_order(tasks) -> list:
    tasks = set(tasks)
    return [t for t in VTAB_TASKS if t in tasks] + sorted(tasks - set(VTAB_TASKS))


def _labels(df: pd.DataFrame, info: dict, vids) -> dict:
    first = df.groupby("variant")["method_id"].first()
    return unique_labels({v: method_label(info[v]["identity"], info[v]["grids"], first[v]) for v in vids},
                         {v: info[v]["items"] for v in vids})


def _filter(df: pd.DataFrame, tasks=None, methods=None, backbone=None) -> pd.DataFrame:
    if tasks:
        df = df[df["task"].isin(tasks)]
    if methods:
        df = df[df["method_id"].isin(methods)]
    if backbone:
        df = df[df["backbone"] == backbone]
    return df


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def fig3(runs: pd.DataFrame, protocol: str = "paper", ne_key: str = "method.ne", search=(), tasks=None,
         methods=None, backbone=None):
    """Accuracy vs N_e: one panel per task, one line per variant whose runs searched ``ne_key``."""
    df, info, stage1 = prepare(runs, protocol, [ne_key, *search])
    df = _filter(df, tasks, methods, backbone)
    sel = select(df, protocol, keep=(ne_key,), stage1=stage1) if not df.empty else pd.DataFrame()
    if sel.empty or not sel[ne_key].map(_numeric).any():
        raise ValueError(f"no finished {protocol} run with a numeric {ne_key} (for Vim: --ne-key method.ne.in_proj)")
    sel = sel[sel[ne_key].map(_numeric) & sel["mean"].notna()]
    vids = list(dict.fromkeys(sel["variant"]))
    labels = _labels(df, info, vids)
    vids.sort(key=lambda v: labels[v].sort_key())
    order = _task_order(sel["task"])
    fig, axes = plt.subplots(1, len(order), figsize=(3.8 * len(order), 3.4), squeeze=False)
    for ax, task in zip(axes[0], order):
        for v in vids:
            pts = sel[(sel["variant"] == v) & (sel["task"] == task)].sort_values(ne_key)
            if pts.empty:
                continue
            x, y = pts[ne_key].astype(float), pts["mean"].astype(float)
            (line,) = ax.plot(x, y, marker="o", label=labels[v].text)
            std = pts["std"].astype(float).fillna(0.0)
            if (std > 0).any():
                ax.fill_between(x, y - std, y + std, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xticks(sorted(sel[sel["task"] == task][ne_key].astype(float).unique()))
        ax.set(title=DISPLAY.get(task, task), xlabel="$N_e$", ylabel=YLABEL[protocol])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    others = [k for k in sorted({k for v in vids for g in info[v]["grids"] for k, _ in g}) if k != ne_key]
    how = {"paper": "highest mean best-of-test", "search": "highest mean val200", "final": "stage-1 choice"}[protocol]
    fig.suptitle(f"Accuracy vs $N_e$ (protocol {protocol}"
                 + (f"; at each $N_e$ the {how} over {', '.join(others)}" if others else "") + ")", fontsize=9)
    fig.tight_layout()
    return fig


def default_layers(depth: int) -> list[int]:
    """The paper's layers 2, 13, 22 of 24 scaled to ``depth`` (12 -> 1, 7, 11)."""
    return sorted({min(depth - 1, int(x * depth / PAPER_DEPTH + 0.5)) for x in PAPER_LAYERS})


def _kind(weights: dict, kind: str | None) -> str:
    if kind:
        if kind not in weights:
            raise ValueError(f"kind '{kind}' not in the run's expert weights (has: {', '.join(weights)})")
        return kind
    for k in KIND_PREFERENCE:
        if k in weights:
            return k
    return sorted(weights)[0]


def fig4(runs: pd.DataFrame, protocol: str = "paper", tasks=None, method=None, variant=None, backbone=None,
         layers=None, kind=None, search=()):
    """Expert weights per chosen layer in each task's selected run: one panel per task."""
    df, info, stage1 = prepare(runs, protocol, search)
    df = _filter(df, tasks, [method] if method else None, backbone)
    if df.empty:
        raise ValueError(f"no finished {protocol} run" + (f" of method {method}" if method else ""))
    sel = select(df, protocol, stage1=stage1)
    sel = sel[[any(RunDir(d).experts_path.is_file() for d in dirs) for dirs in sel["run_dirs"]]]
    if sel.empty:
        raise ValueError("no selected run has expert weights (a finished Lily run writes them)")
    vids = list(dict.fromkeys(sel["variant"]))
    labels = _labels(df, info, vids)
    if variant:
        vids = [v for v in vids if labels[v].text == variant]
        if not vids:
            raise ValueError(f"no variant labelled '{variant}' (have: {'; '.join(sorted(labels[v].text for v in labels))})")
    if len(vids) > 1:
        raise ValueError("several variants have expert weights; pick one with --variant "
                         f"({'; '.join(sorted(labels[v].text for v in vids))}) or --method")
    vid = vids[0]
    sel = sel[sel["variant"] == vid].set_index("task")
    order = _task_order(sel.index)
    ncols = min(len(order), 4)
    nrows = math.ceil(len(order) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[len(order):]:
        fig.delaxes(ax)
    used_kind = None
    for ax, task in zip(flat, order):
        run_dir = next(RunDir(d) for d in sel.at[task, "run_dirs"] if RunDir(d).experts_path.is_file())
        entry = run_dir.experts()[-1]
        used_kind = _kind(entry["weights"], kind)
        w = entry["weights"][used_kind]               # [layer][expert]
        chosen = [layer for layer in (layers or default_layers(len(w))) if layer < len(w)]
        n_exp = len(w[0]) if w else 0
        width = 0.8 / max(n_exp, 1)
        for e in range(n_exp):
            ax.bar([i + (e - (n_exp - 1) / 2) * width for i in range(len(chosen))], [w[layer][e] for layer in chosen],
                   width=width, label=f"expert {e + 1}")
        ax.set_xticks(range(len(chosen)), [f"layer {layer}" for layer in chosen])
        ax.set(title=f"{DISPLAY.get(task, task)} (epoch {entry.get('epoch')})", ylabel="expert weight")
    handles, names = max((ax.get_legend_handles_labels() for ax in flat[:len(order)]), key=lambda h: len(h[0]))
    fig.legend(handles, names, loc="center right", fontsize=7)
    fig.suptitle(f"{labels[vid].text}: expert weights of '{used_kind}' (protocol {protocol}; selected run per task)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description="The paper's Figures 3 and 4 (see results/figures.py).")
    ap.add_argument("figure", choices=["fig3", "fig4", "ne", "experts"], help="fig3 (alias ne) or fig4 (alias experts)")
    ap.add_argument("--runs", type=Path, default=Path("outputs/runs"))
    ap.add_argument("--protocol", choices=PROTOCOLS, default="paper")
    ap.add_argument("--tasks", default="", help="comma-separated (default: every task with runs)")
    ap.add_argument("--search", default="", help="extra searched keys, comma-separated")
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--ne-key", default="method.ne", help="fig3: the N_e key (Vim: method.ne.in_proj)")
    ap.add_argument("--methods", default="", help="fig3: method config names, comma-separated")
    ap.add_argument("--method", default=None, help="fig4: the method config name (e.g. lily_vim)")
    ap.add_argument("--variant", default=None, help="fig4: a row label of the table, e.g. 'Lily_5^{4,8}'")
    ap.add_argument("--kind", default=None, help="fig4: target kind (in_proj, ffn, k, v, q, k.lp, ...)")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="fig4: layer indices (default: spread)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=V1,V2",
                    help="only runs whose identity has one of these values (repeatable), e.g. optim.epochs=30")
    ap.add_argument("--out", type=Path, default=Path("figures"))
    args = ap.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    if not args.runs.is_dir():
        sys.exit(f"error: {args.runs} is not a folder (pass --runs <output_dir>/runs)")
    try:
        runs = where(load_runs(args.runs), args.where)
        if args.figure in ("fig3", "ne"):
            fig = fig3(runs, args.protocol, args.ne_key, split(args.search), split(args.tasks), split(args.methods),
                       args.backbone)
            name = f"fig3_ne_{args.protocol}.png"
        else:
            fig = fig4(runs, args.protocol, split(args.tasks), args.method, args.variant, args.backbone, args.layers,
                       args.kind, split(args.search))
            name = f"fig4_experts_{args.protocol}.png"
    except ValueError as e:
        sys.exit(f"error: {e} (runs under {args.runs})")
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / name, dpi=150)
    print(f"wrote {args.out / name}")
    return fig
