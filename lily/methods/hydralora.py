"""HydraLoRA (Tian et al. 2024, Clin0212/HydraLoRA) as its authors wrote it (spec baselines-vit.md
section 10): ``y = W0 x + b + sum_i softmax(R x)_i * B_i A dropout(x) * s``.

One shared ``A: Linear(in, r)``, K heads ``B_i: Linear(r, out)``, a per-token router
``R: Linear(in, K)``, all without bias, ``s = alpha / r``; no load-balancing loss. Init: A and R
``kaiming_uniform_(a=sqrt(5))``, every B_i zeros (the adapted model equals the frozen one at init).
On q and v slices of timm's fused ``qkv`` through the core's AdaptedLinear. Not mergeable: the
router depends on the token. Per Linear ``r in + K r out + K in`` (q, v, r=8, K=2: 479,232).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import einsum
from torch import nn

from ..attach import attach_per_kind
from ..layers import Adapter
from ..registry import Method, MethodOptions, register
from .moslora import _check_lora_like


class HydraLoRAAdapter(Adapter):
    """Shared A, K B heads mixed per token by ``softmax(R x)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, heads: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scale = float(alpha) / rank
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.lora_b = nn.ModuleList(nn.Linear(rank, out_features, bias=False) for _ in range(heads))
        self.router = nn.Linear(in_features, heads, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        for b in self.lora_b:
            nn.init.zeros_(b.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        w = torch.softmax(self.router(x), dim=-1)                          # (..., K), on x itself
        h = self.lora_a(self.dropout(x))                                    # (..., r)
        b = torch.stack([m.weight for m in self.lora_b])                    # (K, out, r)
        heads = einsum(h, b, "... r, k o r -> ... k o")
        return self.scale * einsum(w, heads, "... k, ... k o -> ... o")


@dataclass
class HydraLoRAOptions(MethodOptions):
    name: str = "hydralora"
    targets: list = field(default_factory=lambda: ["q", "v"])
    rank: Any = 8
    heads: Any = 2       # K (the authors' lora_b_nums)
    alpha: Any = 16      # s = alpha / rank
    dropout: Any = 0.0

    per_target = ("rank", "heads", "alpha", "dropout")

    def validate(self):
        _check_lora_like(self)
        self.check_values((("heads", lambda v: isinstance(v, int) and v >= 1, "a positive int"),))


@register
class HydraLoRA(Method):
    name = "hydralora"

    def label(self, opts, method_id=None):
        return f"HydraLoRA (r={opts.get('rank')}, K={opts.get('heads')})"

    options = HydraLoRAOptions
    mergeable = "its router mixes the B heads per token (the mixture depends on the input)"
    source = "Tian et al. 2024, Clin0212/HydraLoRA"

    def apply(self, model, opts: HydraLoRAOptions):
        def build(sites):
            get = opts.getter(sites[0])
            return [HydraLoRAAdapter(s.in_features, s.out_features, get("rank"), get("heads"), get("alpha"),
                                     get("dropout")) for s in sites]
        attach_per_kind(model, opts.targets, build)
