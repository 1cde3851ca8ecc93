"""Evaluate a run directory:  python eval.py <run_dir> [split=test] [merge=true]
(or run_dir=<run_dir>; run directories contain '=' and ',', which are quoted for Hydra here)."""
import os
import sys

import hydra
from omegaconf import DictConfig

from engine.cli import run_cli


def _quote_run_dir(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        value = a[len("run_dir="):] if a.startswith("run_dir=") else (a if os.path.isdir(a) else None)
        if value is not None and not value.startswith(("'", '"')):
            a = "run_dir='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(a)
    return out


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig):
    from engine.evaluate import evaluate_run
    return run_cli(evaluate_run, cfg)["acc"]


USAGE = ("usage: python eval.py <run_dir> [split=test|val200|...] [merge=true] [device=...] [precision=fp32|bf16] "
         "[require_finished=true]")


def _check_run_dir(argv: list[str]) -> None:
    """A missing or absent run directory is a clear message, not a Hydra grammar error."""
    given = [a[len("run_dir="):] for a in argv if a.startswith("run_dir=")]
    given += [a for a in argv if not a.startswith("-") and "=" not in a]
    if not given:
        sys.exit(f"error: no run directory given.\n{USAGE}\n(run directories are under outputs/runs/<task>/<backbone>/<method>/)")
    from common.errors import UserError
    from engine.run import RunDir, check_output_dir
    for d in given:
        d = d.strip("'\"")
        if not os.path.isdir(d):
            sys.exit(f"error: run directory '{d}' not found.\n{USAGE}")
        try:
            check_output_dir(d)  # eval.py writes its results next to the checkpoint
        except UserError as e:
            sys.exit(f"error: {e}")
        if not RunDir(d).has_checkpoint():
            sys.exit(f"error: '{d}' holds no checkpoint: not a run directory written by train.py (or it never "
                     f"finished an epoch).\n{USAGE}")


if __name__ == "__main__":
    if not any(a in ("-h", "--help", "--cfg", "-c", "--info") for a in sys.argv[1:]):
        _check_run_dir(sys.argv[1:])
    sys.argv[1:] = _quote_run_dir(sys.argv[1:])
    main()
