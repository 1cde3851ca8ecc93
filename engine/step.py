"""The training epoch and the evaluation, with nothing wasted and results unchanged.

What the loop below does not do (and the straightforward loop did):

- no host-device synchronisation inside the loop: no ``loss.item()`` per step, no
  per-batch ``.cpu()`` of predictions. The training loss is summed on the device
  (``sum of loss * batch``, float64) and correct predictions are counted on the device;
  both are read back once, after the loop;
- no per-batch upload of the normalisation constants (``data.normalize`` builds them with
  ``torch.tensor(..., device=...)`` on every call, a blocking copy on CUDA); they are made
  once per epoch here with the same arithmetic, so inputs are bit-identical;
- no per-batch host-to-device copy when the split lives on the device (:func:`to_device`);
  otherwise each batch is gathered straight into pinned memory and copied asynchronously.

The batch order is ``data.loader.Batches.order()``: a deterministic function of
``(seed, epoch)``, identical to ``data.batches(..., shuffle=True, drop_last=True)``, so a
run trains on the same batches as the straightforward loop and its parameters after an
epoch are bit-identical to it (tests/test_step.py). Randomness inside the model
(dropout, drop-path) draws from torch's global generators, exactly as before: a caller
that resumes mid-epoch restores ``torch.get_rng_state()`` (and CUDA's) from its checkpoint.

API (all keyword arguments after the first ones are keyword-only)::

    configure_backend(device, precision="fp32", tf32=True)     # once per process/run
    ctx = precision_context(device, precision)                 # autocast or nothing
    data = to_device(data, device, max_bytes)                  # once per split
    model = maybe_compile(model, enabled)                      # optional torch.compile
    out = train_epoch(model, optimizer, data, batch_size=64, seed=42, epoch=e, device=device,
                      normalization="none", precision="fp32", start_step=0, max_steps=None,
                      should_stop=None, progress_desc=None)
    ev = evaluate(model, data, batch_size=256, device=device, normalization="none",
                  precision="fp32", progress_desc=None)
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lily
from data.loader import Batches
from data.normalize import mean_std
from common.errors import UserError

PRECISIONS = ("fp32", "bf16")


# ---------------------------------------------------------------------------------------
# precision and backend
# ---------------------------------------------------------------------------------------
def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of PRECISIONS, else a UserError."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}' "
                        "(fp32: no autocast, TF32 matmuls on CUDA when tf32=true; bf16: bfloat16 autocast)")
    return precision


def configure_backend(device, precision: str = "fp32", tf32: bool = True) -> None:
    """Process-wide backend flags for a run on ``device``.

    On CUDA, ``tf32`` lets fp32 matmuls and cuDNN convolutions use TF32 tensor cores (what
    the authors' torch 1.10 did by default on Ampere and newer); ``tf32=False`` asks for
    IEEE fp32. cuDNN's ``benchmark``/``deterministic`` flags are left as they are. On CPU
    nothing changes. ``precision`` is validated (a UserError when unknown).
    """
    check_precision(precision)
    device = torch.device(device)
    if device.type != "cuda":
        return
    # the long-standing flags: torch >= 2.9 mirrors them into its newer ``fp32_precision``
    # settings, whereas setting those newer ones makes the old getters (still read by
    # libraries) raise a RuntimeError about mixing the two APIs
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def precision_context(device, precision: str):
    """A context for the forward pass: ``torch.autocast(bf16)`` for ``bf16``, nothing for ``fp32``."""
    check_precision(precision)
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when ``enabled``, else ``model`` itself.

    Off by default: on CPU it was not measured faster with identical results (see
    docs/performance.md). The compiled wrapper shares the model's parameters but prefixes
    its state-dict keys with ``_orig_mod.``: keep the original module for checkpoints.
    """
    return torch.compile(model) if enabled else model


# ---------------------------------------------------------------------------------------
# data on the device
# ---------------------------------------------------------------------------------------
def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def to_device(data, device, max_bytes: int):
    """The split with its uint8 images and labels moved to ``device`` once, when they fit.

    Returns a copy of ``data`` (same fields, a ``SplitData`` stays a ``SplitData``) whose
    ``images``/``labels`` live on ``device`` when ``device`` is not the CPU and
    ``images.nbytes + labels.nbytes <= max_bytes``; otherwise ``data`` itself (on the CPU,
    or too large: batches are then gathered from the memory-mapped cache and copied).
    """
    device = torch.device(device)
    if device.type == "cpu" or (_on(data.images, device) and _on(data.labels, device)):
        return data
    nbytes = data.images.numel() * data.images.element_size() + data.labels.numel() * data.labels.element_size()
    if nbytes > max_bytes:
        return data
    return dataclasses.replace(data, images=data.images.to(device), labels=data.labels.to(device))


class _Feeder:
    """Batches of one split as model inputs on ``device``: uint8 rows gathered (or sliced),
    moved, converted to float32 and normalised exactly as ``data.normalize.normalize`` does."""

    def __init__(self, data, device: torch.device, normalization: str):
        self.images, self.labels, self.device = data.images, data.labels, device
        self.resident = device.type != "cpu" and _on(self.images, device)  # batches gathered on the device
        self.pin = device.type == "cuda" and not self.resident
        stats = mean_std(normalization)  # UserError for an unknown mode
        self.mean = self.std = None
        if stats is not None:  # made once (normalize() uploads them per call)
            self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device) for v in stats)

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True) if self.pin else t.to(self.device)

    def index(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` (on the images' device) -> (normalised float images, labels) on ``device``."""
        if self.pin:  # gather straight into pinned memory, then an asynchronous copy
            x = torch.index_select(self.images, 0, idx, out=_pinned(len(idx), self.images))
            y = torch.index_select(self.labels, 0, idx, out=_pinned(len(idx), self.labels))
        else:
            x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        return self.normalize(self._move(x)), self._move(y)

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.images[start:stop], self.labels[start:stop]
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return self.normalize(self._move(x)), self._move(y)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        out = x.to(torch.float32).div_(255)
        return out if self.mean is None else out.sub_(self.mean).div_(self.std)


def _pinned(rows: int, like: torch.Tensor) -> torch.Tensor:
    # from torch's caching host allocator: reused once the asynchronous copy that used it is done
    return torch.empty((rows, *like.shape[1:]), dtype=like.dtype, pin_memory=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data, *, batch_size: int, seed: int,
                epoch: int, device, normalization: str, precision: str, start_step: int = 0,
                max_steps: int | None = None, should_stop: Callable[[], bool] | None = None,
                progress_desc: str | None = None, before_step: Callable[[int], None] | None = None) -> dict:
    """One epoch of training over ``data`` (a ``SplitData`` or its :func:`to_device` copy).

    Order: ``Batches(data, batch_size, shuffle=True, drop_last=True, seed, epoch).order()``,
    i.e. the batches ``data.batches`` yields. The epoch has ``E = len(data) // batch_size``
    steps, or ``min(E, max_steps)`` with ``max_steps`` (a debug cap counted from the start
    of the epoch). Steps ``start_step, start_step+1, ...`` are run (``start_step > 0``
    resumes an epoch interrupted after ``start_step`` steps: the first ``start_step``
    batches of this epoch's order are skipped). The model is put in train mode; a step is: forward under
    :func:`precision_context`, cross-entropy, ``optimizer.zero_grad(set_to_none=True)``,
    backward, ``optimizer.step()``. Before each step ``should_stop()`` (a cheap host-side
    check, e.g. a preemption flag) is asked; True ends the epoch there, before that step
    (so a stop requested after an epoch's last step is reported by the next call, which
    then runs no step).

    Returns ``{"loss_sum": float (sum over steps of loss * batch), "images": int,
    "loss": loss_sum / images (nan when no step ran), "steps_done": steps run by this call,
    "next_step": start_step + steps_done (the ``start_step`` to resume from),
    "completed": bool (the epoch's last step is done), "seconds": float (wall time,
    device synchronised), "images_per_s": float}``.
    """
    device = torch.device(device)
    check_precision(precision)
    n = len(data.labels)
    if n < batch_size:
        raise UserError(f"batch_size={batch_size} is larger than the {n} training images "
                        "(drop_last=True leaves no step)")
    batches = Batches(data, batch_size, shuffle=True, drop_last=True, seed=seed, epoch=epoch)
    end = len(batches) if max_steps is None else min(len(batches), max_steps)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    feeder = _Feeder(data, device, normalization)
    order = batches.order()
    if feeder.resident:  # one small upload per epoch; batches are then gathered on the device
        order = order.pin_memory().to(device, non_blocking=True)
    model.train()
    ctx = precision_context(device, precision)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    start, steps = time.perf_counter(), 0
    bar = tqdm(total=end * batch_size, initial=min(start_step, end) * batch_size, desc=progress_desc,
               unit="img", unit_scale=True, leave=False, disable=progress_desc is None)
    with bar:
        for step in range(start_step, end):
            if should_stop is not None and should_stop():
                break
            x, y = feeder.index(order[step * batch_size:(step + 1) * batch_size])
            with ctx:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:  # a recipe's per-iteration lr and gradient clipping (engine/recipes.py)
                before_step(step)
            optimizer.step()
            loss_sum += loss.detach().double() * batch_size
            steps += 1
            bar.update(batch_size)
    _sync(device)
    seconds = time.perf_counter() - start
    total = loss_sum.item()  # the one read-back of the epoch
    images = steps * batch_size
    return {"loss_sum": total, "images": images, "loss": total / images if images else float("nan"),
            "steps_done": steps, "next_step": start_step + steps, "completed": start_step + steps >= end,
            "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(model: torch.nn.Module, data, *, batch_size: int, device, normalization: str, precision: str,
             progress_desc: str | None = None, predictions: bool = False, topk: int = 5) -> dict:
    """Top-1 accuracy over ``data`` in its stored order, batches of ``batch_size`` (the last
    one smaller), under ``torch.inference_mode`` and :func:`precision_context`.

    Returns ``{"acc": percent, "images": int, "seconds": float (device synchronised),
    "images_per_s": float, "experts": {kind: [[w_1..w_Ne] per layer]}}``. ``experts`` holds,
    for every key ``lily.expert_weights(model)`` returns (q, k, v, ffn, in_proj, ... and any
    future kind), each layer's expert weights averaged over the data, weighted by batch size;
    ``{}`` for models without Lily. The model's train/eval mode is restored afterwards.
    With ``predictions=True`` it also returns, per image in order, ``pred`` (argmax), ``label``,
    ``topk_index`` and ``topk_logit`` (the ``min(topk, classes)`` largest logits, descending) as
    CPU tensors (read back once, after the last batch).
    """
    device = torch.device(device)
    check_precision(precision)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    feeder = _Feeder(data, device, normalization)
    ctx = precision_context(device, precision)
    n = len(data.labels)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    experts: dict[str, torch.Tensor] = {}
    kept: list[tuple[torch.Tensor, ...]] = []
    start = time.perf_counter()
    with tqdm(total=n, desc=progress_desc, unit="img", unit_scale=True, leave=False,
              disable=progress_desc is None) as bar:
        for i in range(0, n, batch_size):
            x, y = feeder.slice(i, min(i + batch_size, n))
            with ctx:
                logits = model(x)
            pred = logits.argmax(-1)
            correct += (pred == y).sum()
            if predictions:
                top = logits.float().topk(min(topk, logits.shape[-1]), dim=-1)
                kept.append((pred, y, top.indices, top.values))
            for kind, w in lily.expert_weights(model, cpu=False).items():  # summed on the device
                experts[kind] = experts.get(kind, 0) + w * len(y)
            bar.update(len(y))
    _sync(device)
    hits = correct.item()
    seconds = time.perf_counter() - start
    model.train(was_training)
    out = {"acc": 100.0 * hits / max(n, 1), "images": n, "seconds": seconds,
           "images_per_s": n / max(seconds, 1e-9),
           "experts": {k: (v / max(n, 1)).cpu().tolist() for k, v in experts.items()}}
    if predictions:
        out.update({key: torch.cat([k[i] for k in kept]).cpu() if kept else torch.zeros(0)
                    for i, key in enumerate(("pred", "label", "topk_index", "topk_logit"))})
    return out
