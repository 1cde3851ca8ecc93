"""AdaptFormer (Chen et al.) as its authors wrote it: ``s * up(dropout(ReLU(down(x))))`` with x the
block's residual stream before norm2, added to the block's output outside drop-path and layer scale.
Not mergeable (ReLU hidden layer)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..attach import attach_per_kind
from ..config import ACTIVATIONS
from ..errors import LilyConfigError
from ..layers import _ACTS, Adapter, _down_up
from ..registry import Method, MethodOptions, register


class BottleneckAdapter(Adapter):
    """AdaptFormer's bottleneck: ``s * up(dropout(act(down(x))))`` (activation, then dropout),
    up zero-initialised. Attached by :func:`add_residual_adapter` (AdaptFormer's placement)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 0.1,
                 dropout: float = 0.0, bias: bool = False, act: str = "relu"):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.down, self.up = _down_up(in_features, rank, out_features, bias)
        self.act = _ACTS[act]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.scale * self.up(self.dropout(self.act(self.down(x))))


@dataclass
class AdaptFormerOptions(MethodOptions):
    name: str = "adaptformer"
    targets: list = field(default_factory=lambda: ["ffn"])
    rank: Any = 32
    scale: Any = 0.1
    dropout: Any = 0.0
    bias: Any = False
    ffn_act: str = "relu"

    per_target = ("rank", "scale", "dropout", "bias")

    def validate(self):
        if list(self.targets) != ["ffn"]:
            raise LilyConfigError(f"adaptformer is a parallel adapter on the MLP: targets must be ['ffn'], "
                                  f"got {self.targets}")
        if self.ffn_act not in ACTIVATIONS:
            raise LilyConfigError(f"ffn_act must be one of {ACTIVATIONS}, got '{self.ffn_act}'")
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
            ("scale", lambda v: isinstance(v, (int, float)), "a number"),
        ))


@register
class AdaptFormer(Method):
    name = "adaptformer"
    options = AdaptFormerOptions
    mergeable = "its hidden layer is non-linear (ReLU)"
    source = "Chen et al. 2022, ShoufaChen/AdaptFormer"

    def apply(self, model, opts: AdaptFormerOptions):
        def build(sites):
            get = opts.getter(sites[0])
            return [BottleneckAdapter(s.in_features, s.out_features, get("rank"), get("scale"), get("dropout"),
                                      bool(get("bias")), act=opts.ffn_act) for s in sites]
        attach_per_kind(model, opts.targets, build, residual=True)
