"""Evaluate a run directory: python eval.py run_dir=outputs/runs/... [split=test] [merge=true]"""
import hydra
from omegaconf import DictConfig

from engine.cli import run_cli


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig):
    from engine.evaluate import evaluate_run
    return run_cli(evaluate_run, cfg)["acc"]


if __name__ == "__main__":
    main()
