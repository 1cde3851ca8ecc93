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


if __name__ == "__main__":
    sys.argv[1:] = _quote_run_dir(sys.argv[1:])
    main()
