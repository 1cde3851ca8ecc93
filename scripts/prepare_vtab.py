"""Build VTAB-1k in the folder format from TensorFlow Datasets (needs requirements-data.txt).

    python scripts/prepare_vtab.py --root data/vtab-1k [--tasks dtd kitti ...] \
        [--manual-dir DIR] [--format jpg|png] [--data-dir TFDS_DIR]

Finished tasks (manifest.json present) are skipped; the exit code is non-zero if any task failed.
All logic lives in data/vtab_tfds.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any cwd

from data.registry import VTAB_TASKS  # noqa: E402
from data.vtab_tfds import FORMATS, build_all  # noqa: E402
from common.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="output folder; one sub-folder per task")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"tasks to build (default: all 19): {' '.join(VTAB_TASKS)}")
    p.add_argument("--manual-dir", help="folder with the manual downloads of resisc45 and "
                   "diabetic_retinopathy (default: <data-dir>/downloads/manual)")
    p.add_argument("--format", default="jpg", choices=FORMATS,
                   help="jpg (PIL default quality, as the published archive) or png (lossless)")
    p.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)  # cap per split, for tests/smoke runs
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        results = build_all(args.root, args.tasks, manual_dir=args.manual_dir, image_format=args.format,
                            data_dir=args.data_dir, limit=args.limit, progress=not args.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = {t: r for t, r in results.items() if r.startswith("FAILED")}
    counts = {s: sum(r == s for r in results.values()) for s in ("built", "skipped")}
    print(f"\nsummary: {counts['built']} built, {counts['skipped']} skipped (already built), "
          f"{len(failed)} failed, under {args.root}")
    for task, reason in failed.items():  # the full messages were printed as each task ended
        print(f"  {task}: {reason.splitlines()[0]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
