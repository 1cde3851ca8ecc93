"""VeRA (Kopiczko et al. 2024) from PEFT (``VeraConfig``), applied to the timm model in place
(spec baselines-vit.md section 11).

``y = W0 x + b + lambda_b * B (lambda_d * A dropout(x))``. A (r x in_max) and B (out_max x r) are
frozen, shared by every adapted layer (each uses a slice), ``kaiming_uniform`` from the seeded
``projection_prng_key``; they are buffers: not trainable, not counted, not in the trainable state
(``lily.save_trainable``), and rebuilt identically from the key when a model is adapted again, so
a saved state reproduces its outputs. Trainable per layer: lambda_d (r, init ``d_initial`` = 0.1)
and lambda_b (out, init zeros; the adapted model equals the frozen one at init).

Targets are whole Linears by attribute name (timm's fused ``qkv``: q, k and v together, as PEFT
does). Per layer ``r + out``: r=256 on qkv 30,720; on qkv, proj, fc1, fc2 95,232.
Mergeable: ``W' = W0 + diag(lambda_b) B diag(lambda_d) A`` (PEFT's own merge).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LilyConfigError
from ..registry import MethodOptions, register
from ._peft import PeftMethod, exact_pattern, inject, linear_names, require_peft


@dataclass
class VeRAOptions(MethodOptions):
    name: str = "vera"
    targets: list = field(default_factory=lambda: ["qkv"])
    rank: int = 256               # r (PEFT default)
    d_initial: float = 0.1        # init of lambda_d (PEFT default)
    dropout: float = 0.0          # vera_dropout
    projection_prng_key: int = 0  # seed of the frozen shared A and B

    def validate(self):
        if not self.targets:
            raise LilyConfigError("method 'vera' needs at least one target (method.targets)")
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("d_initial", lambda v: isinstance(v, (int, float)), "a number"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
            ("projection_prng_key", lambda v: isinstance(v, int), "an int"),
        ))


@register
class VeRA(PeftMethod):
    name = "vera"

    def label(self, opts, method_id=None):
        return f"VeRA (r={opts.get('rank')})"

    options = VeRAOptions
    mergeable = True
    source = "Kopiczko et al. 2024, PEFT VeraConfig"

    def apply(self, model, opts: VeRAOptions):
        peft = require_peft(self.name)
        from peft.tuners.vera import VeraModel
        config = peft.VeraConfig(r=opts.rank, d_initial=opts.d_initial, vera_dropout=opts.dropout,
                                 projection_prng_key=opts.projection_prng_key, bias="none",
                                 target_modules=exact_pattern(linear_names(model, opts.targets, self.name)))
        inject(VeraModel, model, config)
