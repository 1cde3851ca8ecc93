"""Find where a method attaches in a model, build its adapters, freeze the rest.

Targets (``MethodConfig.targets``):

- ``q``, ``k``, ``v``: slices of timm's fused ``attn.qkv`` Linear (first, second, third
  third of its output). Models with separate ``q``/``k``/``v`` Linears fall back to the
  generic rule below.
- ``ffn``: Lily: a parallel adapter beside each block's ``mlp`` (input: the MLP's input,
  i.e. after ``norm2``; output added to the MLP's output, inside drop-path and layer
  scale), hidden activation ``ffn_act``. AdaptFormer (``name="adaptformer"``): its
  authors' placement, input = the residual stream before ``norm2``, output added to the
  block's output outside drop-path and layer scale (:func:`add_residual_adapter`).
- ``in_proj``: Mamba mixers' input projection (Vim).
- ``delta``: Mamba mixers' dt projection, as two target kinds with their own banks:
  ``delta_f`` (``dt_proj``, forward scan) and ``delta_b`` (``dt_proj_b``, backward scan).
- anything else: every ``nn.Linear`` whose attribute name equals the target, in model
  order (e.g. ``fc1``, ``proj``, ``qkv``); each match counts as one layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import LilyConfigError
from .layers import Adapter, AdaptedLinear, LilyAdapter, add_parallel_adapter, add_residual_adapter
from .registry import MethodOptions, get_method, method_config


@dataclass
class Site:
    """One place (in one layer) where an adapter of one target kind attaches."""
    kind: str               # target kind: q, k, v, ffn, in_proj, delta_f, ...
    group: str              # the config key it was requested by (q, ffn, delta, ...)
    parent: nn.Module       # module owning `attr`
    attr: str               # attribute name of the wrapped module on `parent`
    in_features: int
    out_features: int
    start: int = 0          # output slice (fused qkv)
    stop: int | None = None
    parallel: bool = False  # parallel adapter beside a sub-layer (ffn) instead of a Linear


def _blocks_with_fused_qkv(model: nn.Module):
    return [m for m in model.modules()
            if isinstance(getattr(getattr(m, "attn", None), "qkv", None), nn.Linear)]


def _mamba_mixers(model: nn.Module):
    return [m for m in model.modules()
            if isinstance(getattr(m, "in_proj", None), nn.Linear) and isinstance(getattr(m, "dt_proj", None), nn.Linear)]


def find_sites(model: nn.Module, target: str) -> list[Site]:
    """All sites of ``target`` in model order (layer index = position in the list)."""
    blocks = _blocks_with_fused_qkv(model)
    if target in ("q", "k", "v") and blocks:
        i = "qkv".index(target)
        sites = []
        for blk in blocks:
            qkv = blk.attn.qkv
            dim = qkv.out_features // 3
            sites.append(Site(target, target, blk.attn, "qkv", qkv.in_features, dim, i * dim, (i + 1) * dim))
        return sites
    if target == "ffn":
        sites = []
        for blk in blocks or [m for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module)]:
            lins = [m for m in blk.mlp.modules() if isinstance(m, nn.Linear)]
            if not lins:
                raise LilyConfigError("target 'ffn': the block's mlp has no Linear layers")
            sites.append(Site("ffn", "ffn", blk, "mlp", lins[0].in_features, lins[-1].out_features, parallel=True))
        return sites
    if target == "in_proj" and _mamba_mixers(model):
        return [Site("in_proj", "in_proj", m, "in_proj", m.in_proj.in_features, m.in_proj.out_features)
                for m in _mamba_mixers(model)]
    if target == "delta":
        mixers = _mamba_mixers(model)
        sites = [Site("delta_f", "delta", m, "dt_proj", m.dt_proj.in_features, m.dt_proj.out_features)
                 for m in mixers]
        sites += [Site("delta_b", "delta", m, "dt_proj_b", m.dt_proj_b.in_features, m.dt_proj_b.out_features)
                  for m in mixers if isinstance(getattr(m, "dt_proj_b", None), nn.Linear)]
        return sites
    # generic: every nn.Linear whose attribute name equals the target
    sites = []
    for parent in model.modules():
        child = getattr(parent, target, None) if target.isidentifier() else None
        if isinstance(child, nn.Linear) and dict(parent.named_children()).get(target) is child:
            sites.append(Site(target, target, parent, target, child.in_features, child.out_features))
    return sites


def _wrap_linear(site: Site) -> AdaptedLinear:
    module = getattr(site.parent, site.attr)
    if not isinstance(module, AdaptedLinear):
        module = AdaptedLinear(module)
        setattr(site.parent, site.attr, module)
    return module


def attach(site: Site, adapter: Adapter, residual: bool = False):
    """Attach one adapter at one site: beside a Linear's output slice, beside a sub-layer
    (``parallel`` sites), or, with ``residual``, AdaptFormer's placement (input before norm2,
    output added to the block's output)."""
    if residual:
        add_residual_adapter(site.parent, site.kind, adapter)
    elif site.parallel:
        add_parallel_adapter(getattr(site.parent, site.attr), site.kind, adapter)
    else:
        _wrap_linear(site).add_adapter(site.kind, adapter, site.start, site.stop)


def sites_by_kind(model: nn.Module, target: str) -> list[list[Site]]:
    """The sites of ``target`` grouped by target kind (``delta`` -> delta_f, delta_b), in model order."""
    sites = find_sites(model, target)
    if not sites:
        raise LilyConfigError(
            f"target '{target}' matches nothing in {type(model).__name__} (ViT targets: q, k, v, ffn; "
            "Vim targets: in_proj, delta; or the attribute name of nn.Linear layers)")
    by_kind: dict[str, list[Site]] = {}
    for s in sites:
        by_kind.setdefault(s.kind, []).append(s)
    return list(by_kind.values())


def attach_per_kind(model: nn.Module, targets, build, residual: bool = False) -> None:
    """For every target and target kind: ``build(sites) -> adapters`` (one per site), attached."""
    for target in targets:
        for kind_sites in sites_by_kind(model, target):
            for site, adapter in zip(kind_sites, build(kind_sites)):
                attach(site, adapter, residual=residual)


def _head_parameters(model: nn.Module, cfg: MethodOptions) -> dict[str, nn.Parameter]:
    params = {}
    for name in cfg.head:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LilyConfigError(f"the model has no classification head module '{name}' "
                                  f"(method.head lists the modules that stay trainable)") from None
        params.update({f"{name}.{n}": p for n, p in module.named_parameters()})
    return params


def adapt(model: nn.Module, cfg: MethodOptions | dict) -> nn.Module:
    """Apply a method in place: freeze the backbone, attach the method, keep the head trainable.

    ``cfg``: the method's options (``lily.MethodConfig(name=..., ...)``) or a mapping with a
    ``name`` (a Hydra ``cfg.method``). Every registered method (``lily.registered()``) works
    here; new modules are placed on the model's device. Returns the model.
    """
    cfg = method_config(cfg)
    if getattr(model, "lily_config", None) is not None:
        raise LilyConfigError("this model is already adapted; build a fresh model to apply another method")
    method = get_method(cfg.name)
    head = _head_parameters(model, cfg)
    params = list(model.parameters())
    device = params[0].device if params else None
    for p in params:
        p.requires_grad_(False)
    method.apply(model, cfg)
    if device is not None:
        model.to(device)    # only the method's new modules move; the backbone is already there
    for p in head.values():
        p.requires_grad_(True)
    model.lily_config = cfg
    return model


def adapters(model: nn.Module) -> dict[str, list[Adapter]]:
    """Every adapter of the model by target kind, in layer order."""
    out: dict[str, list[Adapter]] = {}
    for module in model.modules():
        for name, a in getattr(module, "adapters", {}).items():
            if isinstance(a, Adapter):
                out.setdefault(name, []).append(a)
    return out


def lily_adapters(model: nn.Module) -> dict[str, list[LilyAdapter]]:
    return {k: v for k, v in adapters(model).items() if isinstance(v[0], LilyAdapter)}
