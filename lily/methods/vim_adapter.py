"""ParallelAdapter (MambaPEFT's AdaptFormer on Vision Mamba): a bottleneck beside each mixer's
out_proj, reading out_proj's input o = (y_f + flip(y_b)) / 2 (shared by both scan directions)::

    out = out_proj(o) + s * up(Dropout(ReLU(down(o))))      down: d_inner -> r, up: r -> d_model

No biases, up zero-initialised (the output is unchanged at init), s = 0.1, dropout 0.1.
Vim-S at r = 32: 24 * 32 * (768 + 384) = 884,736 trainable parameters (head excluded).
Not mergeable (ReLU). Facts: ../shared/spec/baselines-vim.md section 3.5.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..attach import _mamba_mixers
from ..errors import LilyConfigError
from ..layers import add_parallel_adapter
from ..registry import Method, MethodOptions, register
from .adaptformer import BottleneckAdapter


@dataclass
class VimParallelAdapterOptions(MethodOptions):
    name: str = "vim_parallel_adapter"
    rank: int = 32            # dim_adaptf (the released config; TAB's 663K equals r = 24)
    scale: float = 0.1        # s_adaptf
    dropout: float = 0.1      # on the ReLU output (MambaPEFT's Adapter)

    def validate(self):
        self.check_values((
            ("rank", lambda v: isinstance(v, int) and v >= 1, "a positive int"),
            ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
            ("scale", lambda v: isinstance(v, (int, float)), "a number"),
        ))


def vim_mixers(model, method: str):
    """The bidirectional Mamba mixers of a Vision Mamba model, in layer order (or a clear error)."""
    mixers = [m for m in _mamba_mixers(model) if hasattr(m, "dt_proj_b")]
    if not mixers:
        raise LilyConfigError(f"method '{method}' needs a Vision Mamba model (bidirectional mixers with "
                              f"in_proj, dt_proj and dt_proj_b); {type(model).__name__} has none")
    return mixers


@register
class VimParallelAdapter(Method):
    name = "vim_parallel_adapter"
    title = "ParallelAdapter"
    options = VimParallelAdapterOptions
    mergeable = "its hidden layer is non-linear (ReLU)"
    source = "MambaPEFT (Yoshimura et al. 2025) ParallelAdapter, sony/MambaPEFT"

    def apply(self, model, opts: VimParallelAdapterOptions):
        for mixer in vim_mixers(model, self.name):
            out = mixer.out_proj
            add_parallel_adapter(out, "parallel_adapter", BottleneckAdapter(
                out.in_features, out.out_features, opts.rank, opts.scale, opts.dropout, bias=False, act="relu"))
