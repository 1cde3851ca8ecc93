"""Visual Prompt Tuning (Jia et al., KMnP/vpt ``src/models/vit_prompt/vit.py``), shallow and deep.

p learned prompt tokens enter after the class token and after the position embedding (they have
no position embedding of their own): ``x = cat(x[:, :1], dropout(P0), x[:, 1:])`` before the first
block. VPT-deep replaces the previous block's prompt outputs before every later block:
``x = cat(x[:, :1], dropout(P_i), x[:, 1+p:])``. The head reads the class token. Prompts init
``uniform(-v, v)``, ``v = sqrt(6 / (3 * patch_h * patch_w + D))`` (0.0625 for ViT-B/16).
Counts: shallow p * 768, deep 12 * p * 768 on ViT-B/16. Not mergeable (extra tokens).

On timm: forward pre-hooks on the model's blocks insert/replace the prompts after the model's
prefix tokens (``num_prefix_tokens``: the class token, plus register tokens where a ViT has them);
a forward hook on the last block removes them again, so whatever pooling the model uses
(``global_pool='token'`` reads ``x[:, 0]``; ``'avg'``/``'map'`` pool the patch tokens) sees exactly
the model's own tokens and never the prompts. Everything between the embedding and the first
block (patch dropout, ``norm_pre``) runs before the prompts are inserted, as in VPT's ViT whose
embedding output (with dropout) is where the prompts enter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LilyConfigError
from ..registry import Method, MethodOptions, register
from ._vit import embed_dim, link, vit_blocks


class VPTPrompts(nn.Module):
    """The prompts of one model: ``prompt_embeddings`` (1, p, D) before the first block and, for
    VPT-deep, ``deep_prompt_embeddings`` (L-1, p, D) before blocks 1..L-1 (the authors' names)."""

    def __init__(self, length: int, dim: int, depth: int, deep: bool, dropout: float, init_bound: float,
                 prefix_tokens: int):
        super().__init__()
        self.length, self.deep, self.prefix = length, deep, prefix_tokens
        self.prompt_embeddings = nn.Parameter(torch.empty(1, length, dim).uniform_(-init_bound, init_bound))
        self.deep_prompt_embeddings = (nn.Parameter(torch.empty(depth - 1, length, dim).uniform_(-init_bound, init_bound))
                                       if deep and depth > 1 else None)
        self.prompt_dropout = nn.Dropout(dropout)

    def prompt(self, layer: int) -> torch.Tensor:
        return self.prompt_embeddings[0] if layer == 0 else self.deep_prompt_embeddings[layer - 1]

    def extra_repr(self):
        return f"length={self.length}, deep={self.deep}, prefix_tokens={self.prefix}"


def _insert(block, args):
    """Before block ``i``: insert (i = 0) or replace (VPT-deep, i >= 1) the prompt tokens."""
    prompts, i = block._vpt
    x = args[0]
    n, p = prompts.prefix, prompts.length
    pr = prompts.prompt_dropout(prompts.prompt(i).to(x.dtype)).expand(x.shape[0], -1, -1)
    rest = x[:, n:] if i == 0 else x[:, n + p:]
    return (torch.cat([x[:, :n], pr, rest], dim=1), *args[1:])


def _remove(block, args, output):
    """After the last block: drop the prompt tokens (the head and the final norm see the model's tokens)."""
    prompts = block._vpt_last
    n, p = prompts.prefix, prompts.length
    return torch.cat([output[:, :n], output[:, n + p:]], dim=1)


@dataclass
class VPTOptions(MethodOptions):
    """``prompt_length``: p. ``dropout``: prompt dropout at every insertion (VPT's demo notebook:
    0.1 deep, 0.0 shallow). ``deep``: fixed by the method name (vpt_shallow / vpt_deep)."""
    name: str = "vpt_deep"
    prompt_length: int = 10
    dropout: float = 0.1
    deep: bool = True

    def validate(self):
        self.check_values((
            ("prompt_length", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
        ))


@dataclass
class VPTShallowOptions(VPTOptions):
    name: str = "vpt_shallow"
    dropout: float = 0.0
    deep: bool = False

    def validate(self):
        super().validate()
        if self.deep:
            raise LilyConfigError("vpt_shallow has deep=false (use method name vpt_deep for deep prompts)")


@dataclass
class VPTDeepOptions(VPTOptions):
    name: str = "vpt_deep"

    def validate(self):
        super().validate()
        if not self.deep:
            raise LilyConfigError("vpt_deep has deep=true (use method name vpt_shallow for input-only prompts)")


def init_bound(model: nn.Module, dim: int) -> float:
    """VPT's ``sqrt(6 / (3 * prod(patch_size) + D))`` (KMnP/vpt vit.py; 3 = RGB channels)."""
    pe = getattr(model, "patch_embed", None)
    conv = getattr(pe, "proj", None)
    if isinstance(conv, nn.Conv2d):
        fan = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    else:
        ps = getattr(pe, "patch_size", (16, 16))
        fan = 3 * ps[0] * ps[1]
    return math.sqrt(6.0 / float(fan + dim))


class _VPT(Method):
    mergeable = "prompt tokens lengthen every block's sequence; they cannot fold into the weights"
    source = "Jia et al. 2022, KMnP/vpt"

    def apply(self, model, opts: VPTOptions):
        blocks = vit_blocks(model, self.name)
        if hasattr(model, "vpt"):
            raise LilyConfigError("the model already carries VPT prompts (model.vpt)")
        prefix = getattr(model, "num_prefix_tokens", None)
        if not isinstance(prefix, int):
            raise LilyConfigError(f"{self.name}: the model does not say how many prefix tokens (class/register) "
                                  "it has (timm VisionTransformer.num_prefix_tokens)")
        dim = embed_dim(model, blocks)
        prompts = VPTPrompts(int(opts.prompt_length), dim, len(blocks), bool(opts.deep), float(opts.dropout),
                             init_bound(model, dim), prefix)
        model.vpt = prompts
        for i, blk in enumerate(blocks if opts.deep else blocks[:1]):
            blk._vpt = (prompts, i)
            blk.register_forward_pre_hook(_insert)
        link(blocks[-1], "_vpt_last", prompts)
        blocks[-1].register_forward_hook(_remove)


@register
class VPTShallow(_VPT):
    name = "vpt_shallow"
    title = "VPT-shallow"
    options = VPTShallowOptions


@register
class VPTDeep(_VPT):
    name = "vpt_deep"
    title = "VPT-deep"
    options = VPTDeepOptions
