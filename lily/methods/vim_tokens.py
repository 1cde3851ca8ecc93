"""MambaPEFT's token methods on Vision Mamba: prompt tuning and Affix-tuning, each with or without
its projection MLP. Facts: ../shared/spec/baselines-vim.md sections 3.6 and 3.7.

Both act through hooks of the Vision Mamba model (models/vim.py; this module does not import it):

* ``vim_prompt`` sets ``model.prompt``: P learned tokens (``nn.Embedding`` init N(0, 1)) put
  after the position embedding, ``num_prefix`` of them before the sequence and the rest after
  it (``prefix_suffix``: 4 + 4 of 8); the cls read-out index moves by ``num_prefix``. With
  ``projection`` the tokens are ``Linear(D, D) -> Tanh -> Linear(D, D)`` of the embedding.
  Vim-S: 8 * 384 = 3,072 without projection, 298,752 with.
* ``vim_affix`` sets ``model.affix``: per layer and per scan direction T tokens in xz space
  (2 * d_inner = 1536 channels, x | z), prepended to that direction's xz (to xz for the
  forward scan, to flip(xz) for the backward one), through conv1d, SiLU and the scan; their
  output positions are dropped before the two directions are averaged. Without projection
  one ``Embedding(T, depth * 2 * 2 d_inner)``; with it ``Embedding(T, 2 d_inner) -> Linear ->
  Tanh -> Linear(., depth * 2 * 2 d_inner)``. Vim-S at T = 3: 221,184 / 115,685,376.

Neither is the identity at init (the sequence or the scans see new tokens) and neither merges
into existing weights. The MLP output does not depend on the input, so after training a
projected variant folds into the same few numbers as the plain one (:meth:`tokens`).

The z half of every affix token is dead: z only gates the dropped prefix outputs, so its
gradient is exactly zero (tests/test_methods_vim_b.py shows it). It is kept, and counted, as
MambaPEFT has it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LilyConfigError
from ..registry import Method, MethodOptions, register
from .vim_adapter import vim_mixers

PLACEMENTS = ("prefix_suffix", "prefix", "suffix")


def _projection(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.Tanh(), nn.Linear(hidden, dim_out))


def _hook_free(model, attr: str, method: str) -> None:
    if not hasattr(model, attr) or not hasattr(model, "layers"):
        raise LilyConfigError(f"method '{method}' needs a Vision Mamba model with a '{attr}' hook "
                              f"(models/vim.py); {type(model).__name__} has none")
    if getattr(model, attr) is not None:
        raise LilyConfigError(f"method '{method}': the model's '{attr}' hook is already in use")


class PromptTokens(nn.Module):
    """P input tokens (num_prefix before the sequence, the rest after it)."""

    def __init__(self, num_tokens: int, dim: int, num_prefix: int, projection: bool):
        super().__init__()
        self.num_prefix = num_prefix
        self.embedding = nn.Embedding(num_tokens, dim)           # N(0, 1), as MambaPEFT
        self.projection = _projection(dim, dim, dim) if projection else None

    def forward(self) -> torch.Tensor:
        """(P, D)."""
        t = self.embedding.weight
        return t if self.projection is None else self.projection(t)

    def tokens(self) -> torch.Tensor:
        """The P x D numbers the module computes (all a trained model needs to store)."""
        with torch.no_grad():
            return self().detach().clone()


class AffixTokens(nn.Module):
    """Per layer and scan direction, T tokens in xz space: ``forward() -> (depth, 2, T, 2 d_inner)``."""

    def __init__(self, num_tokens: int, depth: int, xz_dim: int, projection: bool, hidden: int | None = None):
        super().__init__()
        self.num_tokens, self.depth, self.xz_dim = num_tokens, depth, xz_dim
        flat = depth * 2 * xz_dim                                  # per token: [layer][f, b][x | z]
        if projection:
            self.embedding = nn.Embedding(num_tokens, xz_dim)
            self.projection = _projection(xz_dim, hidden or xz_dim, flat)
        else:
            self.embedding = nn.Embedding(num_tokens, flat)
            self.projection = None

    def forward(self) -> torch.Tensor:
        t = self.embedding.weight
        if self.projection is not None:
            t = self.projection(t)
        return t.view(self.num_tokens, self.depth, 2, self.xz_dim).permute(1, 2, 0, 3)

    def tokens(self) -> torch.Tensor:
        with torch.no_grad():
            return self().detach().clone()


@dataclass
class VimPromptOptions(MethodOptions):
    name: str = "vim_prompt"
    num_tokens: int = 8                 # prompt_num_tokens
    placement: str = "prefix_suffix"    # prompt_type: half before, half after the sequence | prefix | suffix
    projection: bool = False            # prompt_projection: Embedding -> Linear -> Tanh -> Linear

    def validate(self):
        self.check_values((("num_tokens", lambda v: isinstance(v, int) and v >= 1, "a positive int"),))
        if self.placement not in PLACEMENTS:
            raise LilyConfigError(f"method.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement == "prefix_suffix" and self.num_tokens % 2:
            raise LilyConfigError(f"method.num_tokens must be even with placement=prefix_suffix "
                                  f"(half before, half after the sequence), got {self.num_tokens}")
        if not isinstance(self.projection, bool):
            raise LilyConfigError(f"method.projection must be true or false, got {self.projection!r}")

    @property
    def num_prefix(self) -> int:
        return {"prefix_suffix": self.num_tokens // 2, "prefix": self.num_tokens, "suffix": 0}[self.placement]


@register
class VimPrompt(Method):
    name = "vim_prompt"

    def label(self, opts, method_id=None):
        return "Prompt-tuning" if opts.get("projection") else "Prompt-tuning (w/o proj)"

    options = VimPromptOptions
    mergeable = "prompt tokens lengthen the sequence; they are not a change of any weight"
    source = "MambaPEFT (Yoshimura et al. 2025) prompt tuning, sony/MambaPEFT"

    def apply(self, model, opts: VimPromptOptions):
        _hook_free(model, "prompt", self.name)
        model.prompt = PromptTokens(opts.num_tokens, model.pos_embed.shape[-1], opts.num_prefix, opts.projection)


@dataclass
class VimAffixOptions(MethodOptions):
    name: str = "vim_affix"
    num_tokens: int = 3                 # num_virtual_tokens (T)
    projection: bool = True             # prefix_projection (MambaPEFT's default; the README runs false)
    hidden: int | None = None           # projection width; None: 2 * d_inner (1536 on Vim-S)

    def validate(self):
        self.check_values((("num_tokens", lambda v: isinstance(v, int) and v >= 1, "a positive int"),))
        if self.hidden is not None:
            self.check_values((("hidden", lambda v: isinstance(v, int) and v >= 1, "a positive int or null"),))
        if not isinstance(self.projection, bool):
            raise LilyConfigError(f"method.projection must be true or false, got {self.projection!r}")


@register
class VimAffix(Method):
    name = "vim_affix"

    def label(self, opts, method_id=None):
        return "Affix-tuning" if opts.get("projection") else "Affix-tuning (w/o proj)"

    options = VimAffixOptions
    mergeable = ("affix tokens lengthen every scan (they act as a learned initial state and conv "
                 "history); they are not a change of any weight")
    source = "MambaPEFT (Yoshimura et al. 2025) Affix-tuning (inner_dual_prefix), sony/MambaPEFT"

    def apply(self, model, opts: VimAffixOptions):
        _hook_free(model, "affix", self.name)
        mixers = vim_mixers(model, self.name)
        model.affix = AffixTokens(opts.num_tokens, len(mixers), mixers[0].in_proj.out_features,
                                  opts.projection, opts.hidden)
