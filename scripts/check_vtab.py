"""Check a VTAB-1K folder copy: lists, sizes, labels, images, duplicates; optionally compare two copies.

    python scripts/check_vtab.py ROOT [--tasks TASK ...] [--compare OTHER_ROOT] [--workers N]
        [--manifest-dir DIR] [--no-manifest] [--no-progress]

One table row per task, then every problem named (errors apart from warnings). Writes or
refreshes each task's content manifest (per-image sha256 and the task digest). Exit code: 0
when no task has an error, 1 when one has, 2 on a usage problem (no such root or task).
Differences found by --compare are reported, not counted as errors of ROOT. Logic: data/doctor.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any cwd

from common.errors import UserError  # noqa: E402
from data.doctor import default_workers, format_result, run_doctor  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the folder that holds the task folders")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="tasks to check (default: every task folder under ROOT)")
    p.add_argument("--compare", metavar="OTHER_ROOT",
                   help="a second copy: compare its lists, labels and decoded pixels with ROOT's")
    p.add_argument("--workers", type=int, default=None,
                   help=f"decoding processes (default: the cores available, {default_workers()}; 0: none)")
    p.add_argument("--manifest-dir", help="where to write a manifest when a task folder is not writable "
                   "(default: $LILY_CACHE/manifests)")
    p.add_argument("--no-manifest", action="store_true", help="check only; write no manifest")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    try:
        res = run_doctor(args.root, args.tasks, compare=args.compare, workers=args.workers,
                         progress=not args.no_progress, write=not args.no_manifest,
                         manifest_dir=args.manifest_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(res, args.root, args.compare))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
