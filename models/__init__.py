"""Backbones: build an architecture and load its pretrained weights.

``build_backbone(cfg, num_classes)`` dispatches on ``cfg.family`` (``vit``: timm
VisionTransformer, models/vit.py; ``vim``: Vision Mamba Vim-S, models/vim.py) and returns
``(model, info)``, info being a dict such as ``{"weights": "file:...", "pre_logits": True}``.
The classification head is always ``model.head``.
"""
from __future__ import annotations

from engine.errors import UserError

FAMILIES = ("vit", "vim")


def build_backbone(cfg, num_classes: int):
    family = cfg.get("family")
    if family == "vit":
        from models.vit import build_vit
        return build_vit(cfg, num_classes)
    if family == "vim":
        from models.vim import build_vim
        return build_vim(cfg, num_classes)
    raise UserError(f"unknown backbone family '{family}' in backbone '{cfg.get('name')}'; expected one of {FAMILIES}")
