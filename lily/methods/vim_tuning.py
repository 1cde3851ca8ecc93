"""MambaPEFT's partial tuning on Vision Mamba (spec baselines-vim.md 3.3, 3.4).

``vim_delta_tuning`` (``param``: A, D, conv1d or bias): a zero-initialised delta beside a frozen
tensor of every mixer, separately for the forward and the backward branch ("v2", the released
configs):

* A: ``A = -exp(A_log + dA)`` (``A_log``, ``A_b_log``);
* D: ``D + dD`` (``D``, ``D_b``);
* conv1d: ``conv weight + dW`` (``conv1d.weight``, ``conv1d_b.weight``; the conv bias is not tuned);
* bias: the dt projection's bias ``+ db``, added before the softplus (``dt_proj.bias``,
  ``dt_proj_b.bias``).

``vim_token_tuning`` (``which``: cls or pos): zero-initialised deltas on the model's
``cls_token`` (added before the middle insertion) or ``pos_embed``.

Each delta is a :mod:`torch.nn.utils.parametrize` parametrization of the frozen tensor, so
every read of ``mixer.A_log``, ``conv1d.weight``, ``dt_proj.bias``, ``model.cls_token``... returns
the effective tensor: the PyTorch and the CUDA kernel paths of ``models/vim.py`` read these through
the module on every forward. The dt projection is first wrapped by :class:`lily.AdaptedLinear`
(the mixer calls it with ``include_bias=False`` and gives ``.bias`` to the scan). The delta
parameter is named ``delta_<param>`` (e.g. ``layers.0.mixer.parametrizations.A_log.0.delta_A``),
which the per-parameter decay rules (``decay_mult``) match by substring. All merge (the delta is
added to the frozen tensor) and start as the identity.

``form: original`` is MambaPEFT's "v1": the original tensors are unfrozen instead (for conv1d,
weight and bias), as the released step-1 hybrid search does for the bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import LilyConfigError
from ..layers import AdaptedLinear
from ..merging import Mergeable
from ..registry import Method, MethodOptions, register
from .vim_lora import _mixers_or_raise

FORMS = ("delta", "original")


class ZeroDelta(Mergeable, nn.Module):
    """Parametrization ``X -> X + delta`` with ``delta`` zero-initialised (named ``delta_<tag>``).
    Merges by adding the delta to the frozen original; while merged it returns ``X``."""

    def __init__(self, like: torch.Tensor, tag: str):
        super().__init__()
        self.pname = f"delta_{tag}"
        self.register_parameter(self.pname, nn.Parameter(torch.zeros_like(like)))
        self.merged = False

    @property
    def delta(self) -> nn.Parameter:
        return getattr(self, self.pname)

    def forward(self, X):
        return X if self.merged else X + self.delta.to(X.dtype)

    def merge_plan(self):
        original = self.__dict__["_original"]
        return [(original, original.detach() + self.delta.detach().to(original.dtype))]


def add_delta(module: nn.Module, tensor: str, tag: str) -> ZeroDelta:
    """Parametrize ``module.<tensor>`` as ``frozen + delta`` (delta trainable, zero)."""
    if parametrize.is_parametrized(module, tensor):
        raise LilyConfigError(f"{type(module).__name__}.{tensor} already carries a delta (the same tuning twice)")
    original = getattr(module, tensor)
    if not isinstance(original, nn.Parameter):
        raise LilyConfigError(f"{type(module).__name__}.{tensor} is not a parameter")
    delta = ZeroDelta(original, tag)
    parametrize.register_parametrization(module, tensor, delta)
    delta.__dict__["_original"] = module.parametrizations[tensor].original
    return delta


def _dt_proj(mixer: nn.Module, attr: str) -> nn.Module:
    lin = getattr(mixer, attr)
    if not isinstance(lin, AdaptedLinear):     # the mixer calls it with include_bias=False
        lin = AdaptedLinear(lin)
        setattr(mixer, attr, lin)
    if lin.bias is None:
        raise LilyConfigError(f"{attr} has no bias to tune")
    return lin


def _tensors(mixer: nn.Module, param: str, form: str):
    """(owner module, tensor name) of ``param``, forward branch first, then backward."""
    if param == "A":
        pairs = [(mixer, "A_log"), (mixer, "A_b_log")]
    elif param == "D":
        pairs = [(mixer, "D"), (mixer, "D_b")]
    elif param == "conv1d":
        convs = [c for c in (mixer.conv1d, getattr(mixer, "conv1d_b", None)) if c is not None]
        pairs = [(c, "weight") for c in convs] + ([(c, "bias") for c in convs] if form == "original" else [])
    else:
        pairs = [(_dt_proj(mixer, a), "bias") for a in ("dt_proj", "dt_proj_b")
                 if isinstance(getattr(mixer, a, None), nn.Linear)]
    return [(m, t) for m, t in pairs if getattr(m, t, None) is not None]


DELTA_PARAMS = ("A", "D", "conv1d", "bias")
TOKENS = ("cls", "pos")


@dataclass
class VimDeltaTuningOptions(MethodOptions):
    """``param``: A, D, conv1d or bias; ``form``: delta (v2, default) or original (v1)."""
    name: str = "vim_delta_tuning"
    param: str = "A"
    form: str = "delta"

    def validate(self):
        if self.param not in DELTA_PARAMS:
            raise LilyConfigError(f"method.param must be one of {list(DELTA_PARAMS)}, got {self.param!r}")
        if self.form not in FORMS:
            raise LilyConfigError(f"method.form must be one of {list(FORMS)}, got {self.form!r}")


@register
class VimDeltaTuning(Method):
    name = "vim_delta_tuning"

    def label(self, opts, method_id=None):
        return {"A": "A-tuning", "D": "D-tuning", "conv1d": "Conv1d-tuning", "bias": "Bias-tuning"}.get(
            opts.get("param"), f"{opts.get('param')}-tuning")

    options = VimDeltaTuningOptions
    mergeable = True
    source = "MambaPEFT (Yoshimura et al., ICLR 2025): learnable_{A,D,conv1d,bias}(_v2)"
    # MambaPEFT's custom keys (CFG/3_small_learnable_*_v2_wd_x{10,100}): wd x10 on the A, D and conv1d
    # deltas, x100 on the dt-bias delta; keyed by parameter-name substring
    decay_mult: dict[str, float] = {"delta_A": 10.0, "delta_D": 10.0, "delta_conv1d": 10.0, "delta_bias": 100.0}

    def apply(self, model, opts: VimDeltaTuningOptions):
        for mixer in _mixers_or_raise(model, f"method vim_delta_tuning (param '{opts.param}')"):
            for module, tensor in _tensors(mixer, opts.param, opts.form):
                if opts.form == "original":
                    getattr(module, tensor).requires_grad_(True)
                else:
                    add_delta(module, tensor, opts.param)


@dataclass
class VimTokenTuningOptions(MethodOptions):
    """``which``: cls (the cls token) or pos (the position embedding)."""
    name: str = "vim_token_tuning"
    which: str = "cls"

    def validate(self):
        if self.which not in TOKENS:
            raise LilyConfigError(f"method.which must be one of {list(TOKENS)}, got {self.which!r}")


@register
class VimTokenTuning(Method):
    name = "vim_token_tuning"

    def label(self, opts, method_id=None):
        return {"cls": "CLS-token tuning", "pos": "Pos-embed tuning"}.get(opts.get("which"), "token tuning")

    options = VimTokenTuningOptions
    mergeable = True
    source = "MambaPEFT (Yoshimura et al., ICLR 2025): learnable_cls_token / learnable_pos_embed"
    # no released standalone config: the base rules apply (both deltas are >= 2-D: wd 1e-4)
    decay_mult: dict[str, float] = {}

    def apply(self, model, opts: VimTokenTuningOptions):
        tensor = {"cls": "cls_token", "pos": "pos_embed"}[opts.which]
        owners = [m for m in model.modules() if isinstance(m._parameters.get(tensor), nn.Parameter)
                  or (parametrize.is_parametrized(m, tensor))]
        if len(owners) != 1:
            raise LilyConfigError(f"method vim_token_tuning (which '{opts.which}') needs one module with a "
                                  f"'{tensor}' parameter; {type(model).__name__} has {len(owners)}")
        add_delta(owners[0], tensor, opts.which)
