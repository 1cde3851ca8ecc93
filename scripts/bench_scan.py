"""Time the PyTorch selective scan against the sequential reference on CPU.

Vim-S shapes by default (batch 8, L 197, d_inner 768, N 16; z, D, delta_bias and softplus
on, as in every Vim mixer direction). Prints the measured times and the ratio for the
forward pass (no grad) and for forward + backward.

    python scripts/bench_scan.py [--batch 8] [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models import mamba_ops  # noqa: E402


def make_inputs(batch, dim, L, N, seed=0):
    """Vim-like inputs in the layout the mixer passes: (batch, channels, L) views of
    token-last (batch, L, channels) tensors; A = -[1..N] as at initialisation."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).transpose(1, 2)  # noqa: E731
    return dict(
        u=r(batch, L, dim), delta=r(batch, L, dim) * 0.5,
        A=-torch.exp(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(dim, 1)),
        B=r(batch, L, N), C=r(batch, L, N), D=torch.ones(dim), z=r(batch, L, dim),
        delta_bias=torch.log(torch.expm1(torch.full((dim,), 0.01))),
    )


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=197)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    ap.add_argument("--chunk-elements", type=int, default=None,
                    help=f"override mamba_ops.CHUNK_ELEMENTS ({mamba_ops.CHUNK_ELEMENTS})")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.chunk_elements:
        mamba_ops.CHUNK_ELEMENTS = args.chunk_elements
    x = make_inputs(args.batch, args.dim, args.length, args.state)
    grad_names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def run(fn, backward):
        def go():
            ins = {k: v.clone().requires_grad_(backward and k in grad_names) for k, v in x.items()}
            with torch.set_grad_enabled(backward):
                out = fn(**ins, delta_softplus=True)
                if backward:
                    out.sum().backward()
            return out
        return go

    out_ref = run(mamba_ops.selective_scan_ref, False)()
    out_new = run(mamba_ops.selective_scan_torch, False)()
    print(f"selective scan on CPU: batch {args.batch}, L {args.length}, d_inner {args.dim}, "
          f"N {args.state}, fp32, {torch.get_num_threads()} thread(s), best of {args.repeats}; "
          f"chunk {mamba_ops._chunks(args.length, args.batch * args.dim * args.state)[1]} steps")
    print(f"max |chunked - reference| = {(out_ref - out_new).abs().max().item():.2e}")
    for label, backward in (("forward", False), ("forward+backward", True)):
        t_ref = timed(run(mamba_ops.selective_scan_ref, backward), args.repeats)
        t_new = timed(run(mamba_ops.selective_scan_torch, backward), args.repeats)
        print(f"{label:17s} reference {t_ref * 1e3:8.1f} ms   chunked {t_new * 1e3:8.1f} ms   "
              f"speed-up {t_ref / t_new:5.1f}x")


if __name__ == "__main__":
    main()
