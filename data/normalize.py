"""uint8 images -> float32 model inputs, on the images' own device (vtab.md section 5).

Modes: ``imagenet`` (timm IMAGENET_DEFAULT_MEAN/STD: NOAH, FacT, RepAdapter), ``inception``
(mean = std = 0.5, i.e. [-1, 1]: Google ViT pre-training, NOAH's VPT baseline) and
``none`` ([0, 1]: binary adapter).
"""
from __future__ import annotations

import functools

import torch

from common.errors import UserError

MODES = ("imagenet", "inception", "none")


@functools.cache
def mean_std(mode: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if mode not in MODES:
        raise UserError(f"unknown normalization '{mode}'; expected one of {', '.join(MODES)}.")
    if mode == "none":
        return None
    from timm.data import constants as c  # imported here: timm is slow to import

    if mode == "imagenet":
        return c.IMAGENET_DEFAULT_MEAN, c.IMAGENET_DEFAULT_STD
    return c.IMAGENET_INCEPTION_MEAN, c.IMAGENET_INCEPTION_STD


def normalize(x: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32, scaled to [0, 1] then standardized per channel."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {x.dtype}")
    stats = mean_std(mode)
    out = x.to(torch.float32).div_(255)
    if stats is None:
        return out
    mean, std = (torch.tensor(v, dtype=torch.float32, device=x.device).view(3, 1, 1) for v in stats)
    return out.sub_(mean).div_(std)
