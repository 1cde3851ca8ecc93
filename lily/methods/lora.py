"""LoRA (Hu et al.) as the Lily authors' code runs it: ``s * B(dropout(A(x)))`` on chosen Linears
(q, k, v slices of timm's fused qkv, or any Linear by attribute name); dropout on the rank-r hidden.
Mergeable: ``W' = W + s B A``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..attach import attach_per_kind
from ..errors import LilyConfigError
from ..layers import Adapter, _down_up
from ..registry import Method, MethodOptions, register


class LoRAAdapter(Adapter):
    """LoRA: ``s * B(dropout(A(x)))`` with A kaiming-uniform and B zero-initialised.

    Dropout acts on the rank-r hidden (after the down projection), as in the LoRA baseline
    of the Lily authors' code; in eval mode it is the identity, so merging is unaffected.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0,
                 dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.lora_a, self.lora_b = _down_up(in_features, rank, out_features, bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.scale * self.lora_b(self.dropout(self.lora_a(x)))

    def delta_weight(self):
        dw = self.scale * self.lora_b.weight @ self.lora_a.weight
        db = None
        if self.lora_a.bias is not None:
            db = self.scale * (self.lora_b.weight @ self.lora_a.bias + self.lora_b.bias)
        return dw, db


@dataclass
class LoRAOptions(MethodOptions):
    name: str = "lora"
    targets: list = field(default_factory=lambda: ["q", "v"])
    rank: Any = 32
    scale: Any = 1.0
    dropout: Any = 0.0
    bias: Any = False

    per_target = ("rank", "scale", "dropout", "bias")

    def validate(self):
        if not self.targets:
            raise LilyConfigError(f"method '{self.name}' needs at least one target (method.targets)")
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
            ("scale", lambda v: isinstance(v, (int, float)), "a number"),
        ))


@register
class LoRA(Method):
    name = "lora"
    options = LoRAOptions
    mergeable = True
    source = "Hu et al. 2022; the Lily authors' LoRA baseline"

    def apply(self, model, opts: LoRAOptions):
        def build(sites):
            get = opts.getter(sites[0])
            return [LoRAAdapter(s.in_features, s.out_features, get("rank"), get("scale"), get("dropout"),
                                bool(get("bias"))) for s in sites]
        attach_per_kind(model, opts.targets, build)
