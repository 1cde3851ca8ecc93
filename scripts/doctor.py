"""Environment self-check: what a run on this machine would use, and whether it works.

    python scripts/doctor.py [train.py overrides ...] [--steps vit_tiny,vim_s] [--batch 2]
                             [--no-kernels] [--no-data] [--no-steps]

Prints versions (python, torch, CUDA, timm, mamba-ssm, causal-conv1d), the device, the
precision and TF32 settings a run with these overrides would use, which kernel path Vim
takes, a numeric check of the selective scan and causal conv1d (the PyTorch path against
the sequential reference; the compiled kernels against the PyTorch path where they are
installed and a GPU is present), one timed training step per backbone, the data doctor on
the configured task folder and whether the configured weights exist. On a CPU machine the
CPU parts run and each skipped part says why. Exit status 1 when a check failed.
Logic: engine/selfcheck.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cli import run_cli  # noqa: E402


def main(argv=None) -> int:
    from engine import selfcheck

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("overrides", nargs="*", help="train.py-style overrides (task=dtd backbone=vim_s ...)")
    ap.add_argument("--steps", default=None,
                    help="backbones to time one training step of (comma-separated; default: the configured one, "
                         + " and ".join(selfcheck.STEP_BACKBONES) + ")")
    ap.add_argument("--batch", type=int, default=2, help="batch size of the timed step")
    ap.add_argument("--no-steps", action="store_true", help="skip the timed training steps")
    ap.add_argument("--no-kernels", action="store_true", help="skip the numeric kernel comparison")
    ap.add_argument("--no-data", action="store_true", help="skip the data doctor")
    args = ap.parse_args(argv)
    steps = [] if args.no_steps else (None if args.steps is None else
                                      [s.strip() for s in args.steps.split(",") if s.strip()])
    section = [None]

    def echo(c):
        if c.section != section[0]:
            section[0] = c.section
            print(f"{c.section}:", flush=True)
        print(selfcheck.format_check(c), flush=True)

    rows = selfcheck.run_selfcheck(args.overrides, step_backbones=steps, step_batch=args.batch,
                                   kernels=not args.no_kernels, data=not args.no_data, echo=echo)
    print("\n" + selfcheck.summary(rows))
    return 1 if any(c.status == "FAIL" for c in rows) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
