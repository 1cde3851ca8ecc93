"""Paired comparison of two runs, or of two table cells over their seeds (tests: results/paired.py).

    python scripts/compare_runs.py RUN_DIR_A RUN_DIR_B [--which final|selected]
    python scripts/compare_runs.py --root outputs/runs --a method=lily_qvffn_tiny --b method=linear \
                                   [--task digits] [--which final] [--level 0.05] [--bootstrap 10000]

Per task: the accuracy difference (mean over the paired seeds), McNemar's exact test per
seed and the image-level sign test combined over seeds, a paired bootstrap interval of
the difference over test images, and how the two methods' errors agree. Filters are
``KEY=V1,V2``: a results.json field (``method`` = the method config's name, ``backbone``,
``protocol``, ``recipe``, ``seed``, ...) or a dotted identity key (``method.ne=4``).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cli import run_cli  # noqa: E402


def main(argv=None):
    import pandas as pd

    from common.errors import UserError
    from results import paired
    from results.runs import load_runs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("runs", nargs="*", type=Path, help="two run directories A and B")
    ap.add_argument("--root", type=Path, help="a folder of run directories (with --a and --b)")
    ap.add_argument("--a", nargs="+", default=[], metavar="KEY=VALUE", help="filters naming cell A")
    ap.add_argument("--b", nargs="+", default=[], metavar="KEY=VALUE", help="filters naming cell B")
    ap.add_argument("--task", default=None, help="only this task (default: every task both cells have)")
    ap.add_argument("--which", choices=paired.WHICH, default="final",
                    help="final: the last evaluation; selected: the evaluation the protocol reports")
    ap.add_argument("--level", type=float, default=0.05, help="significance level (and 1 - CI coverage)")
    ap.add_argument("--bootstrap", type=int, default=10000, help="bootstrap replicates")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap generator seed")
    ap.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)

    notes = []
    if args.root is not None:
        if args.runs:
            raise UserError("give either two run directories or --root with --a/--b, not both")
        if not args.root.is_dir():
            raise UserError(f"--root {args.root} is not a folder")
        runs = load_runs(args.root)
        df_a = paired.select_runs(runs, args.a, args.task, "A")
        df_b = paired.select_runs(runs, args.b, args.task, "B")
        pairs, notes = paired.pair_runs(df_a, df_b)
        label_a, label_b = " ".join(args.a), " ".join(args.b)
    else:
        if len(args.runs) != 2:
            raise UserError("give two run directories A B (or --root with --a and --b)")
        for d in args.runs:
            if not d.is_dir():
                raise UserError(f"{d} is not a run directory")
        runs = load_runs(None, run_dirs=args.runs)
        info = {str(Path(r).resolve()): (t, s) for r, t, s in zip(runs["run_dir"], runs["task"], runs["seed"])}
        (ta, sa), (tb, sb) = (info.get(str(d.resolve()), ("?", "?")) for d in args.runs)
        if ta != tb:
            notes.append(f"A is a run of task {ta} and B of task {tb}")
        pairs = {ta if ta == tb else f"{ta}/{tb}": [((sa, args.runs[0]), (sb, args.runs[1]))]}
        label_a, label_b = str(args.runs[0]), str(args.runs[1])
    if not pairs:
        raise UserError("nothing to compare: " + "; ".join(notes))
    comps = paired.compare_tasks(pairs, which=args.which, level=args.level, n_boot=args.bootstrap, seed=args.seed,
                                 runs=runs)
    table = paired.report(comps, args.level)
    print(f"A: {label_a}\nB: {label_b}\npredictions: {args.which}; McNemar exact (binomial on the discordant "
          f"images), chi2 with continuity correction beside it; combined over seeds: exact sign test over images "
          f"(d_i = seeds A right - seeds B right); {100 * (1 - args.level):g}% paired bootstrap percentile "
          f"interval over test images ({args.bootstrap} replicates, seed {args.seed}); accuracies in percent.\n")
    print(paired.to_markdown(table))
    for n in notes:
        print(f"- {n}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return pd.DataFrame(table), comps


if __name__ == "__main__":
    run_cli(main)
