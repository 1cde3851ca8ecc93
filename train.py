"""Train one configuration: python train.py task=dtd method=lily_kvffn (see README).

Sweeps: python train.py -m sweep=ne_scale task=dtd method=lily_kvffn [hydra/launcher=...].
A job's run directory is a function of its configuration (engine/run.py): re-running a
command skips finished runs and resumes interrupted ones.
"""
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from engine.cli import record_swept_keys, run_cli


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    from engine.job import run_job
    from engine.sweep import configure_threads, preemption_requested
    configure_threads(cfg)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    searched = [k for k in hc.sweeper.get("params", None) or {}]
    if multirun:  # the command line's swept keys (engine.cli.record_swept_keys)
        searched += os.environ.get("LILY_SWEPT_KEYS", "").split(",")
    searched = sorted({k for k in searched if k and k not in ("task", "method", "backbone", "seed", "experiment",
                                                             "recipe", "protocol")})
    return run_cli(run_job, cfg, hc.runtime.output_dir, hc.runtime.choices.get("method"), searched, multirun,
                   should_stop=preemption_requested)


if __name__ == "__main__":
    record_swept_keys(sys.argv[1:])
    main()
