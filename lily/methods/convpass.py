"""Convpass (Jie & Deng, JieShibo/PETL-ViT ``convpass/vtab/convpass.py``): a convolutional bypass in
parallel to the attention and to the MLP, reading the same LayerNorm output::

    x = x + drop_path1(attn(n1)) + drop_path1(CP_attn(n1)) * s,   n1 = norm1(x)
    x = x + drop_path2(mlp(n2))  + drop_path2(CP_mlp(n2)) * s,    n2 = norm2(x)

``CP(x) = up(dropout(act(conv(act(down(x))))))`` with ``act`` = QuickGELU ``x * sigmoid(1.702 x)``:
the patch tokens are laid out on the patch grid (14 x 14 for ViT-B/16 at 224) for a 3 x 3 conv
(padding 1); the class token goes through the *same* conv as a 1 x 1 image (zero padding: only the
centre tap and the bias act). down: xavier-uniform, bias 0; up: zeros (the model is unchanged at
initialisation); conv bias 0, conv weight xavier-uniform (``xavier_init``) or zeros with an
identity centre tap. ViT-B/16: 24 x 13,648 = 327,552 parameters (Convpass-attn, ``targets=[attn]``:
163,776). Not mergeable (non-linear spatial bypass).

On timm: a forward pre-hook on ``attn``/``mlp`` keeps their input; a forward hook on the block's own
``drop_path1``/``drop_path2`` instance adds ``drop_path(CP(n)) * s`` (an independent drop-path draw,
as the authors' second ``self.drop_path`` call; outside layer scale, which their timm lacked).
Prefix tokens other than the class token (registers) are each treated like the class token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LilyConfigError
from ..registry import Method, MethodOptions, register
from ._vit import embed_dim, link, vit_blocks


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ConvpassModule(nn.Module):
    """One bypass: ``adapter_down`` (D -> d), ``adapter_conv`` (d -> d, 3 x 3), ``adapter_up`` (d -> D)."""

    def __init__(self, dim: int, hidden: int, grid: tuple[int, int], prefix: int, scale: float,
                 xavier_init: bool = False, dropout: float = 0.1):
        super().__init__()
        self.hidden, self.grid, self.prefix, self.scale = hidden, tuple(grid), prefix, float(scale)
        self.adapter_conv = nn.Conv2d(hidden, hidden, 3, 1, 1)
        if xavier_init:
            nn.init.xavier_uniform_(self.adapter_conv.weight)
        else:
            nn.init.zeros_(self.adapter_conv.weight)
            with torch.no_grad():
                self.adapter_conv.weight[:, :, 1, 1] += torch.eye(hidden, device=self.adapter_conv.weight.device)
        nn.init.zeros_(self.adapter_conv.bias)
        self.adapter_down = nn.Linear(dim, hidden)
        self.adapter_up = nn.Linear(hidden, dim)
        nn.init.xavier_uniform_(self.adapter_down.weight)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, N, _ = x.shape
        h, w = self.grid
        n = self.prefix
        if N != n + h * w:
            raise RuntimeError(f"Convpass expects {n} prefix tokens and a {h}x{w} patch grid ({n + h * w} tokens), "
                               f"got {N} tokens")
        d = self.act(self.adapter_down(x))
        patches = self.adapter_conv(d[:, n:].reshape(B, h, w, self.hidden).permute(0, 3, 1, 2))
        parts = [patches.permute(0, 2, 3, 1).reshape(B, h * w, self.hidden)]
        if n:
            # each prefix token (the class token) as a 1 x 1 image through the same conv
            cls = self.adapter_conv(d[:, :n].reshape(B * n, self.hidden, 1, 1)).reshape(B, n, self.hidden)
            parts.insert(0, cls)
        d = self.dropout(self.act(torch.cat(parts, dim=1)))
        return self.adapter_up(d)

    def extra_repr(self):
        return f"hidden={self.hidden}, grid={self.grid}, prefix={self.prefix}, scale={self.scale}"


def _capture(module, args):
    module._convpass_link.__dict__["_input"] = args[0]


def _add(drop_path, args, output):
    cp = drop_path._convpass_link
    x = cp.__dict__.pop("_input", None)
    if x is None:
        raise RuntimeError("Convpass: the sub-layer's input was not captured in this forward")
    # forward() of the block's own drop-path module: an independent draw, without re-entering this hook
    return output + drop_path.forward(cp(x)) * cp.scale


@dataclass
class ConvpassOptions(MethodOptions):
    """``targets``: ``attn`` and/or ``mlp`` (both: Convpass; attn only: Convpass-attn). ``rank``:
    the bottleneck d (8). ``scale``: s. ``xavier_init``: the conv's init (per task in the report).
    ``dropout``: before ``adapter_up`` (0.1)."""
    name: str = "convpass"
    targets: list = field(default_factory=lambda: ["attn", "mlp"])
    rank: int = 8
    scale: float = 1.0
    xavier_init: bool = False
    dropout: float = 0.1

    def validate(self):
        bad = [t for t in self.targets if t not in ("attn", "mlp")]
        if bad or not self.targets:
            raise LilyConfigError(f"convpass targets must be a non-empty subset of [attn, mlp], got {self.targets}")
        if not isinstance(self.xavier_init, bool):
            raise LilyConfigError(f"method.xavier_init must be true or false, got {self.xavier_init!r}")
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("scale", lambda v: isinstance(v, (int, float)), "a number"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
        ))


@register
class Convpass(Method):
    name = "convpass"
    title = "Convpass"
    options = ConvpassOptions
    mergeable = "its bypass is non-linear (QuickGELU around a 3x3 conv over the patch grid)"
    source = "Jie & Deng 2022, JieShibo/PETL-ViT (convpass)"

    def apply(self, model, opts: ConvpassOptions):
        blocks = vit_blocks(model, self.name, prenorm=True)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        prefix = getattr(model, "num_prefix_tokens", None)
        if grid is None or not isinstance(prefix, int):
            raise LilyConfigError("convpass needs a timm ViT with patch_embed.grid_size and num_prefix_tokens")
        if getattr(model.patch_embed, "dynamic_img_size", False):
            raise LilyConfigError("convpass needs a fixed patch grid (dynamic_img_size=False)")
        d = embed_dim(model, blocks)
        for b in blocks:
            for target, sub, dp in (("attn", b.attn, b.drop_path1), ("mlp", b.mlp, b.drop_path2)):
                if target not in opts.targets:
                    continue
                if hasattr(dp, "_convpass_link"):
                    raise LilyConfigError("convpass: a drop-path module is shared between sub-layers")
                cp = ConvpassModule(d, int(opts.rank), tuple(grid), prefix, float(opts.scale), bool(opts.xavier_init),
                                    float(opts.dropout))
                setattr(b, f"adapter_{target}", cp)
                link(sub, "_convpass_link", cp)
                link(dp, "_convpass_link", cp)
                sub.register_forward_pre_hook(_capture)
                dp.register_forward_hook(_add)
