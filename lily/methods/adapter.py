"""The bottleneck "Adapter" as run on VTAB, in its Houlsby and Pfeiffer placements
(spec baselines-vit.md section 7).

One adapter ``A(y) = y + s * up(dropout(act(down(y))))`` (down: dim -> d, up: d -> dim, both with
bias) follows a sub-layer of every timm pre-norm ``Block``:

- ``adapter_houlsby``: after the attention and after the MLP (PETL_Vision ``rand_h_adapter``);
- ``adapter_pfeiffer``: after the MLP only (NOAH's "Adapter 0.16M"; PETL_Vision ``rand_p``;
  VPT/V-PETL ``ADPT_Block``).

Where the adapter sits relative to the block's layer scale and drop-path (``drop_path``):

- ``once`` (default): ``x = x + drop_path(ls(A(f(norm(x)))))``; the adapter reads the sub-layer
  output and everything after it is the block's own. This is the working form of PETL_Vision's
  ``sequential_after`` and, for ViT-B (``ls`` = Identity), of VPT/V-PETL's
  ``m = ls2(mlp(norm2(x))); m = m + adapter(m); x = x + drop_path2(m)``.
- ``twice_released``: PETL_Vision's released ``sequential_after`` as written:
  ``y = drop_path(ls(f(norm(x)))); x = x + drop_path(ls(A(y)))``: layer scale and drop-path are
  applied twice (two independent drop-path masks while training). Kept only to reproduce it.
- ``outside``: NOAH's ``x = x + A(drop_path(ls(f(norm(x)))))``: the adapter reads the drop-pathed
  output (same as ``once`` in eval mode, different while training with drop-path).

Initialisation (``init``):

- ``xavier`` (default; NOAH and PETL_Vision ``xavier``): both weights ``xavier_uniform_``, both
  biases ``normal_(std=1e-6)``. The adapted model is *not* the frozen model at init.
- ``lora_xavier`` (PETL_Vision ``lora_xavier``): down ``xavier_uniform_``, up and both biases zero
  (the adapted model equals the frozen one at init).
- ``zero_released`` (VPT ``ADPT_Block`` and V-PETL as released): all four tensors zero. This is
  broken: ``down(y) = 0`` for every input, so the gradients of ``up.weight``, ``down.weight`` and
  ``down.bias`` are exactly zero forever and only ``up.bias`` ever trains: the adapter is a learned
  bias on the sub-layer output. Kept as an explicit option to reproduce the released code.

Activations: ``relu`` (PETL_Vision), ``quick_gelu`` (NOAH: ``x * sigmoid(1.702 x)``), ``gelu``
(VPT/V-PETL). Per adapter ``1537 d + 768`` parameters on ViT-B (d=8: Houlsby 313,536, Pfeiffer
156,768). Not mergeable (non-linear hidden layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import LilyConfigError
from ..layers import Adapter
from ..registry import Method, MethodOptions, register

ADAPTER_ACTS = ("relu", "gelu", "quick_gelu")
ADAPTER_INITS = ("xavier", "lora_xavier", "zero_released")
DROP_PATH_MODES = ("once", "twice_released", "outside")
# sub-layer -> (its layer-scale, its drop-path) attribute names on a timm Block
_SUBLAYERS = {"attn": ("ls1", "drop_path1"), "mlp": ("ls2", "drop_path2")}


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (NOAH's adapter activation, from CLIP)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "gelu": nn.GELU, "quick_gelu": QuickGELU}[name]()


class SequentialAdapter(Adapter):
    """The bottleneck ``s * up(dropout(act(down(y))))``; the hook adds it to ``y`` (``A(y) = y + this``)."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 1.0, act: str = "relu", dropout: float = 0.0,
                 init: str = "xavier"):
        super().__init__()
        self.in_features = self.out_features = dim
        self.scale = float(scale)
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.act = _act(act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "xavier":
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.xavier_uniform_(self.up.weight)
            nn.init.normal_(self.down.bias, std=1e-6)
            nn.init.normal_(self.up.bias, std=1e-6)
        elif init == "lora_xavier":
            nn.init.xavier_uniform_(self.down.weight)
            for t in (self.up.weight, self.down.bias, self.up.bias):
                nn.init.zeros_(t)
        elif init == "zero_released":
            for t in (self.down.weight, self.up.weight, self.down.bias, self.up.bias):
                nn.init.zeros_(t)
        else:  # validated by the options
            raise LilyConfigError(f"adapter init must be one of {ADAPTER_INITS}, got '{init}'")

    def forward(self, y):
        return self.scale * self.up(self.dropout(self.act(self.down(y))))


def _adapter_hook(module: nn.Module, args, output):
    """Forward hook on a sub-layer (``once``/``twice_released``) or its drop-path (``outside``)."""
    block, kind, mode = module.__dict__["_adapter_site"]
    if mode == "twice_released":
        ls, dp = (getattr(block, n) for n in _SUBLAYERS[kind])
        output = dp(ls(output))
    return output + block.adapters[kind](output)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """timm pre-norm Blocks (``attn``, ``mlp``, ``ls1/ls2``, ``drop_path1/drop_path2``) in model order."""
    names = ("attn", "mlp") + tuple(n for pair in _SUBLAYERS.values() for n in pair)
    return [m for m in model.modules() if all(isinstance(getattr(m, n, None), nn.Module) for n in names)]


def _embed_dim(block: nn.Module) -> int:
    lins = [m for m in block.mlp.modules() if isinstance(m, nn.Linear)]
    if not lins:
        raise LilyConfigError("adapter: the block's mlp has no Linear layer to read the embedding width from")
    return lins[-1].out_features


@dataclass
class AdapterOptions(MethodOptions):
    """Options shared by both placements (``targets`` is the placement: the sub-layers followed)."""
    name: str = "adapter_houlsby"
    targets: list = field(default_factory=lambda: ["attn", "mlp"])
    bottleneck: int = 8          # d
    scale: float = 1.0           # s (PETL_Vision searches {0.01, 0.1, 1, 10}; NOAH and VPT: 1)
    act: str = "relu"
    dropout: float = 0.0         # on the bottleneck hidden, after the activation (PETL_Vision: 0.1)
    init: str = "xavier"
    drop_path: str = "once"

    placement: ClassVar[tuple] = ("attn", "mlp")   # the placement this name stands for (not an option)

    def validate(self):
        if sorted(self.targets) != sorted(self.placement):
            raise LilyConfigError(f"method.targets of '{self.name}' must be {list(self.placement)} "
                                  f"(the placement the name stands for), got {self.targets}")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise LilyConfigError(f"method.bottleneck must be a positive int, got {self.bottleneck!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise LilyConfigError(f"method.scale must be a number, got {self.scale!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LilyConfigError(f"method.dropout must be in [0, 1), got {self.dropout!r}")
        for key, allowed in (("act", ADAPTER_ACTS), ("init", ADAPTER_INITS), ("drop_path", DROP_PATH_MODES)):
            if getattr(self, key) not in allowed:
                raise LilyConfigError(f"method.{key} must be one of {allowed}, got {getattr(self, key)!r}")


@dataclass
class HoulsbyOptions(AdapterOptions):
    name: str = "adapter_houlsby"
    targets: list = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class PfeifferOptions(AdapterOptions):
    name: str = "adapter_pfeiffer"
    targets: list = field(default_factory=lambda: ["mlp"])
    placement = ("mlp",)


class _BottleneckAdapterMethod(Method):
    def label(self, opts, method_id=None):
        return f"Adapter-{self.name.split('_')[1].capitalize()} (d={opts.get('bottleneck')})"

    mergeable = "its hidden layer is non-linear (a bottleneck with an activation)"

    def apply(self, model, opts: AdapterOptions):
        blocks = _blocks(model)
        if not blocks:
            raise LilyConfigError(f"'{self.name}' needs timm pre-norm Blocks (attn, mlp, ls1/ls2, "
                                  f"drop_path1/drop_path2); {type(model).__name__} has none")
        for block in blocks:
            if hasattr(block, "adapters"):
                raise LilyConfigError(f"'{self.name}': the block already carries adapters")
            block.adapters = nn.ModuleDict()
            dim = _embed_dim(block)
            for kind in ("attn", "mlp"):
                if kind not in opts.targets:
                    continue
                block.adapters[kind] = SequentialAdapter(dim, opts.bottleneck, opts.scale, opts.act, opts.dropout,
                                                         opts.init)
                site = getattr(block, _SUBLAYERS[kind][1]) if opts.drop_path == "outside" else getattr(block, kind)
                if "_adapter_site" in site.__dict__:
                    raise LilyConfigError(f"'{self.name}': module {type(site).__name__} is shared between sites")
                # a plain reference (not a submodule): the block owns the adapter; deepcopy keeps the link
                site.__dict__["_adapter_site"] = (block, kind, opts.drop_path)
                site.register_forward_hook(_adapter_hook)


@register
class AdapterHoulsby(_BottleneckAdapterMethod):
    name = "adapter_houlsby"
    options = HoulsbyOptions
    source = "Houlsby et al. 2019 as run by OSU-MLB/PETL_Vision (rand_h_adapter)"


@register
class AdapterPfeiffer(_BottleneckAdapterMethod):
    name = "adapter_pfeiffer"
    options = PfeifferOptions
    source = "Pfeiffer et al. 2021 as run by NOAH (ZhangYuanhan-AI/NOAH), PETL_Vision and VPT/V-PETL"
