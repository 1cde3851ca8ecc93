"""Methods that are PEFT's own (``peft`` tuners applied to the model in place), behind the project's API.

The PEFT tuner replaces each target Linear by its own layer (``<name>.base_layer`` holds the frozen
Linear; the adapter tensors sit beside it); the timm model stays the same object, with its own
forward. ``lily.count_parameters``, ``save_trainable``/``load_trainable`` see PEFT's parameters as any
others. Merging goes through PEFT's own layer ``merge(safe_merge=True)``, made safe for the whole
model here: the frozen tensors of every layer are saved first; if any layer refuses, every layer
already merged is restored (nothing changes); unmerge restores the saved originals bit for bit
(PEFT's own unmerge subtracts the delta again, which is not bit-exact in floating point).

``peft`` is imported lazily: ``lily`` imports without it.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..attach import find_sites
from ..errors import LilyConfigError, MergeError
from ..registry import Method

PEFT_PIN = "peft==0.21.2"


def require_peft(method: str):
    try:
        import peft
    except ImportError:
        raise LilyConfigError(f"method '{method}' is PEFT's own and needs the peft package "
                              f"(pip install {PEFT_PIN})") from None
    return peft


def linear_names(model: nn.Module, targets, method: str) -> list[str]:
    """Qualified names of every ``nn.Linear`` whose attribute name is one of ``targets``, in model order.

    Only Linears match, so ``proj`` never picks up ViT's ``patch_embed.proj`` (a Conv2d): the pitfall of
    PEFT's suffix matching (spec section 8). q, k and v slices of timm's fused qkv are not Linears.
    """
    for t in targets:
        if t in ("q", "k", "v"):
            raise LilyConfigError(
                f"method '{method}' wraps whole Linear layers (PEFT); timm's q, k and v are slices of the fused "
                f"'qkv' Linear: use targets [qkv] (PEFT adapts the whole fused qkv)")
    ids = {id(getattr(s.parent, s.attr)) for t in targets for s in find_sites(model, t)}
    names = [n for n, m in model.named_modules() if id(m) in ids]
    missing = [t for t in targets if not find_sites(model, t)]
    if missing:
        raise LilyConfigError(f"method '{method}': no nn.Linear named {missing} in {type(model).__name__}")
    return names


def exact_pattern(names: list[str]) -> str:
    """A regex PEFT full-matches against module names: exactly these modules."""
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def inject(tuner_cls, model: nn.Module, config) -> None:
    """Apply a PEFT tuner to ``model`` in place (the tuner object itself is not kept: its layers live in
    the model, shared state such as VeRA's projections included)."""
    tuner_cls(model, config, adapter_name="default")
    model.__dict__.pop("peft_config", None)   # the tuner's bookkeeping; the model's options are lily_config


def _restore(layer: nn.Module, originals) -> None:
    with torch.no_grad():
        for p, original in originals:
            p.data = original.to(p.device)
    layer.merged_adapters.clear()
    getattr(layer, "_caches", {}).clear()


class PeftMethod(Method):
    """A method built by a PEFT tuner; merge/unmerge through PEFT's layers, safely."""

    def merge(self, model, opts):
        if self.mergeable is not True:
            raise MergeError(f"method '{self.name}' cannot be merged: {self.mergeable}")
        layers = [m for m in tuner_layers(model) if not m.merged]
        done = []
        try:
            for layer in layers:
                base = layer.get_base_layer()
                originals = [(p, p.data.clone()) for p in (base.weight, getattr(base, "bias", None)) if p is not None]
                done.append((layer, originals))
                layer.merge(safe_merge=True)     # PEFT checks its result on a copy (non-finite -> ValueError)
                layer._lily_originals = originals
        except Exception as e:
            for layer, originals in reversed(done):
                _restore(layer, originals)
                layer.__dict__.pop("_lily_originals", None)
            raise MergeError(f"method '{self.name}': PEFT refused to merge ({e}); nothing was changed") from e

    def unmerge(self, model, opts):
        for layer in reversed(tuner_layers(model)):
            originals = layer.__dict__.pop("_lily_originals", None)
            if originals is not None:
                _restore(layer, originals)
