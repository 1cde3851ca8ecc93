"""The paper's figures from run directories.

    python scripts/plot_results.py ne      [--runs outputs/runs] [--protocol paper] [--out figures/]
        Figure 3: accuracy vs N_e per task and placement (best s per N_e, as the protocol selects).
    python scripts/plot_results.py experts [--runs outputs/runs] [--layers 2 13 22] [--kind in_proj]
        Figure 4: each chosen layer's expert weights at the last evaluation, one panel per task.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.collect_results import load_runs  # noqa: E402


def plot_ne(args) -> Path:
    df = load_runs(args.runs)
    df = df[(df.protocol == args.protocol) & df.config.str.contains("method.ne=")]
    if df.empty:
        sys.exit(f"error: no finished runs with a method.ne override and protocol={args.protocol} under {args.runs}")
    df["ne"] = df.config.str.extract(r"method\.ne=(\d+)").astype(int)
    key, score = ("best_acc", "best_acc") if args.protocol == "paper" else ("val_acc", "final_acc")
    best = df.loc[df.groupby(["task", "method", "ne"])[key].idxmax()]
    tasks = sorted(best.task.unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, g in best[best.task == task].groupby("method"):
            g = g.sort_values("ne")
            ax.plot(g.ne, g[score], marker="o", label=method)
        ax.set(title=task, xlabel="$N_e$", ylabel=f"{score} (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = args.out / f"fig3_ne_{args.protocol}.png"
    fig.savefig(path, dpi=150)
    return path


def plot_experts(args) -> Path:
    rows = []
    for f in sorted(args.runs.rglob("experts.json")):
        res = json.loads((f.parent / "results.json").read_text()) if (f.parent / "results.json").exists() else {}
        evals = json.loads(f.read_text())
        if evals and args.kind in evals[-1]["weights"]:
            rows.append((res.get("task", f.parent.name), evals[-1]["weights"][args.kind]))
    if not rows:
        sys.exit(f"error: no experts.json with kind '{args.kind}' under {args.runs}")
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3), squeeze=False)
    for ax, (task, weights) in zip(axes[0], rows):
        w = pd.DataFrame(weights).iloc[[i for i in args.layers if i < len(weights)]]
        w.index = [f"layer {i}" for i in w.index]
        w.columns = [f"HP{e + 1}" for e in w.columns]
        w.plot.bar(ax=ax, rot=0, legend=ax is axes[0][0])
        ax.set(title=task, ylabel="expert weight")
    fig.tight_layout()
    path = args.out / f"fig4_experts_{args.kind}.png"
    fig.savefig(path, dpi=150)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("figure", choices=["ne", "experts"])
    ap.add_argument("--runs", type=Path, default=Path("outputs/runs"))
    ap.add_argument("--protocol", choices=["paper", "clean"], default="paper")
    ap.add_argument("--kind", default="in_proj", help="target kind for the experts figure (q, v, ffn, in_proj, ...)")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 13, 22])
    ap.add_argument("--out", type=Path, default=Path("figures"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = plot_ne(args) if args.figure == "ne" else plot_experts(args)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
