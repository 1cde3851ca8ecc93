"""Lily (paper eq. 3-5, Alg. 1-2) and Lily v2, as a registered method.

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

Merging: static and uniform routing with an identity LP activation fold into the frozen
Linear; data-dependent routing and the ReLU ``ffn`` adapter refuse (nothing changes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..attach import Site, attach_per_kind
from ..config import ACTIVATIONS, DEPTH_OVER_NE, ROUTER_INITS, ROUTING_MODES
from ..errors import LilyConfigError
from ..layers import HPBank, LilyAdapter, LPBank, LPMixture, make_router
from ..registry import Method, MethodOptions, register


@dataclass
class LilyOptions(MethodOptions):
    name: str = "lily"
    targets: list = field(default_factory=lambda: ["q", "v"])
    rank: Any = 32                 # d: int or {target: int}
    ne: Any = 4                    # N_e, number of HP experts per target kind
    lp_experts: Any = 0            # N_a, LP experts per target kind with an LP router (Lily v2); 0: off
    scale: Any = 1.0               # s
    routing: Any = "batch"         # batch | sample | token | static | uniform
    router_init: str = "paper"     # paper: normal(1, 0.01); default: PyTorch Linear init
    lp_stride: Any = 1             # k consecutive layers share one LP; 0: one LP for all layers; "depth//ne"
    dropout: Any = 0.0             # dropout on the LP output
    bias: Any = False              # biases in the projectors (DeltaFit / DeltaInFit)
    shared_router: Any = False     # one router per target kind for the whole model (authors' Vim code)
    ffn_act: str = "relu"          # hidden activation of the parallel FFN adapter

    per_target = ("rank", "ne", "lp_experts", "scale", "routing", "lp_stride", "dropout", "bias", "shared_router")

    def validate(self):
        if not self.targets:
            raise LilyConfigError(f"method '{self.name}' needs at least one target (method.targets)")
        if self.router_init not in ROUTER_INITS:
            raise LilyConfigError(f"router_init must be one of {ROUTER_INITS}, got '{self.router_init}'")
        if self.ffn_act not in ACTIVATIONS:
            raise LilyConfigError(f"ffn_act must be one of {ACTIVATIONS}, got '{self.ffn_act}'")
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("ne", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("lp_experts", lambda v: isinstance(v, int) and v >= 0, "an int >= 1 (Lily v2) or 0 (off)"),
            ("lp_stride", lambda v: v == DEPTH_OVER_NE or (isinstance(v, int) and v >= 0),
             f"an int >= 1, 0 (one LP for all layers) or '{DEPTH_OVER_NE}'"),
            ("routing", lambda v: v in ROUTING_MODES, f"one of {ROUTING_MODES}"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
            ("scale", lambda v: isinstance(v, (int, float)), "a number"),
        ))


def lp_stride(value, n_layers: int, ne: int) -> int:
    """How many consecutive layers share one LP: ``k``; ``0`` -> all ``n_layers``;
    ``"depth//ne"`` -> ``max(1, n_layers // ne)`` (the authors' ViT code)."""
    if value == DEPTH_OVER_NE:
        return max(1, n_layers // ne)
    return value or n_layers


def build_lily(cfg: LilyOptions, sites: list[Site]) -> list[LilyAdapter]:
    """One target kind's adapters: per-layer (or strided, or v2-mixed) LPs, one shared HP bank."""
    kind = sites[0].kind
    get = cfg.getter(sites[0])
    d, ne, routing = get("rank"), get("ne"), get("routing")
    stride = lp_stride(get("lp_stride"), len(sites), ne)
    bias, shared_router = bool(get("bias")), bool(get("shared_router"))
    if routing in ("static", "uniform") and shared_router:
        raise LilyConfigError(f"target '{kind}': shared_router needs a data-dependent routing mode, not '{routing}'")
    act = cfg.ffn_act if sites[0].parallel else "identity"
    router = make_router(d, ne, routing, cfg.router_init) if shared_router else None
    bank = HPBank(ne, d, sites[0].out_features, bias=bias, router=router)
    na, din = get("lp_experts"), sites[0].in_features
    if na:  # Lily v2: a model-wide LP bank mixed by an LP router per layer
        if get("lp_stride") != 1:
            raise LilyConfigError(
                f"target '{kind}': lp_stride={get('lp_stride')!r} has no meaning with lp_experts={na} "
                "(Lily v2 mixes one model-wide LP bank in every layer); leave lp_stride at 1 or set lp_experts=0")
        lp_router = make_router(din, na, routing, cfg.router_init) if shared_router else None
        lp_bank = LPBank(na, din, d, bias=bias, router=lp_router)
    lps: list[nn.Module] = []
    adapters = []
    for layer, site in enumerate(sites):
        if na:
            lps.append(LPMixture(lp_bank, None if shared_router else make_router(din, na, routing, cfg.router_init),
                                 routing))
        elif layer % stride == 0:
            lps.append(nn.Linear(site.in_features, d, bias=bias))
        layer_router = None if shared_router else make_router(d, ne, routing, cfg.router_init)
        adapters.append(LilyAdapter(lps[-1], bank, layer_router, routing, scale=get("scale"),
                                    dropout=get("dropout"), act=act))
    return adapters


@register
class Lily(Method):
    name = "lily"
    options = LilyOptions
    mergeable = "only with static or uniform routing and no ffn target (data-dependent routing; ReLU hidden layer)"
    source = "Lily (Zhong et al.), released code yibozhong/lily"

    def apply(self, model, opts: LilyOptions):
        attach_per_kind(model, opts.targets, lambda sites: build_lily(opts, sites))

    def merge(self, model, opts):
        from ..merging import safe_merge
        safe_merge(model)   # each adapter refuses (MergeError) when its routing depends on the data
