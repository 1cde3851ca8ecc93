"""The design this codebase replaces, rebuilt for scripts/bench.py to time against.

What the authors' released code does (../shared/spec/lily-method.md), written here from
that description:

- attention by hand: ``softmax((q @ k^T) * scale) @ v`` in place of timm's fused
  scaled-dot-product attention (:func:`use_handwritten_attention`);
- Lily's experts applied one by one and then weighted, ``sum_e w_e (h @ E_e)``, instead of
  combining the experts first and doing one matmul; per-token routing materialises the
  ``(B, T, d, out)`` per-token projector (:func:`use_expert_loop`);
- fp32 everywhere (no bf16 autocast: the caller passes ``precision="fp32"``);
- every image decoded with PIL every epoch (:func:`pil_epoch`), instead of once into a
  memory-mapped uint8 cache.

:func:`check_same_outputs` verifies that the patched model computes what ours computes.
"""
from __future__ import annotations

import types

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import Attention

import lily


# ---------------------------------------------------------------------------------------
# model side
# ---------------------------------------------------------------------------------------
def _handwritten_attention(self, x, attn_mask=None, is_causal=False):
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
    return self.proj_drop(self.proj(x))


def use_handwritten_attention(model: torch.nn.Module) -> int:
    """Replace every timm ``Attention.forward`` by the hand-written one; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            if m.gate is not None or not isinstance(m.q_norm, torch.nn.Identity) or not isinstance(m.norm, torch.nn.Identity):
                raise ValueError("the hand-written attention covers plain ViT attention only")
            m.forward = types.MethodType(_handwritten_attention, m)
            n += 1
    return n


def _expert_loop_forward(self: lily.LilyAdapter, x: torch.Tensor) -> torch.Tensor:
    h = self.act(self.dropout(self.lp(x)))
    w = self.routing_weights(h)
    self.last_weights = w.detach().reshape(-1, self.bank.ne).mean(dim=0)
    experts = self.bank.experts
    if self.routing == "token":  # the per-token projector (B, T, d, out), then a batched product
        hp = torch.einsum("...e,edo->...do", w, experts)
        out = torch.einsum("...d,...do->...o", h, hp)
    else:
        out = 0
        for e in range(self.bank.ne):  # one matmul per expert, then weighted
            we = w[..., e]
            if self.routing == "sample":
                we = we.reshape(-1, *([1] * (h.dim() - 1)))
            out = out + we * (h @ experts[e])
    if self.bank.bias is not None:
        b = w @ self.bank.bias
        if self.routing == "sample":
            b = b.reshape(b.shape[0], *([1] * (out.dim() - 2)), -1)
        out = out + b
    return self.scale * out


def use_expert_loop(model: torch.nn.Module) -> int:
    """Replace every LilyAdapter's forward by the expert-by-expert one; returns how many."""
    n = 0
    for adapters in lily.lily_adapters(model).values():
        for a in adapters:
            a.forward = types.MethodType(_expert_loop_forward, a)
            n += 1
    return n


def replace_design(model: torch.nn.Module) -> dict:
    """Both model-side replacements, in place; returns {"attention": n, "lily": n} patched."""
    return {"attention": use_handwritten_attention(model), "lily": use_expert_loop(model)}


@torch.no_grad()
def check_same_outputs(ours: torch.nn.Module, replaced: torch.nn.Module, x: torch.Tensor,
                       rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Evaluation-mode logits of both models on ``x`` must agree (allclose); returns the
    largest absolute difference. Raises AssertionError otherwise."""
    modes = ours.training, replaced.training
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    ours.eval(), replaced.eval()
    try:  # exact fp32 for the comparison (TF32 rounds differently in different kernels)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        a, b = ours(x), replaced(x)
    finally:
        ours.train(modes[0]), replaced.train(modes[1])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    diff = (a - b).abs().max().item()
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"the replaced design does not compute what ours computes (max |diff| {diff:.3g})")
    return diff


# ---------------------------------------------------------------------------------------
# data side
# ---------------------------------------------------------------------------------------
def make_image_folder(root, task: str, split: str, n: int, num_classes: int, size=(500, 375), seed: int = 0) -> None:
    """``n`` JPEG photos-like images (smooth colour fields plus noise, ``size`` pixels) in the
    VTAB-1k folder format: ``<root>/<task>/images/<i>.jpg`` and ``<root>/<task>/<split>.txt``."""
    from pathlib import Path
    rng = np.random.default_rng(seed)
    tdir = Path(root) / task
    (tdir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
        arr = np.clip(np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(tdir / "images" / f"{i:06d}.jpg", quality=90)
        lines.append(f"images/{i:06d}.jpg {int(rng.integers(num_classes))}\n")
    (tdir / f"{split}.txt").write_text("".join(lines))


def pil_decode(path, image_size: int) -> torch.Tensor:
    """One image as the authors' transform gives it: Resize((S, S), bicubic) + ToTensor,
    float32 (3, S, S) in [0, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()).float().div_(255)


def pil_epoch(paths: list, labels: torch.Tensor, order: torch.Tensor, batch_size: int, image_size: int):
    """One training epoch of batches decoded with PIL (shuffled order, drop_last)."""
    for i in range(len(order) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size].tolist()
        yield torch.stack([pil_decode(paths[j], image_size) for j in idx]), labels[idx]
