"""Models, methods and synthetic data for scripts/bench.py (random weights, no downloads).

Backbones: ``vit_b16`` (timm ``vit_base_patch16_224``, drop-path 0.1 as in the paper) and
``vim_s`` (models/vim.py Vim-S, drop-path 0.05); ``depth`` cuts either to its first blocks
(``--quick``: a tiny model of the same width).

Methods come from the method configs, composed with Hydra exactly as a run composes them
(``configs/train.yaml`` with ``backbone=<the backbone's config> method=<name> task=cifar``, so
per-task values resolve for cifar and recipe interpolations as the default recipe sets them).
Which methods a backbone runs is its field experiment's list (configs/experiment/field_vit.yaml,
field_vim.yaml; results/search_space.py reads it): there is no second list here. The only
bench-only entry is a variant of a config (``VARIANTS``: Lily on Vim with per-sample routing,
for the token/sample memory ratio).
"""
from __future__ import annotations

import copy
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import lily  # noqa: E402
from data import SplitData, get_task  # noqa: E402

NUM_CLASSES = 100  # a VTAB-sized head (cifar)
BACKBONES = ("vit_b16", "vim_s")
BACKBONE_CONFIG = {"vit_b16": "vit_b16_in21k", "vim_s": "vim_s"}    # configs/backbone/<name>.yaml
FIELD = {"vit_b16": "field_vit", "vim_s": "field_vim"}               # configs/experiment/<name>.yaml
BASELINE = {"vit_b16": "lora", "vim_s": "vim_lora_in_proj"}         # ratios are to these
BENCH_TASK = "cifar"
# bench-only variants of a method config: label -> (config name, overrides)
VARIANTS = {"lily_vim_sample": ("lily_vim", ("method.routing.in_proj=sample",))}


def field_methods(backbone: str) -> list[str]:
    """The backbone's field (its experiment's method list), configs present or not."""
    from results.search_space import field_methods as methods_of
    return methods_of([f"experiment={FIELD[backbone]}"])


def has_config(label: str) -> bool:
    name = VARIANTS.get(label, (label,))[0]
    return os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                       "method", f"{name}.yaml"))


@functools.lru_cache(maxsize=None)
def method_options(backbone: str, label: str) -> dict:
    """The resolved ``method`` node a run of ``label`` on ``backbone`` would get (task cifar)."""
    from results.search_space import compose
    name, extra = VARIANTS.get(label, (label, ()))
    cfg = compose([f"backbone={BACKBONE_CONFIG[backbone]}", f"method={name}", f"task={BENCH_TASK}", *extra])
    return OmegaConf.to_container(cfg.method, resolve=True)


def method_config(backbone: str, label: str) -> lily.MethodOptions:
    if not has_config(label):
        raise SystemExit(f"unknown method '{label}' for {backbone}: no configs/method/{label}.yaml")
    return lily.method_config(method_options(backbone, label))


def build_backbone(backbone: str, image_size: int, depth: int | None = None) -> torch.nn.Module:
    if backbone == "vit_b16":
        import timm
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                                 img_size=image_size, drop_path_rate=0.1, **({"depth": depth} if depth else {}))
    if backbone == "vim_s":
        from models.vim import vim_small
        return vim_small(num_classes=NUM_CLASSES, img_size=image_size, drop_path_rate=0.05,
                         **({"depth": depth} if depth else {}))
    raise SystemExit(f"unknown backbone '{backbone}'; known: {', '.join(BACKBONES)}")


def adapted(base: torch.nn.Module, backbone: str, method: str) -> torch.nn.Module:
    """``base`` adapted by ``method`` in a copy that *shares* base's frozen weights (the head is
    the copy's own), so several methods fit in memory side by side. A weight the method trains
    (BitFit's biases, full fine-tuning) is the copy's own: it is never trained through, nor marked
    trainable in, the other methods' models."""
    shared = {id(p): p for n, p in base.named_parameters() if not n.startswith("head.")}
    model = copy.deepcopy(base, dict(shared))
    model = lily.adapt(model, method_config(backbone, method))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in shared and p.requires_grad:
                setattr(module, name, torch.nn.Parameter(p.detach().clone(), requires_grad=True))
    for p in shared.values():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero adapter weights (experts and up-projections start at zero), for output checks."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("head."):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def synthetic_split(n: int, image_size: int, seed: int = 0) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return SplitData(images, labels, get_task("cifar"), "bench", True, 0, "")


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as in the paper (lr 1e-3, weight decay 1e-4) over the trainable parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
