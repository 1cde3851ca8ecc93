"""Build what a run needs from its config: device, data, model (backbone + method)."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import lily
from data import SplitData, ensure_digits, get_task, load_split
from common.errors import UserError
from models import build_backbone

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} was requested but no CUDA device is available; use device=cpu or device=auto")
    return device


def load_task_split(cfg: DictConfig, split: str) -> SplitData:
    task = get_task(cfg.task.name)
    root = Path(cfg.paths.data_root)
    if task.name == "digits":
        ensure_digits(root)
    return load_split(root, task, split, image_size=cfg.image_size, cache_dir=cfg.paths.cache_dir,
                      interpolation=cfg.interpolation, num_workers=cfg.num_workers, progress=cfg.progress)


def method_config(cfg_method) -> lily.MethodConfig:
    try:
        return lily.MethodConfig.from_dict(OmegaConf.to_container(cfg_method, resolve=True))
    except lily.LilyConfigError as e:
        raise UserError(f"method config: {e}") from None


def build_model(cfg: DictConfig, num_classes: int, device: torch.device):
    """Backbone with pretrained weights, adapted by the method; returns (model, info)."""
    model, info = build_backbone(cfg.backbone, num_classes)
    return apply_method(model, cfg).to(device), info


def apply_method(model, cfg: DictConfig):
    """lily.adapt with cfg.method; a method that does not fit the backbone is a UserError."""
    try:
        return lily.adapt(model, method_config(cfg.method))
    except lily.LilyConfigError as e:
        raise UserError(f"method '{cfg.method.get('name')}' does not fit backbone '{cfg.backbone.name}': {e}") from None
