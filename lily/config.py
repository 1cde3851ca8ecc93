"""The method configuration shared by Hydra configs and users' own scripts.

Every per-target option (``rank``, ``ne``, ``lp_experts``, ``scale``, ``routing``,
``dropout``, ``lp_stride``, ``bias``, ``shared_router``) is either one value for all targets or a
mapping ``{target: value}``; a mapping may carry a ``default`` entry.

``lp_stride`` (LP sharing across layers, per target kind with ``L`` sites):

- ``k >= 1``: consecutive blocks of ``k`` layers share one LP (1: one LP per layer, the
  paper's text);
- ``0``: one LP for all ``L`` layers;
- ``"depth//ne"``: blocks of ``max(1, L // N_e)`` layers share one LP, with ``N_e`` the
  target kind's ``ne`` (the authors' released ViT code: on ViT-B, N_e 2 -> 2 LPs,
  4 -> 4, 6 -> 6, 8 -> stride 1, i.e. 12 LPs).

``lp_experts`` (Lily v2, the PEFT feature request's "two routers for weighting As and
Bs"): ``N_a >= 1`` LP experts per target kind in one model-wide bank (``N_a x in x d``),
mixed per layer by an LP router ``R_A: in -> N_a`` on the layer's input, with the same
routing mode as the HP router (``shared_router`` shares both routers model-wide). ``0``
(the default) keeps Lily's per-layer or strided LPs; ``lp_stride`` must then stay 1.
Trainable count per target: ``N_a*in*d + L*in*N_a + N_e*d*out + L*d*N_e`` (static
routing: ``L*N_a + L*N_e`` logits instead of the router terms; uniform: none).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

METHODS = ("lily", "lora", "adaptformer", "full", "linear")
ROUTING_MODES = ("batch", "sample", "token", "static", "uniform")
ROUTER_INITS = ("paper", "default")
ACTIVATIONS = ("identity", "relu", "gelu")
DEPTH_OVER_NE = "depth//ne"    # lp_stride value: max(1, L // N_e) consecutive layers share one LP


class LilyConfigError(ValueError):
    """A method configuration that is invalid or does not fit the model."""


@dataclass
class MethodConfig:
    name: str = "lily"
    targets: list = field(default_factory=lambda: ["q", "v"])
    rank: Any = 32                 # d: int or {target: int}
    ne: Any = 4                    # N_e, number of HP experts per target kind (Lily only)
    lp_experts: Any = 0            # N_a, LP experts per target kind with an LP router (Lily v2); 0: off
    scale: Any = 1.0               # s
    routing: Any = "batch"         # batch | sample | token | static | uniform
    router_init: str = "paper"     # paper: normal(1, 0.01); default: PyTorch Linear init
    lp_stride: Any = 1             # k consecutive layers share one LP; 0: one LP for all layers;
                                   # "depth//ne": max(1, L // N_e) layers share one LP (authors' ViT code)
    dropout: Any = 0.0             # dropout on the LP output
    bias: Any = False              # biases in the projectors (DeltaFit / DeltaInFit)
    shared_router: Any = False     # one router per target kind for the whole model (authors' Vim code)
    ffn_act: str = "relu"          # hidden activation of the parallel FFN adapter (Lily ffn, AdaptFormer)
    head: list = field(default_factory=lambda: ["head"])  # module names that stay trainable

    def __post_init__(self):
        self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets or [])
        self.head = [self.head] if isinstance(self.head, str) else list(self.head or [])
        for key in ("rank", "ne", "lp_experts", "scale", "routing", "lp_stride", "dropout", "bias", "shared_router"):
            value = getattr(self, key)
            if isinstance(value, Mapping):
                setattr(self, key, dict(value))
        self.validate()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping) -> "MethodConfig":
        """Build from a plain mapping (e.g. ``OmegaConf.to_container(cfg.method)``).

        Unknown keys are rejected so that a typo in a config never goes unnoticed;
        ``description`` is allowed as free text.
        """
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in dict(d).items() if k != "description"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LilyConfigError(f"unknown method option(s) {unknown}; known options: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    # -- per-target values --------------------------------------------------------------
    def get(self, key: str, target: str, group: str | None = None):
        """The value of ``key`` for ``target`` (``group`` is an alias, e.g. 'delta' for 'delta_f')."""
        value = getattr(self, key)
        if not isinstance(value, Mapping):
            return value
        for k in (target, group, "default"):
            if k is not None and k in value:
                return value[k]
        raise LilyConfigError(
            f"method.{key} is a mapping {value} without an entry for target '{target}' "
            f"(add '{target}: ...' or 'default: ...')"
        )

    def validate(self):
        if self.name not in METHODS:
            raise LilyConfigError(f"unknown method name '{self.name}'; expected one of {METHODS}")
        if self.name in ("lily", "lora", "adaptformer") and not self.targets:
            raise LilyConfigError(f"method '{self.name}' needs at least one target (method.targets)")
        if self.router_init not in ROUTER_INITS:
            raise LilyConfigError(f"router_init must be one of {ROUTER_INITS}, got '{self.router_init}'")
        if self.ffn_act not in ACTIVATIONS:
            raise LilyConfigError(f"ffn_act must be one of {ACTIVATIONS}, got '{self.ffn_act}'")
        for key, check, what in (
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("ne", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("lp_experts", lambda v: isinstance(v, int) and v >= 0, "an int >= 1 (Lily v2) or 0 (off)"),
            ("lp_stride", lambda v: v == DEPTH_OVER_NE or (isinstance(v, int) and v >= 0),
             f"an int >= 1, 0 (one LP for all layers) or '{DEPTH_OVER_NE}'"),
            ("routing", lambda v: v in ROUTING_MODES, f"one of {ROUTING_MODES}"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
            ("scale", lambda v: isinstance(v, (int, float)), "a number"),
        ):
            value = getattr(self, key)
            for v in value.values() if isinstance(value, Mapping) else [value]:
                if isinstance(v, bool) or not check(v):
                    raise LilyConfigError(f"method.{key} must be {what}, got {v!r}")
