"""Merging adapters into frozen weights, safely: check everything first, change nothing on refusal,
and restore the exact (bit for bit) original weights on unmerge.

A module that can fold itself into frozen parameters subclasses :class:`Mergeable` and implements
:meth:`Mergeable.merge_plan`: the new values of the parameters it folds into, computed from the
current weights, or :class:`MergeError` (raised before anything changes). While merged, its
forward must skip its own path (it reads ``self.merged``).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import MergeError


class Mergeable:
    """Mixin for modules that fold into frozen parameters (``merge_plan``), merged and unmerged by
    :func:`safe_merge` / :func:`unmerge_all`."""

    merged: bool = False

    def merge_plan(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``[(parameter, its merged value)]``; raises :class:`MergeError` when it cannot merge."""
        raise MergeError(f"{type(self).__name__} cannot be merged")

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        plan = self.merge_plan()
        originals = []
        for p, value in plan:
            if value.shape != p.shape:
                raise MergeError(f"{type(self).__name__}: merged value of shape {tuple(value.shape)} for a "
                                 f"parameter of shape {tuple(p.shape)}")
        for p, value in plan:
            originals.append((p, p.detach().clone()))
            p.copy_(value.to(p.dtype))
        self._merge_originals = originals
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for p, original in reversed(self._merge_originals):
            p.copy_(original)
        self._merge_originals = []
        self.merged = False


def mergeables(model: nn.Module) -> list[Mergeable]:
    return [m for m in model.modules() if isinstance(m, Mergeable)]


def hook_adapters(model: nn.Module) -> list[str]:
    """Names of modules carrying hook-attached adapters (parallel/residual): never mergeable."""
    return [n for n, m in model.named_modules()
            if isinstance(getattr(m, "adapters", None), nn.ModuleDict) and not isinstance(m, Mergeable)
            and len(m.adapters)]


def safe_merge(model: nn.Module) -> None:
    """Merge every :class:`Mergeable` of ``model``. Every plan is computed first, so a refusal
    changes nothing; should a merge still fail midway, the merged ones are restored."""
    hooked = hook_adapters(model)
    if hooked:
        raise MergeError(f"parallel adapters with a non-linear hidden layer cannot be merged ({hooked[0]}, ...)")
    ms = [m for m in mergeables(model) if not m.merged]
    for m in ms:
        m.merge_plan()          # raises before anything changes
    done = []
    try:
        for m in ms:
            m.merge()
            done.append(m)
    except Exception:
        for m in reversed(done):
            m.unmerge()
        raise


def unmerge_all(model: nn.Module) -> None:
    for m in reversed(mergeables(model)):
        m.unmerge()
