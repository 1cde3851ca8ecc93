"""DoRA (Liu et al. 2024) from PEFT (``LoraConfig(use_dora=True)``), applied to the timm model in place
(spec baselines-vit.md section 8).

For an adapted Linear ``W0`` with bias ``b`` (PEFT 0.21.2 ``lora/dora.py``):
``y = (m * (W0 + s B A) / ||W0 + s B A||_r) x + b`` with ``||.||_r`` the L2 norm of each output row,
detached; ``s = alpha / r``; A kaiming-uniform, B zeros, ``m = ||W0||_r`` (the adapted model equals
the frozen one at init). Trainable: A, B, m (biases stay frozen).

Targets are whole Linears by attribute name. timm's attention has one fused ``qkv``, so
"q and v only" is not available: DoRA on ``qkv`` adapts q, k and v together, which is what PEFT
does on a timm ViT. Only ``nn.Linear`` layers match (``proj`` never wraps ``patch_embed.proj``, a
Conv2d). Per Linear ``r (in + out) + out``: r=8 on qkv 322,560; on qkv, proj, fc1, fc2 1,262,592.
Mergeable: ``W' = m / ||W0 + s B A||_r * (W0 + s B A)``, bias unchanged (PEFT's own merge).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LilyConfigError
from ..registry import MethodOptions, register
from ._peft import PeftMethod, exact_pattern, inject, linear_names, require_peft


@dataclass
class DoRAOptions(MethodOptions):
    name: str = "dora"
    targets: list = field(default_factory=lambda: ["qkv"])
    rank: int = 8          # r
    alpha: float = 8       # lora_alpha; s = alpha / r (PEFT defaults r=8, alpha=8)
    dropout: float = 0.0   # lora_dropout, on the input of A

    def validate(self):
        if not self.targets:
            raise LilyConfigError("method 'dora' needs at least one target (method.targets)")
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("alpha", lambda v: isinstance(v, (int, float)), "a number"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
        ))


@register
class DoRA(PeftMethod):
    name = "dora"

    def label(self, opts, method_id=None):
        return f"DoRA (r={opts.get('rank')})"

    options = DoRAOptions
    mergeable = True
    source = "Liu et al. 2024 (NVlabs/DoRA), PEFT LoraConfig(use_dora=True)"

    def apply(self, model, opts: DoRAOptions):
        peft = require_peft(self.name)
        from peft.tuners.lora import LoraModel
        config = peft.LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, use_dora=True,
                                 bias="none", target_modules=exact_pattern(linear_names(model, opts.targets, self.name)))
        inject(LoraModel, model, config)
