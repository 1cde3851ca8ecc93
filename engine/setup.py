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
from data.folder import read_list, task_dir
from data.registry import Task
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


def load_task_split(cfg: DictConfig, split: str, task: Task | None = None) -> SplitData:
    task = task or get_task(cfg.task.name)
    root = Path(cfg.paths.data_root)
    if task.name == "digits":
        ensure_digits(root)
    return load_split(root, task, split, image_size=cfg.image_size, cache_dir=cfg.paths.cache_dir,
                      interpolation=cfg.interpolation, num_workers=cfg.num_workers, progress=cfg.progress)


def split_files(cfg: DictConfig, split: str, task: Task) -> list[str]:
    """The image paths of ``<split>.txt`` as written in the list file, in its order."""
    _, raw, _ = read_list(task_dir(Path(cfg.paths.data_root), task), task, split)
    return [line.split()[0] for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]


def data_digest(cfg: DictConfig, task: Task) -> str:
    """The digest of the task copy a run reads (data/manifest.py): from its fresh manifest, else
    computed once (every image hashed) and its manifest kept under ``<cache_dir>/manifests``, so
    the data root is never written to."""
    from data.manifest import task_digest
    return task_digest(task_dir(Path(cfg.paths.data_root), task), manifest_dir=Path(cfg.paths.cache_dir) / "manifests",
                       save=True, workers=max(1, int(cfg.num_workers)), progress=bool(cfg.progress))


def method_config(cfg_method) -> lily.MethodOptions:
    try:
        return lily.method_config(OmegaConf.to_container(cfg_method, resolve=True))
    except lily.LilyConfigError as e:
        raise UserError(f"method config: {e}") from None


def build_model(cfg: DictConfig, num_classes: int, device: torch.device | str):
    """Backbone with pretrained weights, adapted by the method; returns (model, info).

    The one builder of a run's model. ``device="meta"`` builds the same architecture without
    weights and without memory (preflight's method-on-backbone check)."""
    if str(device) == "meta":
        arch = OmegaConf.to_container(cfg.backbone, resolve=True)
        arch.update(pretrained=False, checkpoint=None)
        quiet = logging.getLogger("models")
        level, quiet.level = quiet.level, logging.WARNING  # not the run's backbone: no "weights" log line
        try:
            with torch.device("meta"):
                model, info = build_backbone(OmegaConf.create(arch), num_classes)
                return apply_method(model, cfg), info
        finally:
            quiet.level = level
    model, info = build_backbone(cfg.backbone, num_classes)
    return apply_method(model, cfg).to(device), info


def apply_method(model, cfg: DictConfig):
    """lily.adapt with cfg.method; a method that does not fit the backbone is a UserError."""
    try:
        return lily.adapt(model, method_config(cfg.method))
    except lily.LilyConfigError as e:
        raise UserError(f"method '{cfg.method.get('name')}' does not fit backbone '{cfg.backbone.name}': {e}") from None
