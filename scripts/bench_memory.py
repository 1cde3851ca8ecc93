"""Peak memory of one training step, for scripts/bench.py.

Reported: the peak memory a training step adds on top of what is held between steps
(weights, data, optimizer state): activations saved for backward, temporaries, gradients.
A warm-up step runs first (it creates the optimizer state).

- CUDA (:func:`cuda_step_peak`): ``torch.cuda.max_memory_allocated`` during the step minus
  ``torch.cuda.memory_allocated`` before it.
- CPU (:func:`cpu_step_peak`, Linux with glibc): the process's resident set, in a fresh
  process (:func:`cpu_step_peaks` runs this file as a script, one process per backbone).
  glibc is told, before anything is allocated, to serve every allocation of 128 KiB or
  more with its own mmap (``mallopt``, which also stops it from raising that threshold by
  itself), so a freed tensor leaves the resident set at once and a new one enters it; the
  kernel's resident-set high-water mark is reset (``/proc/self/clear_refs``) and read back
  after the step: peak RSS during the step minus RSS before it. Allocations under 128 KiB
  may reuse resident heap pages and are undercounted (negligible at these sizes). It must
  be a fresh process: in one that has already run (timed) steps, the large free heap
  would serve new tensors and keep freed ones resident, and the step's total allocations
  would be counted instead of its peak. (The mmap threshold would also slow the timing.)
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import re
import subprocess
import sys

import torch

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 * 1024


def _one_step(model, optimizer, data, batch_size, device, precision, epoch=0):
    from engine.step import train_epoch
    train_epoch(model, optimizer, data, batch_size=batch_size, seed=0, epoch=epoch, device=device,
                normalization="none", precision=precision, max_steps=1)


def cuda_step_peak(model, optimizer, data, batch_size, device, precision) -> int:
    """Bytes one training step allocates on the GPU above what was allocated before it."""
    _one_step(model, optimizer, data, batch_size, device, precision)  # warm-up: optimizer state
    torch.cuda.synchronize(device)
    gc.collect()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _one_step(model, optimizer, data, batch_size, device, precision, epoch=1)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


_LIBC = None


def _glibc():
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        name = ctypes.util.find_library("c")
        if name and os.path.exists("/proc/self/clear_refs"):
            try:
                libc = ctypes.CDLL(name)
                if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
                    _LIBC = libc
            except (OSError, AttributeError):
                pass
    return _LIBC or None


def enable_rss_tracking() -> bool:
    """Set glibc's mmap threshold now (call before building models); False where unsupported."""
    return _glibc() is not None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def cpu_step_peak(model, optimizer, data, batch_size, precision) -> int | None:
    """Bytes one CPU training step adds to the resident set, or None where this cannot be
    measured (no glibc or no /proc/self/clear_refs)."""
    libc = _glibc()
    if libc is None:
        return None
    device = torch.device("cpu")
    _one_step(model, optimizer, data, batch_size, device, precision)  # warm-up: optimizer state
    gc.collect()
    libc.malloc_trim(0)
    before = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark to the current RSS
    except OSError:
        return None
    _one_step(model, optimizer, data, batch_size, device, precision, epoch=1)
    return _status_bytes("VmHWM") - before


def cpu_step_peaks(backbone: str, entries: list[tuple[str, str, str]], image_size: int, batch_size: int,
                   threads: int | None, timeout: int = 900, depth: int | None = None) -> dict:
    """``{(method, design, precision): bytes or None}`` for ``entries`` of one backbone,
    measured in one fresh subprocess (see the module docstring)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--backbone", backbone, "--image-size", str(image_size),
           "--batch-size", str(batch_size), "--entries", json.dumps(entries)]
    if threads:
        cmd += ["--threads", str(threads)]
    if depth:
        cmd += ["--depth", str(depth)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        print(f"memory probe for {backbone} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {tuple(k.split("/")): v for k, v in out.items()}


def _probe(args) -> dict:
    enable_rss_tracking()  # first, before torch allocates anything large
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    from bench_models import adapted, build_backbone, make_optimizer, synthetic_split
    from bench_replaced import replace_design

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_backbone(args.backbone, args.image_size, args.depth)
    data = synthetic_split(args.batch_size * 2, args.image_size)
    out = {}
    for method, design, precision in json.loads(args.entries):
        model = adapted(base, args.backbone, method)
        if design == "replaced":
            replace_design(model)
        optimizer = make_optimizer(model)
        out[f"{method}/{design}/{precision}"] = cpu_step_peak(model, optimizer, data, args.batch_size, precision)
        del model, optimizer
        gc.collect()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="CPU training-step memory probe (used by scripts/bench.py)")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--entries", required=True, help='JSON list of [method, design, precision]')
    ap.add_argument("--image-size", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None, help="blocks of the backbone (default: all)")
    print(json.dumps(_probe(ap.parse_args())))
