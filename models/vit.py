"""ViT backbones (timm): build from a ``backbone`` config and load pretrained weights.

``build_vit(cfg, num_classes) -> (model, info)``. The model is a timm
``VisionTransformer`` built from ``cfg.arch``; its weights come from one of

- a local file ``cfg.checkpoint``: the original Google ``.npz`` (read by timm's own npz
  loader), a ``.pth``/``.pt`` state dict (possibly nested under ``model`` or
  ``state_dict``) or a ``.safetensors`` file;
- the timm hub tag ``cfg.hub_name`` (when ``pretrained`` and no checkpoint);
- nothing (``pretrained: false``): random weights.

The classification head is always ``model.head`` (a new one when the checkpoint's class
count differs). For fidelity with the authors' backbone (timm 0.4.12,
``representation_size=768``), the frozen *pre-logits* layer (Linear + tanh between the
pooled cls token and the head) is rebuilt when the checkpoint carries it
(``pre_logits/kernel`` in the npz, ``pre_logits.fc.weight`` in a torch file); it lives in
``model.pre_logits`` (a name with neither ``head`` nor ``lily`` in it, so it stays frozen).
"""
from __future__ import annotations

import contextlib
import logging
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.errors import UserError

log = logging.getLogger(__name__)

NPZ_URL_HINT = (
    "the original Google ImageNet-21k ViT-B/16 is ViT-B_16.npz from the Google Cloud bucket "
    "gs://vit_models/imagenet21k/ViT-B_16.npz (https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz, "
    "see github.com/google-research/vision_transformer)"
)
_TORCH_PRE_LOGITS = ("pre_logits.fc.weight", "pre_logits.fc.bias")


# ---------------------------------------------------------------------------------------
# the pre-logits layer of timm <= 0.4 (representation_size)
# ---------------------------------------------------------------------------------------
class VisionTransformerPreLogits(VisionTransformer):
    """timm ``VisionTransformer`` whose ``forward_head`` applies ``self.pre_logits`` after pooling.

    timm 1.0's ``forward_head`` is pool -> fc_norm -> head_drop -> head; timm 0.4.12 with
    ``representation_size`` did norm -> cls token -> pre_logits (Linear + tanh) -> head.
    ``forward_head(x, pre_logits=True)`` returns the features the head sees.
    """

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.pre_logits(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def add_pre_logits(model: nn.Module, representation_size: int | None = None) -> nn.Sequential:
    """Insert a frozen ``pre_logits`` layer (Linear(D, R) + tanh) before ``model.head``.

    Returns the new module (random weights; load them afterwards). If ``R`` differs from
    the head's input size, the head is rebuilt for ``R`` inputs.
    """
    if type(model) is not VisionTransformer:
        raise UserError(
            f"the pre-logits layer can only be added to a plain timm VisionTransformer, "
            f"not {type(model).__name__}; set backbone.pre_logits=false."
        )
    dim = model.embed_dim
    rep = int(representation_size or dim)
    model.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(dim, rep), act=nn.Tanh()))
    if rep != dim:
        num_classes = model.num_classes
        model.head = nn.Linear(rep, num_classes) if num_classes > 0 else nn.Identity()
        model.num_features = model.head_hidden_size = rep
    model.__class__ = VisionTransformerPreLogits  # same module, forward_head also applies pre_logits
    model.pre_logits.requires_grad_(False)
    return model.pre_logits


# ---------------------------------------------------------------------------------------
# config helpers
# ---------------------------------------------------------------------------------------
def _to_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a core requirement
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise UserError(f"backbone config must be a mapping, got {type(cfg).__name__}")


def _pre_logits_mode(value: Any):
    if isinstance(value, str):
        low = value.strip().lower()
        value = {"auto": "auto", "true": True, "yes": True, "false": False, "no": False}.get(low, value)
    if value is None:
        value = "auto"
    if not (value is True or value is False or value == "auto"):
        raise UserError(f"backbone.pre_logits must be auto, true or false, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# weight loaders
# ---------------------------------------------------------------------------------------
def _load_npz(model: nn.Module, path: Path, pre_logits_mode) -> bool:
    """Google ``.npz`` via timm's own loader; then the pre-logits layer if present/wanted."""
    import numpy as np
    from timm.models.vision_transformer import _load_weights

    try:
        with np.load(path, allow_pickle=False) as w:
            keys = list(w.files)
            pl_key = next((k for k in keys if k.endswith("pre_logits/kernel")), None)
            pl = None
            if pl_key is not None:
                bias_key = pl_key[: -len("kernel")] + "bias"
                if bias_key not in keys:
                    raise UserError(f"'{path}' has '{pl_key}' but no '{bias_key}'; the checkpoint is incomplete.")
                pl = (np.asarray(w[pl_key]), np.asarray(w[bias_key]))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not read '{path}' as a .npz checkpoint ({type(e).__name__}: {e}).") from e

    want = pl is not None if pre_logits_mode == "auto" else pre_logits_mode
    if pre_logits_mode is True and pl is None:
        raise UserError(
            f"backbone.pre_logits=true but '{path}' has no pre_logits/kernel and pre_logits/bias; "
            f"use the original ViT-B_16.npz ({NPZ_URL_HINT}) or set backbone.pre_logits=auto|false."
        )
    try:
        _load_weights(model, str(path))
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(
            f"'{path}' does not fit the architecture of this backbone ({type(e).__name__}: {e}). "
            f"Check backbone.arch / backbone.model_kwargs against the checkpoint."
        ) from e
    if want:
        kernel, bias = pl
        module = add_pre_logits(model, kernel.shape[1])
        weight = torch.from_numpy(kernel.T.copy()).float()
        if tuple(weight.shape) != tuple(module.fc.weight.shape) or bias.shape != (weight.shape[0],):
            raise UserError(
                f"pre_logits in '{path}' has shape {tuple(kernel.shape)}, expected "
                f"({module.fc.in_features}, R); the checkpoint does not fit backbone.arch."
            )
        with torch.no_grad():
            module.fc.weight.copy_(weight)
            module.fc.bias.copy_(torch.from_numpy(bias.copy()).float())
    return bool(want)


def load_error_reason(e: Exception) -> str:
    """The first line of a loading error, without PyTorch's advice to retry with
    ``weights_only=False`` (unsafe on a file of unknown origin, and no fix for a corrupt one)."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    first = first.split(" Please file an issue")[0].split("In PyTorch 2.6")[0].rstrip(" .")
    if "weights_only" in first.lower() or "weights only" in first.lower():
        first = "not a readable PyTorch checkpoint"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"could not read '{path}' as a {'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} "
            f"checkpoint ({load_error_reason(e)}); is the file complete and a checkpoint?"
        ) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"'{path}' does not hold a state dict of tensors (also looked under 'model'/'state_dict').")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_torch(model: nn.Module, path: Path, pre_logits_mode, arch: str) -> bool:
    """A ``.pth``/``.pt``/``.safetensors`` state dict: head dropped when its shape differs,
    position embeddings resampled when the grid differs, strict otherwise."""
    from timm.layers import resample_abs_pos_embed

    sd = _read_state_dict(path)
    has_pl = all(k in sd for k in _TORCH_PRE_LOGITS)
    if pre_logits_mode is True and not has_pl:
        raise UserError(
            f"backbone.pre_logits=true but '{path}' has no {' / '.join(_TORCH_PRE_LOGITS)}; "
            f"use the original ViT-B_16.npz ({NPZ_URL_HINT}) or set backbone.pre_logits=auto|false."
        )
    want = has_pl if pre_logits_mode == "auto" else pre_logits_mode
    if want:
        add_pre_logits(model, sd["pre_logits.fc.weight"].shape[0])
    else:
        for k in [k for k in sd if k.startswith("pre_logits.")]:
            del sd[k]

    target = model.state_dict()
    # classification head: keep only when it fits
    head_keys = [k for k in sd if k.startswith("head.")]
    if any(k not in target or target[k].shape != sd[k].shape for k in head_keys):
        for k in head_keys:
            del sd[k]
    # position embeddings: resample to this model's grid
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        num_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        try:
            sd["pos_embed"] = resample_abs_pos_embed(
                sd["pos_embed"], new_size=list(model.patch_embed.grid_size), num_prefix_tokens=num_prefix)
        except Exception as e:
            raise UserError(
                f"could not resize pos_embed {tuple(sd['pos_embed'].shape)} from '{path}' to "
                f"{tuple(target['pos_embed'].shape)} ({e}); check backbone.arch / model_kwargs."
            ) from e

    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in sd.items() if k in target and target[k].shape != v.shape]
    missing = [k for k in target if k not in sd and not k.startswith("head.")]
    unexpected = [k for k in sd if k not in target]
    if mismatched or missing or unexpected:
        def fmt(xs):
            return ", ".join(xs[:8]) + (f" ... ({len(xs)} in all)" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {fmt(mismatched)}")
        raise UserError(
            f"'{path}' does not fit backbone.arch={arch} "
            f"({'; '.join(parts)}). Check backbone.arch / backbone.model_kwargs against the checkpoint."
        )
    model.load_state_dict(sd, strict=False)  # only head.* may be absent (checked above)
    return bool(want)


@contextlib.contextmanager
def _offline_if_unreachable():
    """Hugging Face hub offline mode while its host does not resolve.

    Without a network, huggingface_hub retries for about a minute before failing; in
    offline mode it fails at once, or loads the file if it is already in the local cache.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a timm dependency
        yield
        return
    old = constants.HF_HUB_OFFLINE
    if not old:
        try:
            socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        except (OSError, UnicodeError):
            log.info("%s does not resolve: loading from the local cache only", constants.ENDPOINT)
            constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _hub_cfg(hub_name: str, arch: str):
    """timm's pretrained config of ``hub_name`` (``<arch>.<tag>``), checked against ``arch``."""
    from timm.models import get_pretrained_cfg

    try:
        pcfg = get_pretrained_cfg(hub_name) if "." in hub_name else None
    except RuntimeError:  # known architecture, unknown tag
        pcfg = None
    if pcfg is None:
        raise UserError(
            f"unknown timm pretrained tag backbone.hub_name='{hub_name}' (expected <arch>.<tag>, e.g. "
            f"vit_base_patch16_224.orig_in21k); or pass backbone.checkpoint=/path/to/weights.")
    if hub_name.split(".")[0] != arch:
        raise UserError(f"backbone.hub_name='{hub_name}' is not a weight tag of backbone.arch='{arch}'.")
    return pcfg


def hub_weights_problem(hub_name: str, arch: str) -> str | None:
    """Why timm hub weights cannot be had right now (not cached and the hub unreachable), or None."""
    try:
        pcfg = _hub_cfg(hub_name, arch)
    except UserError as e:
        return str(e)
    repo = getattr(pcfg, "hf_hub_id", None)
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache
            for fname in ("model.safetensors", "pytorch_model.bin", getattr(pcfg, "hf_hub_filename", None)):
                if fname and isinstance(try_to_load_from_cache(repo, fname), str):
                    return None
        except Exception:  # noqa: BLE001 - an old huggingface_hub: fall through to the network check
            pass
    try:  # the hub's host resolves and accepts a connection (a few seconds at most)
        from huggingface_hub import constants
        host = urlparse(constants.ENDPOINT).hostname
        socket.getaddrinfo(host, 443)
        socket.create_connection((host, 443), timeout=5).close()
        return None
    except (OSError, UnicodeError, ImportError):
        pass
    return (f"the timm hub weights '{hub_name}' are not in the local cache and the hub cannot be reached; "
            f"download a weights file yourself and pass backbone.checkpoint=/path/to/file ({NPZ_URL_HINT}), "
            "or set backbone.pretrained=false for random weights")


def _load_hub(model: nn.Module, hub_name: str, pcfg, num_classes: int) -> None:
    """timm pretrained weights for ``hub_name`` (Hugging Face hub / URL); UserError when offline."""
    from timm.models import load_pretrained
    from timm.models.vision_transformer import checkpoint_filter_fn

    source = f" (timm's own source for this tag: {pcfg.url})" if pcfg.url else ""
    how = (
        f"To run without the hub, download a weights file yourself{source} and pass "
        f"backbone.checkpoint=/path/to/file (.npz, .pth or .safetensors; {NPZ_URL_HINT}), "
        f"or set backbone.pretrained=false for random weights."
    )
    try:
        with _offline_if_unreachable():
            load_pretrained(model, pretrained_cfg=pcfg.to_dict(), num_classes=num_classes,
                            filter_fn=checkpoint_filter_fn, strict=True)
    except Exception as e:
        raise UserError(
            f"could not download the pretrained weights '{hub_name}' from the timm hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {how}"
        ) from e


# ---------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------
def build_vit(cfg: Any, num_classes: int) -> tuple[nn.Module, dict]:
    """Build the ViT of a ``backbone`` config with ``num_classes`` outputs and load its weights.

    Returns ``(model, info)`` with ``info = {"weights": "hub:<tag>" | "file:<path>" |
    "random", "pre_logits": bool}``.
    """
    c = _to_dict(cfg)
    family = c.get("family", "vit")
    if family != "vit":
        raise UserError(f"build_vit builds backbone.family=vit, got '{family}'")
    arch = c.get("arch")
    if not arch or not timm.is_model(arch):
        raise UserError(f"backbone.arch='{arch}' is not a timm model name (e.g. vit_base_patch16_224).")
    pretrained = bool(c.get("pretrained", False))
    checkpoint = c.get("checkpoint")
    hub_name = c.get("hub_name")
    pre_logits_mode = _pre_logits_mode(c.get("pre_logits", "auto"))

    kwargs = dict(c.get("model_kwargs") or {})
    kwargs["num_classes"] = int(num_classes)
    if c.get("drop_path_rate") is not None:
        kwargs["drop_path_rate"] = float(c["drop_path_rate"])
    if c.get("img_size") is not None:
        kwargs["img_size"] = int(c["img_size"])

    # check the weights source before building (a ViT-B takes a moment to initialise)
    path = None
    if pretrained and checkpoint:
        path = Path(str(checkpoint)).expanduser()
        if not path.is_file():
            raise UserError(
                f"backbone.checkpoint='{path}' does not exist. Pass the path of a weights file "
                f"(.npz, .pth or .safetensors; {NPZ_URL_HINT}), or set backbone.pretrained=false for random weights."
            )
    elif pretrained:
        if not hub_name:
            raise UserError(
                f"backbone '{c.get('name', arch)}' is pretrained but names neither backbone.checkpoint nor "
                f"backbone.hub_name; pass backbone.checkpoint=/path/to/weights or backbone.pretrained=false."
            )
        pcfg = _hub_cfg(hub_name, arch)
        if pre_logits_mode is True:
            raise UserError(
                f"backbone.pre_logits=true, but timm hub weights ('{hub_name}') carry no pre-logits layer; "
                f"pass the original npz as backbone.checkpoint=/path/to/ViT-B_16.npz ({NPZ_URL_HINT})."
            )
    elif checkpoint:
        log.warning("backbone.pretrained=false: ignoring backbone.checkpoint=%s (random weights)", checkpoint)

    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f"timm could not build '{arch}' with {kwargs} ({e}); check backbone.model_kwargs.") from e
    if type(model) is not VisionTransformer:
        raise UserError(f"backbone.arch='{arch}' is a {type(model).__name__}, not a timm VisionTransformer.")

    if path is not None:
        if path.suffix == ".npz":
            has_pl = _load_npz(model, path, pre_logits_mode)
        else:
            has_pl = _load_torch(model, path, pre_logits_mode, arch)
        weights = f"file:{path}"
    elif pretrained:
        _load_hub(model, hub_name, pcfg, num_classes)
        has_pl = False
        weights = f"hub:{hub_name}"
    else:
        has_pl = pre_logits_mode is True  # random weights: build the layer only when asked for
        if has_pl:
            add_pre_logits(model)
        weights = "random"
    log.info("backbone %s: %s weights, pre-logits %s", c.get("name", arch), weights, "yes" if has_pl else "no")
    return model, {"weights": weights, "pre_logits": bool(has_pl)}
