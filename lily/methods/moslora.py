"""MoSLoRA (Wu et al. 2024, wutaiqiang/MoSLoRA) as its authors wrote it (spec baselines-vit.md section 9):
``y = W0 x + b + s * B M A dropout(x)`` with ``A: Linear(in, r)``, the mixer ``M: Linear(r, r)`` and
``B: Linear(r, out)``, all without bias, and ``s = alpha / r``.

Init as the authors' ``lora.py`` (``lora_use_mixer=True``): A and M ``kaiming_uniform_(a=sqrt(5))``,
B zeros, so the adapted model equals the frozen one at init. On q and v slices of timm's fused
``qkv`` through the core's AdaptedLinear (or any Linear by attribute name). Mergeable:
``W' = W0 + s B M A``. Per Linear ``r (in + out) + r^2`` (q, v, r=8 on ViT-B: 296,448).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..attach import attach_per_kind
from ..errors import LilyConfigError
from ..layers import Adapter
from ..registry import Method, MethodOptions, register


class MoSLoRAAdapter(Adapter):
    """``s * B(M(A(dropout(x))))``: LoRA with a trainable r x r mixer between A and B."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scale = float(alpha) / rank
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.mixer = nn.Linear(rank, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mixer.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.scale * self.lora_b(self.mixer(self.lora_a(self.dropout(x))))

    def delta_weight(self):
        return self.scale * self.lora_b.weight @ self.mixer.weight @ self.lora_a.weight, None


def _check_lora_like(opts) -> None:
    if not opts.targets:
        raise LilyConfigError(f"method '{opts.name}' needs at least one target (method.targets)")
    opts.check_values((
        ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
        ("alpha", lambda v: isinstance(v, (int, float)), "a number"),
        ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
    ))


@dataclass
class MoSLoRAOptions(MethodOptions):
    name: str = "moslora"
    targets: list = field(default_factory=lambda: ["q", "v"])
    rank: Any = 8
    alpha: Any = 16      # s = alpha / rank (the authors' scripts: alpha = 2 r)
    dropout: Any = 0.0   # on the adapter's input, as PEFT's lora_dropout

    per_target = ("rank", "alpha", "dropout")

    def validate(self):
        _check_lora_like(self)


@register
class MoSLoRA(Method):
    name = "moslora"

    def label(self, opts, method_id=None):
        return f"MoSLoRA (r={opts.get('rank')})"

    options = MoSLoRAOptions
    mergeable = True
    source = "Wu et al. 2024, wutaiqiang/MoSLoRA (lora_use_mixer=True)"

    def apply(self, model, opts: MoSLoRAOptions):
        def build(sites):
            get = opts.getter(sites[0])
            return [MoSLoRAAdapter(s.in_features, s.out_features, get("rank"), get("alpha"), get("dropout"))
                    for s in sites]
        attach_per_kind(model, opts.targets, build)
