"""Helpers on an adapted model: counting, expert weights, trainable state, merging."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .attach import _head_parameters, adapt, lily_adapters
from .errors import LilyConfigError
from .layers import LPMixture
from .registry import MethodOptions, get_method, method_config

FORMAT = "lily-trainable-v1"


def _config(model: nn.Module) -> MethodOptions:
    cfg = getattr(model, "lily_config", None)
    if cfg is None:
        raise LilyConfigError("the model has not been adapted (call lily.adapt(model, cfg) first)")
    return cfg


def _head_names(model: nn.Module) -> set[str]:
    return set(_head_parameters(model, _config(model)))


def count_parameters(model: nn.Module, trainable_only: bool = True, exclude_head: bool = True) -> int:
    """Parameters (shared ones counted once); by default the paper's Params column:
    trainable parameters excluding the classification head."""
    head = _head_names(model) if exclude_head else set()
    return sum(p.numel() for n, p in model.named_parameters()
               if (p.requires_grad or not trainable_only) and n not in head)


def head_parameters(model: nn.Module) -> int:
    head = _head_names(model)
    return sum(p.numel() for n, p in model.named_parameters() if n in head)


@torch.no_grad()
def expert_weights(model: nn.Module, cpu: bool = True) -> dict[str, torch.Tensor]:
    """Each layer's current expert weights per Lily target kind: ``{kind: (L, N_e)}``, and
    for Lily v2 also the LP routers' weights ``{f"{kind}.lp": (L, N_a)}``.

    For data-dependent routing these are the mean routing weights of the last forward
    pass (run a batch first; NaN before any); static and uniform weights do not depend on data.
    ``cpu=False`` leaves them on the model's device (no host synchronisation).
    """
    def rows(modules, n):
        out = []
        for m in modules:
            if m.routing in ("static", "uniform"):
                out.append(m.fixed_weights().float())
            elif m.last_weights is not None:
                out.append(m.last_weights.float())
            else:
                out.append(None)
        dev = next((r.device for r in out if r is not None), torch.device("cpu"))
        stacked = torch.stack([r.to(dev) if r is not None else torch.full((n,), float("nan"), device=dev) for r in out])
        return stacked.cpu() if cpu else stacked

    out = {}
    for kind, layer_adapters in lily_adapters(model).items():
        out[kind] = rows(layer_adapters, layer_adapters[0].bank.ne)
        if isinstance(layer_adapters[0].lp, LPMixture):
            out[f"{kind}.lp"] = rows([a.lp for a in layer_adapters], layer_adapters[0].lp.bank.na)
    return out


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only (adapters + head; shared parameters stored once)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write the trainable state with the method config, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "method": _config(model).to_dict(), "state": trainable_state_dict(model),
               "extra": extra or {}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_trainable(path: str | os.PathLike) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LilyConfigError(f"{path} is not a Lily trainable-state file ({FORMAT})")
    return payload


def load_trainable(model: nn.Module, path_or_payload, strict: bool = True) -> nn.Module:
    """Load a trainable state; adapts ``model`` with the stored method first if it is not adapted."""
    payload = path_or_payload if isinstance(path_or_payload, dict) else read_trainable(path_or_payload)
    stored = method_config(payload["method"])
    if getattr(model, "lily_config", None) is None:
        adapt(model, stored)
    elif model.lily_config.to_dict() != stored.to_dict():
        raise LilyConfigError(f"the model was adapted with {model.lily_config} but the file holds {stored}")
    params = dict(model.named_parameters())
    state = payload["state"]
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if strict and (missing or unknown):
        raise LilyConfigError(f"trainable state mismatch: missing {missing[:5]}, unexpected {unknown[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            if n in params:
                params[n].copy_(t)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the method into the frozen weights (outputs unchanged up to float rounding).

    Dispatches to the method (``lily.registered()[name].merge``). Raises :class:`MergeError`
    and changes nothing when the method, or any of its adapters, cannot merge (data-dependent
    routing, a non-linear hidden layer, extra tokens...). ``full`` and ``linear`` merge trivially.
    """
    cfg = _config(model)
    get_method(cfg.name).merge(model, cfg)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: the frozen weights are restored bit for bit."""
    cfg = _config(model)
    get_method(cfg.name).unmerge(model, cfg)
    return model
