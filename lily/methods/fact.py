"""FacT (Jie & Deng, JieShibo/PETL-ViT ``FacT/fact_tt.py``, ``FacT/fact_tk.py``): the weight
increments of every block are factorised with factors shared by the whole model.

Shared: ``FacTu = Linear(D, r)`` (default init), ``FacTv = Linear(r, D)`` (zero init, so the model
is unchanged at initialisation). Per block a core Sigma for each of q, k, v, proj, fc1, fc2, applied
in parallel to the frozen Linear (dropout ``dp`` between core and V, ``s`` multiplies each delta)::

    qkv(h)  += cat[V(dp(U h @ Sq)), V(dp(U h @ Sk)), V(dp(U h @ Sv))] * s      h: norm1 output
    proj(o) += V(dp(U o @ So)) * s                                           o: attention output
    fc1(h2) += reshape(V(reshape(dp(U h2 @ S1), (m, r))), m*D) * s          S1: r x m*r
    fc2(z)  += V(dp(reshape(U(reshape(z, (m, D))), m*r) @ S2)) * s          S2: m*r x r

(m = fc1 width / D, 4 for timm's ViTs). FacT-TT: the cores are bias-free Linears (q, k, v, proj:
r x r; fc1: r -> 4r; fc2: 4r -> r), default init. FacT-TK: ``FacTc`` (r, r, r) and ``FacTp``
(r, 12 L), both xavier-uniform; block i: ``C = FacTc @ FacTp[:, 12i:12i+12]``, slices 0-3 are q, k,
v, proj, 4-7 reshaped to r x 4r is fc1, 8-11 reshaped to r x 4r and transposed is fc2.
Counts on ViT-B/16: TT 1536 r + 144 r^2 (r=8: 21,504; r=16: 61,440), TK 1536 r + 144 r + r^3
(r=16: 30,976; r=32: 86,528).

Attached as adapters of :class:`~lily.layers.AdaptedLinear` on qkv (q, k, v slices), proj, fc1 and
fc2 (timm's attention kernel stays in use; the authors replaced ``Attention.forward``). Mergeable:
q/k/v/proj ``dW = s V Sigma^T U``; fc1 ``dW = s blockdiag(V x m) S1^T U``; fc2 ``dW = s V S2^T blockdiag(U x m)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attach import Site, attach
from ..errors import LilyConfigError
from ..layers import Adapter
from ..registry import Method, MethodOptions, register
from ._vit import embed_dim, vit_blocks

SLOTS = ("q", "k", "v", "proj")


class FacTFactors(nn.Module):
    """The model-wide factors: ``FacTu``, ``FacTv`` and, for TK, the core tensor ``FacTc`` and the
    per-layer coefficients ``FacTp`` (the authors' names). Shared (the same module) by every adapter."""

    def __init__(self, dim: int, rank: int, tk_columns: int = 0):
        super().__init__()
        self.dim, self.rank = dim, rank
        self.FacTu = nn.Linear(dim, rank, bias=False)           # default (kaiming-uniform) init
        self.FacTv = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.FacTv.weight)
        if tk_columns:
            self.FacTc = nn.Parameter(torch.empty(rank, rank, rank))
            self.FacTp = nn.Parameter(torch.empty(rank, tk_columns))
            nn.init.xavier_uniform_(self.FacTc)
            nn.init.xavier_uniform_(self.FacTp)

    def extra_repr(self):
        return f"dim={self.dim}, rank={self.rank}"


class FacTAdapter(Adapter):
    """One FacT increment on one Linear (or one q/k/v slice of the fused qkv).

    ``kind``: ``attn`` (q, k, v, proj), ``fc1`` or ``fc2``. The core Sigma is ``sigma()``, used as
    ``u @ Sigma`` on the rank-r (fc2: m*r) features: a per-layer bias-free Linear for TT
    (``Sigma = core.weight.T``), a slice of ``FacTc @ FacTp`` for TK.
    """

    def __init__(self, factors: FacTFactors, kind: str, scale: float, dropout: float, mult: int,
                 core: nn.Linear | None = None, columns: tuple[int, int] | None = None):
        super().__init__()
        d = factors.dim
        self.factors, self.kind, self.scale, self.mult = factors, kind, float(scale), mult
        self.in_features = d * mult if kind == "fc2" else d
        self.out_features = d * mult if kind == "fc1" else d
        self.core = core                                       # TT (None for TK)
        self.columns = columns                                 # TK: FacTp columns of this layer's slice(s)
        self.dp = nn.Dropout(dropout)

    def sigma(self) -> torch.Tensor:
        if self.core is not None:
            return self.core.weight.t()
        f, r, m = self.factors, self.factors.rank, self.mult
        a, b = self.columns
        c = f.FacTc @ f.FacTp[:, a:b]                          # (r, r, b - a)
        if self.kind == "attn":
            return c[:, :, 0]
        if self.kind == "fc1":
            return c.reshape(r, m * r)
        return c.reshape(r, m * r).t()                         # fc2

    def forward(self, x):
        f, r, m = self.factors, self.factors.rank, self.mult
        sig = self.sigma().to(x.dtype)
        if self.kind == "attn":
            out = f.FacTv(self.dp(f.FacTu(x) @ sig))
        elif self.kind == "fc1":
            t = self.dp(f.FacTu(x) @ sig)                      # (..., m*r)
            out = f.FacTv(t.unflatten(-1, (m, r))).flatten(-2)  # (..., m, D) -> (..., m*D)
        else:
            u = f.FacTu(x.unflatten(-1, (m, f.dim))).flatten(-2)  # (..., m, r) -> (..., m*r)
            out = f.FacTv(self.dp(u @ sig))
        return out * self.scale

    def delta_weight(self):
        f, r, m = self.factors, self.factors.rank, self.mult
        U, V, sig = f.FacTu.weight, f.FacTv.weight, self.sigma()
        if self.kind == "attn":
            dw = V @ sig.t() @ U
        elif self.kind == "fc1":
            dw = torch.cat([V @ sig[:, k * r:(k + 1) * r].t() @ U for k in range(m)], dim=0)
        else:
            dw = torch.cat([V @ sig[k * r:(k + 1) * r].t() @ U for k in range(m)], dim=1)
        return self.scale * dw, None


@dataclass
class FacTOptions(MethodOptions):
    """``rank``: r. ``scale``: s. ``dropout``: dp (0.1 in the authors' code)."""
    name: str = "fact_tt"
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    def validate(self):
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("scale", lambda v: isinstance(v, (int, float)), "a number"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
        ))


@dataclass
class FacTTTOptions(FacTOptions):
    name: str = "fact_tt"


@dataclass
class FacTTKOptions(FacTOptions):
    name: str = "fact_tk"
    rank: int = 32


class _FacT(Method):
    mergeable = True
    source = "Jie & Deng 2023, JieShibo/PETL-ViT (FacT)"
    tk: bool = False

    def apply(self, model, opts: FacTOptions):
        blocks = vit_blocks(model, self.name)
        d, r = embed_dim(model, blocks), int(opts.rank)
        mult = blocks[0].mlp.fc1.out_features // d
        for b in blocks:
            a, mlp = b.attn, b.mlp
            if (a.qkv.out_features != 3 * d or a.proj.in_features != d or a.proj.out_features != d
                    or mlp.fc1.in_features != d or mlp.fc1.out_features != mult * d
                    or mlp.fc2.in_features != mult * d or mlp.fc2.out_features != d):
                raise LilyConfigError(f"{self.name} needs every block with qkv {d}->{3 * d}, proj {d}->{d}, "
                                      f"fc1 {d}->{mult * d} and fc2 {mult * d}->{d}")
        per_block = len(SLOTS) + 2 * mult
        factors = FacTFactors(d, r, per_block * len(blocks) if self.tk else 0)
        s, dp = float(opts.scale), float(opts.dropout)

        def adapter(kind, i, slot_cols, n_in, n_out):
            if self.tk:
                base = i * per_block
                return FacTAdapter(factors, kind, s, dp, mult, columns=(base + slot_cols[0], base + slot_cols[1]))
            core = nn.Linear(n_in, n_out, bias=False)          # default init (the authors' Linear cores)
            return FacTAdapter(factors, kind, s, dp, mult, core=core)

        for i, b in enumerate(blocks):
            a, mlp = b.attn, b.mlp
            for j, slot in enumerate(("q", "k", "v")):
                attach(Site(slot, slot, a, "qkv", d, d, j * d, (j + 1) * d), adapter("attn", i, (j, j + 1), r, r))
            attach(Site("proj", "proj", a, "proj", d, d), adapter("attn", i, (3, 4), r, r))
            attach(Site("fc1", "fc1", mlp, "fc1", d, mult * d),
                   adapter("fc1", i, (4, 4 + mult), r, mult * r))
            attach(Site("fc2", "fc2", mlp, "fc2", mult * d, d),
                   adapter("fc2", i, (4 + mult, 4 + 2 * mult), mult * r, r))


@register
class FacTTT(_FacT):
    name = "fact_tt"
    title = "FacT-TT"
    options = FacTTTOptions
    tk = False


@register
class FacTTK(_FacT):
    name = "fact_tk"
    title = "FacT-TK"
    options = FacTTKOptions
    tk = True
