"""Backbones: build an architecture and load its pretrained weights.

``build_backbone(cfg, num_classes)`` dispatches on ``cfg.family`` (``vit``: timm
VisionTransformer, models/vit.py; ``vim``: Vision Mamba Vim-S, models/vim.py) and returns
``(model, info)``, info being a dict such as ``{"weights": "file:...", "pre_logits": True}``.
The classification head is always ``model.head``; it is (re-)initialised as
``cfg.head_init`` says (VTAB tasks never share the pre-training classes):
``default`` = PyTorch's ``nn.Linear`` init (the authors' timm 0.4.12 ``reset_classifier``),
``trunc_normal`` = trunc-normal(std 0.02) weight and zero bias (timm >= 0.9, Vim),
``zeros`` = zero weight and bias (mmpretrain's head, MambaPEFT's recipe).
``weights_problem(cfg)`` says, without loading anything, why the weights cannot be had.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from common.errors import UserError

FAMILIES = ("vit", "vim")


def init_head(model: nn.Module, how: str) -> None:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return
    if how == "default":
        head.reset_parameters()
    elif how == "zeros":               # mmpretrain's ClsHead default (MambaPEFT's recipe)
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    elif how == "trunc_normal":
        nn.init.trunc_normal_(head.weight, std=0.02)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    else:
        raise UserError(f"backbone.head_init must be default, trunc_normal or zeros, got '{how}'")


def build_backbone(cfg, num_classes: int):
    family = cfg.get("family")
    if family == "vit":
        from models.vit import build_vit
        model, info = build_vit(cfg, num_classes)
    elif family == "vim":
        from models.vim import build_vim
        model, info = build_vim(cfg, num_classes)
    else:
        raise UserError(f"unknown backbone family '{family}' in backbone '{cfg.get('name')}'; expected one of {FAMILIES}")
    how = cfg.get("head_init") or "default"
    if info.get("head") == "loaded":  # the checkpoint's own head fits (same classes): keep it
        info["head_init"] = "loaded"
    else:
        if not next(model.parameters()).is_meta:
            init_head(model, how)
        info["head_init"] = how
    return model, info


def weights_problem(cfg) -> str | None:
    """Why the pretrained weights of a backbone config cannot be loaded, or None (no I/O beyond a stat
    and, for timm hub weights that are not in the local cache, a DNS look-up of the hub)."""
    if not cfg.get("pretrained", False):
        return None
    ckpt = cfg.get("checkpoint")
    if ckpt:
        path = Path(os.path.expanduser(str(ckpt)))
        return None if path.is_file() else (
            f"backbone.checkpoint='{path}' does not exist: pass the path of the weights file "
            f"(see configs/backbone/{cfg.get('name')}.yaml for where to get it) or backbone.pretrained=false")
    if cfg.get("family") == "vim":
        from models.vim import OFFICIAL_CHECKPOINT, OFFICIAL_HUB_REPO
        return (f"backbone.pretrained=true needs the official Vim-S weights {OFFICIAL_CHECKPOINT} (from the "
                f"{OFFICIAL_HUB_REPO} model on the Hugging Face hub): pass backbone.checkpoint=/path/to/it")
    hub_name = cfg.get("hub_name")
    if not hub_name:
        return (f"backbone '{cfg.get('name')}' is pretrained but names neither backbone.checkpoint nor "
                "backbone.hub_name; pass backbone.checkpoint=/path/to/weights or backbone.pretrained=false")
    from models.vit import hub_weights_problem
    return hub_weights_problem(hub_name, cfg.get("arch"))
