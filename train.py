"""Train one configuration: python train.py task=dtd method=lily_kvffn (see README)."""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from engine.cli import run_cli


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    from engine.trainer import train
    hc = HydraConfig.get()
    with open_dict(cfg):
        cfg.method_id = hc.runtime.choices.get("method")
    results = run_cli(train, cfg, hc.runtime.output_dir)
    return results.get("final_acc")  # the objective for sweepers


if __name__ == "__main__":
    main()
