"""PEFT's own Lily (``peft.LilyConfig``, PEFT 0.21.2 ``tuners/lily``), applied to the timm model in place,
so that it can sit in the same table as this project's Lily.

PEFT's layer: ``y = W0 x + b + s * h @ (sum_e w_e B_e)``, ``h = A x`` with ``A: Linear(in, r)`` shared
by ``stride_A`` consecutive layers of a target, ``num_B`` HP experts ``B_e`` (r x out) shared by every
layer of a target, a per-layer router ``Linear(r, num_B)`` on ``h``, ``w = softmax`` averaged over
batch and tokens (the paper's batch routing); A and the routers kaiming-uniform, B zeros (the adapted
model equals the frozen one at init). Differences from ``method=lily``: PEFT wraps whole Linears, so
on timm it adapts the whole fused ``qkv`` (q, k and v together), not q and v slices; no dropout,
activation or bias options. Not mergeable (data-dependent routing; PEFT raises on merge too).

Per target with L layers: ``ceil(L / stride_A) in r + num_B r out + L r num_B``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LilyConfigError
from ..registry import MethodOptions, register
from ._peft import PeftMethod, inject, linear_names, require_peft


@dataclass
class PeftLilyOptions(MethodOptions):
    name: str = "peft_lily"
    targets: list = field(default_factory=lambda: ["qkv"])
    rank: int = 32       # r
    stride_a: int = 1    # stride_A: consecutive layers sharing one A (LP)
    num_b: int = 4       # num_B: HP experts (>= 2)
    scaling: float = 1.0

    def validate(self):
        if not self.targets:
            raise LilyConfigError("method 'peft_lily' needs at least one target (method.targets)")
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("stride_a", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("num_b", lambda v: isinstance(v, int) and v >= 2, "an int >= 2 (PEFT needs two experts to route)"),
            ("scaling", lambda v: isinstance(v, (int, float)), "a number"),
        ))


def _suffixes(model, names: list[str]) -> list[str]:
    """PEFT Lily shares A and B among the layers matched by one suffix: ``attn.qkv``, ``mlp.fc1``, ...
    (two name components, so that ``attn.proj`` never matches ``patch_embed.proj``)."""
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in names})
    matched = [n for n, _ in model.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)]
    if sorted(matched) != sorted(names):
        extra = sorted(set(matched) - set(names))
        raise LilyConfigError(f"method 'peft_lily': the suffixes {suffixes} also match {extra[:3]}, which are "
                              "not Linears PEFT's Lily can adapt")
    return suffixes


@register
class PeftLily(PeftMethod):
    name = "peft_lily"
    title = "Lily (PEFT)"
    options = PeftLilyOptions
    mergeable = "its router weights depend on the input (PEFT's Lily cannot merge either)"
    source = "PEFT LilyConfig (huggingface/peft tuners/lily), the PEFT port of Lily"

    def apply(self, model, opts: PeftLilyOptions):
        peft = require_peft(self.name)
        if not hasattr(peft, "LilyConfig"):
            raise LilyConfigError(f"the installed peft {peft.__version__} has no LilyConfig (needs peft>=0.21)")
        from peft.tuners.lily import LilyModel
        suffixes = _suffixes(model, linear_names(model, opts.targets, self.name))
        config = peft.LilyConfig(r=opts.rank, stride_A=opts.stride_a, num_B=opts.num_b, scaling=opts.scaling,
                                 target_modules=suffixes)
        inject(LilyModel, model, config)
