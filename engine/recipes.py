"""MambaPEFT's training recipe as pure functions (../shared/spec/baselines-vim.md section 1).

* :func:`param_groups`: AdamW groups by mmengine's param-wise rules as MambaPEFT configures them:
  a *custom key* (a substring of the parameter's name; the longest matching key wins) sets the
  weight decay to ``weight_decay * decay_mult`` and overrides every other rule; otherwise 1-D
  tensors (biases, norm weights, other flat tensors) get no decay (``bias_decay_mult =
  norm_decay_mult = flat_decay_mult = 0``) and the rest ``weight_decay``. The custom keys are the
  method's own ``decay_mult`` (``lily.get_method(name).decay_mult``; :func:`method_decay_mult`).
* :func:`lr_at`: the learning rate of (epoch, iteration): mmengine's ``LinearLR(start_factor=1e-3,
  end=10, convert_to_iter_based=True)``, i.e. ``lr * (f + (1 - f) * t / (T - 1))`` at global
  iteration ``t < T = warmup_epochs * iters_per_epoch`` (mmengine's ``total_iters = end - begin -
  1``: the factor reaches 1 at the last warm-up iteration), then ``CosineAnnealingLR(eta_min=1e-5,
  begin=10)`` per epoch: ``min_lr + (lr - min_lr) * (1 + cos(pi * (e - 10) / (epochs - 10))) / 2``
  for every iteration of epoch ``e >= 10``.
* :class:`IterationSchedule`: :func:`lr_at` behind timm's scheduler interface (``step(epoch)``,
  ``step_update(num_updates)``, ``state_dict``), setting every group's lr (groups may scale it by
  their ``lr_scale``).
* :func:`before_step`: what the training step does between backward and ``optimizer.step()``
  under this recipe (per-iteration lr, gradient clipping at max-norm ``grad_clip``).

Config: ``configs/optim/mambapeft.yaml`` (read through ``recipe=mambapeft``).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import nn


def method_decay_mult(method_name: str) -> dict[str, float]:
    """The registered method's per-parameter decay multipliers ``{substring: mult}`` (empty if none)."""
    import lily
    return dict(getattr(lily.get_method(method_name), "decay_mult", None) or {})


def decay_for(name: str, param: torch.Tensor, weight_decay: float, decay_mult: Mapping[str, float] | None = None,
              no_decay_1d: bool = True) -> float:
    """The weight decay of one parameter under the rules above (custom keys by substring, longest first)."""
    keys = sorted(sorted(decay_mult or {}), key=len, reverse=True)   # mmengine: alphabetical, then longest first
    for key in keys:
        if key in name:
            return weight_decay * float(decay_mult[key])
    if no_decay_1d and param.ndim <= 1:
        return 0.0
    return weight_decay


def param_groups(model: nn.Module, weight_decay: float, decay_mult: Mapping[str, float] | None = None,
                 no_decay_1d: bool = True) -> list[dict]:
    """AdamW parameter groups of the trainable parameters, one per distinct weight decay (in the
    order first met); each group also lists its parameter ``names``."""
    groups: dict[float, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = decay_for(name, p, weight_decay, decay_mult, no_decay_1d)
        g = groups.setdefault(wd, {"params": [], "names": [], "weight_decay": wd})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def make_adamw(model: nn.Module, o, method_name: str | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` from an optim config (``lr``, ``weight_decay``, ``betas``,
    ``eps``, ``no_decay_1d``; ``decay_rules: method`` reads the method's ``decay_mult``)."""
    rules = method_decay_mult(method_name) if (o.get("decay_rules") == "method" and method_name) else {}
    groups = param_groups(model, float(o.weight_decay), rules, bool(o.get("no_decay_1d", True)))
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=float(o.lr), betas=tuple(o.get("betas", (0.9, 0.999))),
                             eps=float(o.get("eps", 1e-8)))


def lr_at(epoch: int, iteration: int, iters_per_epoch: int, *, base_lr: float, epochs: int, warmup_epochs: int,
          warmup_start_factor: float, min_lr: float) -> float:
    """The lr of iteration ``iteration`` (0-based, within the epoch) of epoch ``epoch`` (0-based)."""
    if epoch < warmup_epochs:
        total = warmup_epochs * iters_per_epoch
        t = epoch * iters_per_epoch + iteration
        frac = t / (total - 1) if total > 1 else 1.0
        return base_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * frac)
    span = epochs - warmup_epochs
    k = epoch - warmup_epochs
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * k / span)) / 2


class IterationSchedule:
    """:func:`lr_at` with timm's scheduler interface; ``step_update`` is called once per iteration
    (``num_updates`` = global iteration index of the step about to run)."""

    def __init__(self, optimizer: torch.optim.Optimizer, o, iters_per_epoch: int):
        self.optimizer, self.iters_per_epoch = optimizer, int(iters_per_epoch)
        self.kw = dict(base_lr=float(o.lr), epochs=int(o.epochs), warmup_epochs=int(o.warmup_epochs),
                       warmup_start_factor=float(o.warmup_start_factor), min_lr=float(o.min_lr))
        self.last = None
        self._set(0, 0)

    def _set(self, epoch: int, iteration: int) -> None:
        lr = lr_at(epoch, iteration, self.iters_per_epoch, **self.kw)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.last = (epoch, iteration, lr)

    def step(self, epoch: int, metric=None) -> None:
        """At the start of ``epoch`` (timm's per-epoch call)."""
        self._set(epoch, 0)

    def step_update(self, num_updates: int, metric=None) -> None:
        self._set(num_updates // self.iters_per_epoch, num_updates % self.iters_per_epoch)

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        if state.get("last"):
            self._set(*state["last"][:2])


def before_step(model: nn.Module, scheduler, o, epoch: int, iters_per_epoch: int) -> Callable[[int], None] | None:
    """``fn(step)`` to call after ``loss.backward()`` and before ``optimizer.step()`` for step ``step``
    of ``epoch``: the per-iteration lr (when the schedule is an :class:`IterationSchedule`) and
    gradient clipping (``o.grad_clip``, max-norm over the trainable parameters). None when the
    recipe needs neither."""
    clip = o.get("grad_clip")
    per_iter = isinstance(scheduler, IterationSchedule)
    if not clip and not per_iter:
        return None
    params = [p for p in model.parameters() if p.requires_grad]

    def fn(step: int) -> None:
        if per_iter:
            scheduler.step_update(epoch * iters_per_epoch + step)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, float(clip))
    return fn
