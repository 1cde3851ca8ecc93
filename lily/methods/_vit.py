"""What the timm-ViT baselines (BitFit, VPT, SSF, FacT, RepAdapter, Convpass) share: finding a
ViT's blocks, and modules that live beside a frozen module without being registered under it twice.

Methods here hook or wrap per instance (``register_forward_hook`` / ``register_forward_pre_hook``
on one model's modules, or :class:`~lily.layers.AdaptedLinear`); no timm class is patched.
"""
from __future__ import annotations

from torch import nn

from ..errors import LilyConfigError


def _is(m, attr, kind=nn.Linear) -> bool:
    return isinstance(getattr(m, attr, None), kind)


def vit_blocks(model: nn.Module, method: str, prenorm: bool = False) -> list[nn.Module]:
    """The transformer blocks of a timm ViT in model order: modules with a fused ``attn.qkv``
    Linear and an ``mlp`` with ``fc1``/``fc2`` Linears.

    ``prenorm``: also require timm's pre-norm ``Block`` (``x + drop_path1(ls1(attn(norm1(x))))``,
    the same for the MLP with ``norm2``/``drop_path2``), for methods that add a branch beside a
    sub-layer. Raises :class:`LilyConfigError` naming the method when the model has none.
    """
    blocks = [m for m in model.modules()
              if _is(getattr(m, "attn", None), "qkv") and _is(getattr(m, "mlp", None), "fc1")
              and _is(getattr(m, "mlp", None), "fc2")]
    if not blocks:
        raise LilyConfigError(
            f"method '{method}' needs a timm VisionTransformer (blocks with a fused attn.qkv Linear and an "
            f"mlp with fc1/fc2); {type(model).__name__} has none")
    if prenorm:
        for b in blocks:
            names = {c.__name__ for c in type(b).__mro__}
            parts = ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2")
            if "Block" not in names or not all(isinstance(getattr(b, p, None), nn.Module) for p in parts):
                raise LilyConfigError(
                    f"method '{method}' needs timm's pre-norm Block (x + drop_path1(ls1(attn(norm1(x)))), "
                    f"x + drop_path2(ls2(mlp(norm2(x))))); got {type(b).__name__}")
    return blocks


def embed_dim(model: nn.Module, blocks: list[nn.Module]) -> int:
    return blocks[0].attn.qkv.in_features


def link(owner: nn.Module, attr: str, target) -> None:
    """Point ``owner.attr`` at ``target`` without registering it as a submodule (no cycles in
    ``modules()``, no duplicate state-dict entries); ``copy.deepcopy`` keeps the link."""
    object.__setattr__(owner, attr, target)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the features the head sees: ``norm`` (cls-token pooling), or ``fc_norm``
    (timm ViTs with ``fc_norm``, e.g. average pooling, where ``norm`` is an Identity)."""
    for name in ("norm", "fc_norm"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Module) and getattr(m, "weight", None) is not None:
            return m
    return None
