"""Paper-style parameter count of a backbone + method, without any weights or download.

    python scripts/count_params.py backbone=vit_b16_in21k method=lily_qv method.ne=4

The last line is exactly ``trainable_params_excluding_head=<int>`` (the paper's Params
column excludes the classification head).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from engine.cli import run_cli  # noqa: E402


def count(cfg: DictConfig) -> int:
    import lily
    from data import get_task
    from engine.setup import apply_method
    from models import build_backbone

    with open_dict(cfg):  # architecture only: no weights are read or downloaded
        cfg.backbone.pretrained = False
        cfg.backbone.checkpoint = None
    with torch.device("meta"):
        model, _ = build_backbone(cfg.backbone, get_task(cfg.task.name).num_classes)
        apply_method(model, cfg)
    mcfg = model.lily_config
    n = lily.count_parameters(model)
    total = lily.count_parameters(model, trainable_only=False, exclude_head=False)
    options = {k: v for k, v in mcfg.to_dict().items() if k not in ("name", "head")}
    print(f"backbone={cfg.backbone.name} method={mcfg.name} " + " ".join(f"{k}={v}" for k, v in options.items()))
    print(f"Params(M)={n / 1e6:.3f}  (head: {lily.head_parameters(model):,} more; model total {total:,})")
    print(f"trainable_params_excluding_head={n}")
    return n


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    run_cli(count, cfg)


if __name__ == "__main__":
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    main()
