"""MambaPEFT's LoRA family and DoRA on Vision Mamba mixers (spec baselines-vim.md 3.1, 3.2).

One registered method, ``vim_lora``, with one ``target`` per use (compose several with the
``compose`` method):

========== ========================================== ======= ===================
target     rows of which weight                       f / b   form (authors' code)
========== ========================================== ======= ===================
in_proj    in_proj, all 2E rows (x and z)             shared  activation, dropout
X, Z       in_proj rows [0:E] / [E:2E]                shared  activation, dropout
out_proj   out_proj (input: o after the /2)           shared  activation, dropout
x_proj     x_proj and x_proj_b, all R+2N rows         apart   weight form
d, B, C    x_proj(_b) rows [0:R] / [R:R+N] / [R+N:]   apart   weight form
dt         dt_proj and dt_proj_b weight (bias kept)   apart   weight form
embed      the patch-embedding conv                   n/a     activation, dropout
========== ========================================== ======= ===================

``s * up(Dropout(down(x)))`` with ``down`` kaiming-uniform, ``up`` zero-initialised, no biases,
``s = 0.1`` (a constant, not alpha/r; ``s = 1`` for the patch embedding). The activation form has
dropout 0.1 on the rank-r bottleneck; the weight form ``W + s W_up W_down`` has none (it equals
the activation form without dropout). The Linears are wrapped by :class:`lily.AdaptedLinear`
(output-row slices for X/Z/d/B/C), so both the PyTorch and the CUDA kernel paths of the mixer see
the adapted projections; the patch embedding by :class:`AdaptedConv2d`. All merge:
``W <- W + s W_up W_down``.

DoRA (``dora: true``; MambaPEFT's ``DoRAAdapter``): magnitude ``m = ||W||_2`` over dim 0, one
norm per *input* column (shape (1, in)); ``W' = m (W + s W_up W_down) / ||W + s W_up W_down||_col``
with the denominator detached, no dropout, applied as ``F.linear(x, W' - W)``; merges to ``W'``.
The released code takes the backward adapters' magnitude of the x_proj sub-blocks (d, B, C) from
the *forward* ``x_proj`` weight, so the backward branch is not the identity at init; the default
here takes it from ``x_proj_b`` (``dora_b_magnitude: backward``), the released behaviour is
``dora_b_magnitude: forward_released``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attach import Site, attach
from ..errors import LilyConfigError
from ..layers import Adapter, _down_up
from ..merging import Mergeable
from ..registry import Method, MethodOptions, register
from .lora import LoRAAdapter

ACTIVATION_FORM = ("in_proj", "X", "Z", "out_proj", "embed")
WEIGHT_FORM = ("x_proj", "d", "B", "C", "dt")
TARGETS = ACTIVATION_FORM + WEIGHT_FORM
DORA_B_MAGNITUDE = ("backward", "forward_released")


def vim_mixers(model: nn.Module) -> list[nn.Module]:
    """The Mamba mixers of a model, in model order: modules with ``in_proj`` (Linear), ``x_proj``,
    ``dt_proj`` and ``A_log``."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "in_proj", None), nn.Linear) and isinstance(getattr(m, "x_proj", None), nn.Linear)
            and isinstance(getattr(m, "dt_proj", None), nn.Linear) and hasattr(m, "A_log")]


def _mixers_or_raise(model: nn.Module, what: str) -> list[nn.Module]:
    mixers = vim_mixers(model)
    if not mixers:
        raise LilyConfigError(f"{what} needs a Vision Mamba model (mixers with in_proj, x_proj, dt_proj and "
                              f"A_log); {type(model).__name__} has none")
    return mixers


def _rows(mixer: nn.Module, target: str, attr: str) -> tuple[int, int]:
    """The output-row slice of ``mixer.<attr>`` adapted by ``target``."""
    out = getattr(mixer, attr).out_features
    if target in ("X", "Z"):
        e = out // 2
        return (0, e) if target == "X" else (e, out)
    if target in ("d", "B", "C"):
        R, N = mixer.dt_rank, mixer.d_state
        if R + 2 * N != out:
            raise LilyConfigError(f"target '{target}': x_proj has {out} rows, expected dt_rank + 2 d_state = "
                                  f"{R + 2 * N}")
        return {"d": (0, R), "B": (R, R + N), "C": (R + N, R + 2 * N)}[target]
    return 0, out


_ATTRS = {"in_proj": ("in_proj",), "X": ("in_proj",), "Z": ("in_proj",), "out_proj": ("out_proj",),
          "x_proj": ("x_proj", "x_proj_b"), "d": ("x_proj", "x_proj_b"), "B": ("x_proj", "x_proj_b"),
          "C": ("x_proj", "x_proj_b"), "dt": ("dt_proj", "dt_proj_b")}


class DoRAAdapter(Adapter):
    """MambaPEFT's DoRA on one output-row slice ``[start:stop]`` of a frozen Linear.

    ``delta(x) = F.linear(x, W' - W)`` with ``W' = V * (m / ||V||_col.detach())``,
    ``V = W + s W_up W_down`` and ``m`` initialised to ``||W_src||_col`` (``W_src`` = the
    slice's own frozen weight, or, for the released behaviour, another Linear's). Written as
    ``V * (m / norm)`` so that, at init, ``m / norm`` is exactly 1 and the change exactly zero.
    """

    def __init__(self, base: nn.Linear, start: int, stop: int, rank: int, scale: float,
                 magnitude_from: nn.Linear | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scale = base.in_features, stop - start, float(scale)
        self.start, self.stop = start, stop
        self.__dict__["_base"] = base          # not a submodule: the frozen Linear this slice belongs to
        self.lora_a, self.lora_b = _down_up(self.in_features, rank, self.out_features, False)
        src = (magnitude_from if magnitude_from is not None else base).weight[start:stop]
        self.magnitude = nn.Parameter(src.detach().float().norm(p=2, dim=0, keepdim=True).to(src.dtype))

    def _frozen(self) -> torch.Tensor:
        return self._base.weight[self.start:self.stop]

    def directed(self, weight: torch.Tensor) -> torch.Tensor:
        """``W'`` for the frozen slice ``weight``."""
        v = weight + self.scale * (self.lora_b.weight @ self.lora_a.weight).to(weight.dtype)
        norm = v.norm(p=2, dim=0, keepdim=True).detach()
        return v * (self.magnitude.to(v.dtype) / norm)

    def forward(self, x):
        w = self._frozen()
        return F.linear(x, (self.directed(w) - w).to(x.dtype))

    def merged_slice(self, weight, bias):
        return self.directed(weight), bias


class AdaptedConv2d(Mergeable, nn.Conv2d):
    """A frozen ``nn.Conv2d`` (same weight and bias Parameters, so state-dict names are unchanged)
    plus MambaPEFT's patch-embedding LoRA: ``conv(x) + s * up(Dropout(down(x)))`` with
    ``down`` = Conv2d(in -> r) of the conv's own kernel and stride, no bias (PyTorch default init),
    ``up`` = 1x1 Conv2d(r -> out), zero-initialised. Merges to ``W + s * up @ down``."""

    def __init__(self, base: nn.Conv2d, rank: int, scale: float, dropout: float):
        nn.Module.__init__(self)
        if base.groups != 1 or base.padding_mode != "zeros" or base.dilation != (1, 1):
            raise LilyConfigError("target 'embed' needs a plain patch-embedding Conv2d (groups 1, dilation 1)")
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(self, k, getattr(base, k))
        self.weight, self.bias = base.weight, base.bias
        self.scale = float(scale)
        self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self._conv_forward(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.scale * self.lora_up(self.dropout(self.lora_down(x)))

    def merge_plan(self):
        r = self.lora_down.out_channels
        dw = self.lora_up.weight.reshape(self.out_channels, r) @ self.lora_down.weight.reshape(r, -1)
        return [(self.weight, self.weight.detach() + (self.scale * dw).reshape(self.weight.shape).to(self.weight.dtype))]


@dataclass
class VimLoRAOptions(MethodOptions):
    """``target``: one of in_proj, X, Z, out_proj, x_proj, d, B, C, dt, embed. ``scale``/``dropout``
    None: the authors' values (s 0.1, or 1 on embed; dropout 0.1 on the activation-form targets, 0 on
    the weight-form ones)."""
    name: str = "vim_lora"
    target: str = "in_proj"
    rank: int = 32
    scale: Optional[float] = None
    dropout: Optional[float] = None
    dora: bool = False
    dora_b_magnitude: str = "backward"

    def validate(self):
        if self.target not in TARGETS:
            raise LilyConfigError(f"method.target must be one of {list(TARGETS)}, got {self.target!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LilyConfigError(f"method.rank must be a positive int, got {self.rank!r}")
        if self.scale is not None and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))):
            raise LilyConfigError(f"method.scale must be a number or null, got {self.scale!r}")
        if self.dropout is not None and (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                                         or not 0 <= self.dropout < 1):
            raise LilyConfigError(f"method.dropout must be in [0, 1) or null, got {self.dropout!r}")
        if not isinstance(self.dora, bool):
            raise LilyConfigError(f"method.dora must be true or false, got {self.dora!r}")
        if self.dora_b_magnitude not in DORA_B_MAGNITUDE:
            raise LilyConfigError(f"method.dora_b_magnitude must be one of {list(DORA_B_MAGNITUDE)}, "
                                  f"got {self.dora_b_magnitude!r}")
        if self.dora and self.target == "embed":
            raise LilyConfigError("method.dora: DoRA on the patch embedding (target 'embed') is not implemented; "
                                  "use a Linear target")
        if self.dora and self.dropout:
            raise LilyConfigError("method.dropout: MambaPEFT's DoRA has no dropout (leave dropout null or 0)")

    def resolved_scale(self) -> float:
        return float(self.scale) if self.scale is not None else (1.0 if self.target == "embed" else 0.1)

    def resolved_dropout(self) -> float:
        if self.dropout is not None:
            return float(self.dropout)
        return 0.1 if self.target in ACTIVATION_FORM and not self.dora else 0.0


@register
class VimLoRA(Method):
    name = "vim_lora"
    TITLES = {"in_proj": "LoRA(in_proj)", "out_proj": "LoRA(out_proj)", "x_proj": "LoRA(x_proj)",
              "dt": "LoRA(dt_proj)", "embed": "LoRA(embed)", "X": "LoRAp(X)", "Z": "LoRAp(Z)", "d": "LoRAp(d)",
              "B": "LoRAp(B)", "C": "LoRAp(C)"}

    def label(self, opts, method_id=None):
        base = self.TITLES.get(opts.get("target"), f"LoRA({opts.get('target')})")
        return f"DoRA on {base}" if opts.get("dora") else base

    options = VimLoRAOptions
    mergeable = True
    source = "MambaPEFT (Yoshimura et al., ICLR 2025), sony/MambaPEFT vim_peft_all.py Adapter / DoRAAdapter"
    decay_mult: dict[str, float] = {}     # MambaPEFT's LoRA configs: lr_mult = decay_mult = 1

    def apply(self, model, opts: VimLoRAOptions):
        s, p = opts.resolved_scale(), opts.resolved_dropout()
        if opts.target == "embed":
            convs = [m for m in model.modules() if isinstance(getattr(m, "proj", None), nn.Conv2d)
                     and type(m).__name__ == "PatchEmbed"]
            if len(convs) != 1:
                raise LilyConfigError(f"target 'embed' needs one PatchEmbed module with a Conv2d 'proj'; found {len(convs)}")
            pe = convs[0]
            if isinstance(pe.proj, AdaptedConv2d):
                raise LilyConfigError("target 'embed': the patch embedding already carries a LoRA")
            pe.proj = AdaptedConv2d(pe.proj, opts.rank, s, p)
            return
        kind = f"vim_lora_{opts.target}"
        for mixer in _mixers_or_raise(model, f"method vim_lora (target '{opts.target}')"):
            attrs = [a for a in _ATTRS[opts.target] if isinstance(getattr(mixer, a, None), nn.Linear)]
            for attr in attrs:
                lin = getattr(mixer, attr)
                if kind in getattr(lin, "adapters", {}):
                    raise LilyConfigError(f"{attr} already carries a '{kind}' adapter (the same target twice)")
                start, stop = _rows(mixer, opts.target, attr)
                site = Site(kind, opts.target, mixer, attr, lin.in_features, stop - start, start, stop)
                if opts.dora:
                    src = None
                    if (opts.dora_b_magnitude == "forward_released" and attr == "x_proj_b"
                            and opts.target in ("d", "B", "C")):
                        src = mixer.x_proj          # the released code's backward magnitude (a defect)
                    adapter = DoRAAdapter(lin, start, stop, opts.rank, s, magnitude_from=src)
                else:
                    adapter = LoRAAdapter(lin.in_features, stop - start, opts.rank, s, p)
                attach(site, adapter)
                if opts.dora:   # read the frozen weight through the wrapper (it holds the same Parameter)
                    adapter.__dict__["_base"] = getattr(mixer, attr)
