"""Full fine-tuning and linear probing: the two ends of the field."""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Method, MethodOptions, register


@dataclass
class FullOptions(MethodOptions):
    name: str = "full"


@dataclass
class LinearOptions(MethodOptions):
    name: str = "linear"


@register
class Full(Method):
    """Every parameter trains."""
    name = "full"
    options = FullOptions
    mergeable = True        # nothing to merge: the weights are the model's own
    source = "full fine-tuning"

    def apply(self, model, opts):
        for p in model.parameters():
            p.requires_grad_(True)


@register
class Linear(Method):
    """Only the classification head trains."""
    name = "linear"
    options = LinearOptions
    mergeable = True
    source = "linear probing"

    def apply(self, model, opts):
        pass
