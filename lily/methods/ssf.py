"""SSF (Lian et al., dongzelian/SSF ``models/vision_transformer.py``): a learned scale and shift
``x * gamma + beta`` on the feature axis after the patch-embed projection (patch tokens, before the
cls token and the position embedding), after norm1, after the fused qkv (before the split into
heads), after the attention proj, after norm2, after fc1 (before GELU), after fc2 and after the
final norm. gamma ~ N(1, 0.02), beta ~ N(0, 0.02): not the identity at initialisation.
ViT-B/16: 2*768 + 12 * 2 * 8,448 + 2*768 = 205,824 parameters.

Each scale-shift is a forward hook on its module's instance. Mergeable: after a Linear or conv
``W' = diag(gamma) W, b' = gamma * b + beta``; after a LayerNorm ``w' = gamma * w, b' = gamma * b + beta``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LilyConfigError, MergeError
from ..merging import Mergeable
from ..registry import Method, MethodOptions, register
from ._vit import final_norm, link, vit_blocks


class ScaleShift(Mergeable, nn.Module):
    """``x * scale + shift`` along ``axis`` of its host module's output (a forward hook on the host).
    Merges into the host's weight and bias (Linear, Conv, LayerNorm)."""

    def __init__(self, host: nn.Module, dim: int, axis: int = -1, init_std: float = 0.02):
        super().__init__()
        self.dim, self.axis = dim, axis
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=init_std)
        nn.init.normal_(self.shift, mean=0.0, std=init_std)
        link(self, "_host", host)

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.axis] = self.dim
        return x * self.scale.view(shape).to(x.dtype) + self.shift.view(shape).to(x.dtype)

    def merge_plan(self):
        w, b = getattr(self._host, "weight", None), getattr(self._host, "bias", None)
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise MergeError(f"SSF after a {type(self._host).__name__} without weight and bias cannot be merged")
        g, s = self.scale.detach(), self.shift.detach()
        gw = g.view(-1, *([1] * (w.dim() - 1))).to(w.dtype)
        return [(w, w.detach() * gw), (b, b.detach() * g.to(b.dtype) + s.to(b.dtype))]

    def extra_repr(self):
        return f"dim={self.dim}, axis={self.axis}"


def _ssf_hook(module, args, output):
    ssf = module.ssf
    return output if ssf.merged else ssf(output)


def add_scale_shift(host: nn.Module, dim: int, axis: int = -1, init_std: float = 0.02) -> ScaleShift:
    if hasattr(host, "ssf"):
        raise LilyConfigError(f"{type(host).__name__} already carries an SSF scale-shift")
    host.ssf = ScaleShift(host, dim, axis, init_std)
    host.register_forward_hook(_ssf_hook)
    return host.ssf


@dataclass
class SSFOptions(MethodOptions):
    name: str = "ssf"
    init_std: float = 0.02      # gamma ~ N(1, std), beta ~ N(0, std) (init_ssf_scale_shift)

    def validate(self):
        self.check_values((("init_std", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),))


@register
class SSF(Method):
    name = "ssf"
    title = "SSF"
    options = SSFOptions
    mergeable = True
    source = "Lian et al. 2022, dongzelian/SSF"

    def apply(self, model, opts: SSFOptions):
        blocks = vit_blocks(model, self.name)
        std = float(opts.init_std)
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if not isinstance(proj, nn.Conv2d):
            raise LilyConfigError("ssf needs a timm ViT with patch_embed.proj (a Conv2d)")
        add_scale_shift(proj, proj.out_channels, axis=1, init_std=std)     # NCHW conv output, before flatten
        for b in blocks:
            a, m = b.attn, b.mlp
            add_scale_shift(b.norm1, b.norm1.weight.numel(), init_std=std)
            add_scale_shift(a.qkv, a.qkv.out_features, init_std=std)
            add_scale_shift(a.proj, a.proj.out_features, init_std=std)
            add_scale_shift(b.norm2, b.norm2.weight.numel(), init_std=std)
            add_scale_shift(m.fc1, m.fc1.out_features, init_std=std)       # fc1's output: before the activation
            add_scale_shift(m.fc2, m.fc2.out_features, init_std=std)
        norm = final_norm(model)
        if norm is None:
            raise LilyConfigError("ssf: the model has no final norm (norm or fc_norm) to scale and shift after")
        add_scale_shift(norm, norm.weight.numel(), init_std=std)
