"""RepAdapter (Luo et al., luogen1996/RepAdapter ``repadapter.py``), the ``repblock`` form the VTAB
tables report: a linear adapter applied sequentially *before* the attention and before the MLP
(after norm1 / norm2), on all tokens::

    RA(x) = x + s * B(dropout(A x)),  A = Conv1d(D, 8, 1) (bias),  B = Conv1d(8, D, 1, groups=2) (bias)
    x = x + drop_path1(attn(RA_attn(norm1(x))));   x = x + drop_path2(mlp(RA_mlp(norm2(x))))

A xavier-uniform, biases and B zero: the model is unchanged at initialisation. ViT-B/16: 24 x
(768*8 + 8 + 768*4 + 768) = 239,808 parameters (repattn, ``targets=[attn]``: 119,904).

timm's Attention feeds its input only to the fused qkv (and the MLP only to fc1), so the adapter is
a forward pre-hook on ``attn.qkv`` / ``mlp.fc1`` and timm's own block (attention kernel, drop_path2
for the MLP branch, layer scale) runs unchanged; the released code's block forward used drop_path1
for both branches and skipped layer scale (identical for ViT-B, whose drop-path rates are equal
within a block and whose layer scales are identities). Mergeable (the authors' ``set_RepWeight``)::

    W' = W (I + s B A),   b' = b + s W (B b_A + b_B)     (B densified from its 2 groups)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LilyConfigError, MergeError
from ..merging import Mergeable
from ..registry import Method, MethodOptions, register
from ._vit import link, vit_blocks


class RepAdapterModule(Mergeable, nn.Module):
    """``x + s * B(dropout(A x))`` on the input of its host Linear (a forward pre-hook); merges into
    the host's weight and bias. ``conv_A``/``conv_B`` keep the authors' Conv1d shapes."""

    def __init__(self, host: nn.Linear, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0,
                 dropout: float = 0.1):
        super().__init__()
        if hidden % groups or dim % groups:
            raise LilyConfigError(f"repadapter: hidden ({hidden}) and width ({dim}) must be multiples of groups ({groups})")
        self.dim, self.hidden, self.groups, self.scale = dim, hidden, groups, float(scale)
        self.conv_A = nn.Conv1d(dim, hidden, 1, groups=1, bias=True)
        self.conv_B = nn.Conv1d(hidden, dim, 1, groups=groups, bias=True)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.conv_A.weight)
        nn.init.zeros_(self.conv_A.bias)
        nn.init.zeros_(self.conv_B.weight)
        nn.init.zeros_(self.conv_B.bias)
        link(self, "_host", host)

    def dense_b(self) -> torch.Tensor:
        """B as a (D, hidden) matrix: block-diagonal over the groups (the authors' ``sparse2dense``)."""
        w = self.conv_B.weight[..., 0]                                  # (D, hidden / groups)
        return torch.block_diag(*w.view(self.groups, self.dim // self.groups, -1))

    def forward(self, x):
        h = self.dropout(F.linear(x, self.conv_A.weight[..., 0].to(x.dtype), self.conv_A.bias.to(x.dtype)))
        return x + self.scale * F.linear(h, self.dense_b().to(x.dtype), self.conv_B.bias.to(x.dtype))

    def merge_plan(self):
        host = self._host
        if host.bias is None:
            raise MergeError("RepAdapter before a Linear without bias cannot be merged (its bias change needs one)")
        W, b = host.weight.detach(), host.bias.detach()
        B, A = self.dense_b().detach().to(W.dtype), self.conv_A.weight[..., 0].detach().to(W.dtype)
        ba, bb = self.conv_A.bias.detach().to(W.dtype), self.conv_B.bias.detach().to(W.dtype)
        w_new = W + self.scale * (W @ B) @ A
        b_new = b + self.scale * (W @ (B @ ba + bb))
        return [(host.weight, w_new), (host.bias, b_new)]

    def extra_repr(self):
        return f"dim={self.dim}, hidden={self.hidden}, groups={self.groups}, scale={self.scale}"


def _pre_hook(module, args):
    ra = module.repadapter
    return None if ra.merged else (ra(args[0]), *args[1:])


@dataclass
class RepAdapterOptions(MethodOptions):
    """``targets``: ``attn`` (before the attention) and/or ``mlp`` (before the MLP); both is the
    repblock form. ``rank``: the hidden width (8); ``groups``: B's groups (2); ``scale``: s;
    ``dropout``: on A's output (0.1)."""
    name: str = "repadapter"
    targets: list = field(default_factory=lambda: ["attn", "mlp"])
    rank: int = 8
    groups: int = 2
    scale: float = 1.0
    dropout: float = 0.1

    def validate(self):
        bad = [t for t in self.targets if t not in ("attn", "mlp")]
        if bad or not self.targets:
            raise LilyConfigError(f"repadapter targets must be a non-empty subset of [attn, mlp], got {self.targets}")
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("groups", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("scale", lambda v: isinstance(v, (int, float)), "a number"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
        ))


@register
class RepAdapter(Method):
    name = "repadapter"
    title = "RepAdapter"
    options = RepAdapterOptions
    mergeable = True
    source = "Luo et al. 2023, luogen1996/RepAdapter"

    def apply(self, model, opts: RepAdapterOptions):
        blocks = vit_blocks(model, self.name)
        for b in blocks:
            if getattr(b.attn, "gate", None) is not None:
                raise LilyConfigError("repadapter: an attention with a gate reads its input beside qkv; "
                                      "the adapter before the attention cannot be placed on qkv's input")
            hosts = [b.attn.qkv] * ("attn" in opts.targets) + [b.mlp.fc1] * ("mlp" in opts.targets)
            for host in hosts:
                host.repadapter = RepAdapterModule(host, host.in_features, int(opts.rank), int(opts.groups),
                                                   float(opts.scale), float(opts.dropout))
                host.register_forward_pre_hook(_pre_hook)
