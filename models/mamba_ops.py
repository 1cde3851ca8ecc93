"""Selective scan and causal depthwise conv for the Vision Mamba backbone.

Two paths, chosen per call (facts: ../shared/spec/vim.md sections 2.2 and 5):

* ``cuda``: the compiled kernels of ``mamba-ssm`` (``selective_scan_fn``) and
  ``causal-conv1d`` (``causal_conv1d_fn``), used when they import and the tensors live on
  a CUDA device. Both packages raise at import time without their compiled extensions,
  so the imports are guarded and attempted lazily.
* ``pytorch``: written here, runs anywhere. The selective scan is a custom autograd
  function that walks the sequence in time chunks: it never materialises the
  (batch, dim, L, N) state tensors of the whole sequence, saves only O(batch*dim*L)
  values for backward, and recomputes each chunk's states there (as the CUDA kernel
  does). Its gradients are the exact analytic ones; the tests compare them with
  autograd through :func:`selective_scan_ref`.

``mode`` is ``"auto"`` (kernels when possible), ``"cuda"`` (kernels required) or
``"pytorch"`` (never the kernels); ``None`` reads the ``VIM_KERNELS`` environment
variable and defaults to ``"auto"``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

MODES = ("auto", "cuda", "pytorch")

# ----------------------------------------------------------------------------------------
# Kernel discovery
# ----------------------------------------------------------------------------------------
_KERNELS: dict | None = None


def _load_kernels() -> dict:
    """Import the compiled kernels once; any failure (missing package, missing compiled
    extension, ABI mismatch, missing triton...) leaves that kernel as None."""
    global _KERNELS
    if _KERNELS is None:
        found = {"selective_scan": None, "causal_conv1d": None, "errors": {}}
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            found["selective_scan"] = selective_scan_fn
        except Exception as e:  # noqa: BLE001 - any import failure means "no kernel"
            found["errors"]["selective_scan"] = f"{type(e).__name__}: {e}"
        try:
            from causal_conv1d import causal_conv1d_fn
            found["causal_conv1d"] = causal_conv1d_fn
        except Exception as e:  # noqa: BLE001
            found["errors"]["causal_conv1d"] = f"{type(e).__name__}: {e}"
        _KERNELS = found
    return _KERNELS


def kernel_status() -> dict:
    """{'selective_scan': bool, 'causal_conv1d': bool, 'errors': {...}} (imports once)."""
    k = _load_kernels()
    return {"selective_scan": k["selective_scan"] is not None,
            "causal_conv1d": k["causal_conv1d"] is not None,
            "errors": dict(k["errors"])}


def resolve_mode(mode: str | None) -> str:
    if mode is None:
        mode = os.environ.get("VIM_KERNELS", "auto")
    mode = str(mode).lower()
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    return mode


def _use_kernel(name: str, x: torch.Tensor, mode: str | None) -> bool:
    mode = resolve_mode(mode)
    if mode == "pytorch":
        return False
    available = _load_kernels()[name] is not None
    if mode == "cuda":
        if not available:
            raise RuntimeError(f"kernels='cuda' but the {name} kernel does not import: "
                               f"{_load_kernels()['errors'].get(name)}")
        if not x.is_cuda:
            raise RuntimeError(f"kernels='cuda' but the input is on {x.device}")
        return True
    return available and x.is_cuda


# ----------------------------------------------------------------------------------------
# Causal depthwise conv
# ----------------------------------------------------------------------------------------
def causal_conv1d(x, weight, bias=None, activation: str | None = "silu", mode: str | None = None):
    """Causal depthwise conv over the last axis. x: (batch, dim, L); weight: (dim, 1, w)
    or (dim, w); bias: (dim,). out[c, t] = bias[c] + sum_k weight[c, k] * x[c, t-w+1+k]
    (zeros before t=0), then SiLU if activation is "silu"/"swish"."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    dim, width = weight.shape[0], weight.shape[-1]
    if _use_kernel("causal_conv1d", x, mode):
        fn = _load_kernels()["causal_conv1d"]
        # activation by keyword: the positional order changed across causal-conv1d releases
        return fn(x.contiguous(), weight.reshape(dim, width), bias, activation=activation)
    # Token-last shift-and-add: w multiply-adds on (b, L, dim) rows, no transposes for
    # the transposed token-last views the mixer passes (measured as fast as F.conv1d).
    xt = F.pad(x.transpose(1, 2), (0, 0, width - 1, 0))          # (b, w-1+L, dim)
    L = x.shape[-1]
    w = weight.reshape(dim, width)
    out = xt[:, width - 1:] * w[:, width - 1]
    if bias is not None:
        out = out + bias
    for k in range(width - 1):
        out = out + xt[:, k:k + L] * w[:, k]
    out = F.silu(out) if activation is not None else out
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------
# Selective scan: dispatch
# ----------------------------------------------------------------------------------------
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   mode: str | None = None):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) (input dependent);
    D, delta_bias: (dim,). delta_bias is added before the softplus. Returns (batch, dim, L)
    in u's dtype: y_t = sum_n C_t[n] h_t[n] + D u_t, times SiLU(z_t) when z is given, with
    h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t u_t and h_{-1} = 0.
    """
    if _use_kernel("selective_scan", u, mode):
        fn = _load_kernels()["selective_scan"]
        dt = u.dtype
        return fn(u.contiguous(), delta.to(dt).contiguous(), A.float(), B.to(dt).contiguous(),
                  C.to(dt).contiguous(), None if D is None else D.float(),
                  z=None if z is None else z.to(dt).contiguous(),
                  delta_bias=None if delta_bias is None else delta_bias.float(),
                  delta_softplus=delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


# ----------------------------------------------------------------------------------------
# Selective scan: sequential reference (plain autograd, fp32, one step at a time)
# ----------------------------------------------------------------------------------------
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Plain per-step loop in fp32, differentiable through autograd. Used by the tests and
    the benchmark; far too slow and memory hungry for training."""
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A)                                  # (b, d, N)
        dBu = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]        # (b, d, N)
        h = dA * h + dBu
        ys.append((h * C[:, None, :, t]).sum(-1))                                  # (b, d)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


# ----------------------------------------------------------------------------------------
# Selective scan: the fast PyTorch path
# ----------------------------------------------------------------------------------------
# Work is done token-last, (batch, L, channels), the layout the mixer produces, so the
# (batch, dim, L) views it passes in need no copies. The sequence is walked in time
# chunks of T steps with (batch, T, N, dim) work buffers (dim innermost, so every sum over
# the N states is a fast vectorised reduction): exp of the chunk's log-decays is one
# vectorised op, the recurrence one in-place multiply-add per step.
# CHUNK_ELEMENTS = elements of one work buffer; about 1M fp32 (4 MB) keeps the buffers
# cache friendly and out of glibc's mmap range, so they are not page-faulted in afresh
# for every call (measured with scripts/bench_scan.py).
CHUNK_ELEMENTS = 1 << 20
# Chunk-entry states up to this many elements are kept from forward for backward;
# beyond it (large batches) backward recomputes them with one extra forward sweep.
SAVE_STARTS_ELEMENTS = 1 << 23
LOG2E = 1.4426950408889634


def _chunks(L: int, per_step: int):
    T = max(1, min(L, CHUNK_ELEMENTS // max(1, per_step)))
    return [(s, min(s + T, L)) for s in range(0, L, T)], T


def _token_last(x):
    """(b, c, L) -> (b, L, c) fp32; free when x is a transposed token-last tensor."""
    return x.float().transpose(1, 2).contiguous()


def _fill_chunk(a, x, delta, A2t, B, du, h0):
    """Write exp(delta A) into ``a`` and the states h_t into ``x`` for one time chunk.

    a, x: (b, n, N, d) buffers; delta, du (= delta*u): (b, n, d); A2t = (A*log2 e)^T:
    (N, d) (exp2 is about 3x faster than exp on CPU; the CUDA kernel uses exp2 the same
    way); B: (b, n, N); h0: (b, N, d), the state entering the chunk.
    """
    torch.mul(delta.unsqueeze(2), A2t, out=a)
    a.exp2_()
    torch.mul(du.unsqueeze(2), B.unsqueeze(-1), out=x)
    xs, as_ = x.unbind(1), a.unbind(1)
    xs[0].addcmul_(as_[0], h0)
    for t in range(1, len(xs)):
        xs[t].addcmul_(as_[t], xs[t - 1])


def _forward_sweep(dl, du, A2t, Bt, Ct=None, keep_starts=False):
    """Run the recurrence over the whole sequence. Returns (y, starts): y (b, L, d) =
    sum_n C h (when Ct is given) and the states entering each chunk (when keep_starts)."""
    b, L, d = dl.shape
    N = A2t.shape[0]
    spans, T = _chunks(L, b * d * N)
    a = dl.new_empty(b, T, N, d)
    x = torch.empty_like(a)
    starts = dl.new_zeros(len(spans) if keep_starts else 2, b, N, d)
    y = dl.new_empty(b, L, d) if Ct is not None else None
    for i, (s, e) in enumerate(spans):
        n = e - s
        h0 = starts[i] if keep_starts else starts[i % 2]
        _fill_chunk(a[:, :n], x[:, :n], dl[:, s:e], A2t, Bt[:, s:e], du[:, s:e], h0)
        if i + 1 < len(spans):
            (starts[i + 1] if keep_starts else starts[(i + 1) % 2]).copy_(x[:, n - 1])
        if Ct is not None:
            torch.sum(torch.mul(x[:, :n], Ct[:, s:e].unsqueeze(-1), out=a[:, :n]), 2, out=y[:, s:e])
    return y, (starts if keep_starts else None)


def _prepare(u, delta, B, A, delta_bias, softplus):
    ut, dt, Bt = _token_last(u), _token_last(delta), _token_last(B)
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    dl = F.softplus(dt) if softplus else dt
    return ut, dt, dl, dl * ut, Bt, (A.float() * LOG2E).t().contiguous()


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, L = u.shape
        ut, _, dl, du, Bt, A2t = _prepare(u, delta, B, A, delta_bias, delta_softplus)
        needs_grad = any(t is not None and t.requires_grad
                         for t in (u, delta, A, B, C, D, z, delta_bias))
        n_starts = len(_chunks(L, batch * dim * A.shape[1])[0])
        keep = needs_grad and n_starts * batch * dim * A.shape[1] <= SAVE_STARTS_ELEMENTS
        y, starts = _forward_sweep(dl, du, A2t, Bt, _token_last(C), keep_starts=keep)
        if D is not None:
            y.addcmul_(ut, D.float())
        out = y * F.silu(_token_last(z)) if z is not None else y
        if needs_grad:
            # y (before the gate) is only needed for z's gradient
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts,
                                  y if z is not None else None)
            ctx.delta_softplus = delta_softplus
        return out.to(u.dtype).transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        u, delta, A, B, C, D, z, delta_bias, starts, y = ctx.saved_tensors
        batch, dim, L = u.shape
        N = A.shape[1]
        ut, dt, dl, du, Bt, A2t = _prepare(u, delta, B, A, delta_bias, ctx.delta_softplus)
        Ct, At = _token_last(C), A.float().t().contiguous()
        if starts is None:
            _, starts = _forward_sweep(dl, du, A2t, Bt, keep_starts=True)
        g = _token_last(gout)
        gz = None
        if z is not None:
            zt = _token_last(z)
            sz = torch.sigmoid(zt)
            gz = g * y * sz * (1 + zt * (1 - sz))       # d silu(z)/dz = s (1 + z (1 - s))
            g = g * zt * sz                              # gradient w.r.t. y
        spans, T = _chunks(L, batch * dim * N)
        a = ut.new_empty(batch, T, N, dim)
        hs, lam = torch.empty_like(a), torch.empty_like(a)
        gB, gC = ut.new_empty(batch, L, N), ut.new_empty(batch, L, N)
        lamB = ut.new_empty(batch, L, dim)               # sum_n lambda_t[n] B_t[n]
        gdl = ut.new_empty(batch, L, dim)                # gradient w.r.t. Delta
        gAt = At.new_zeros(N, dim)
        carry = ut.new_zeros(batch, N, dim)              # a_{t+1} lambda_{t+1} from the chunk after
        for i in range(len(spans) - 1, -1, -1):
            s, e = spans[i]
            n = e - s
            a_, h_, l_ = a[:, :n], hs[:, :n], lam[:, :n]
            _fill_chunk(a_, h_, dl[:, s:e], A2t, Bt[:, s:e], du[:, s:e], starts[i])
            # adjoint state: lambda_t = C_t g_t + a_{t+1} lambda_{t+1}
            torch.mul(g[:, s:e].unsqueeze(2), Ct[:, s:e].unsqueeze(-1), out=l_)
            l_[:, n - 1].add_(carry)
            ls, as_ = l_.unbind(1), a_.unbind(1)
            for t in range(n - 2, -1, -1):
                ls[t].addcmul_(as_[t + 1], ls[t + 1])
            torch.mul(as_[0], ls[0], out=carry)
            # w_t = lambda_t a_t h_{t-1}: gradient w.r.t. the log-decay Delta_t A (into a_)
            a_.mul_(l_)
            a_[:, 1:].mul_(h_[:, :-1])
            a_[:, 0].mul_(starts[i])
            # dC_t = sum_d g_t h_t (h_ is free afterwards and becomes scratch)
            torch.sum(h_.mul_(g[:, s:e].unsqueeze(2)), -1, out=gC[:, s:e])
            torch.sum(torch.mul(l_, du[:, s:e].unsqueeze(2), out=h_), -1, out=gB[:, s:e])
            torch.sum(torch.mul(l_, Bt[:, s:e].unsqueeze(-1), out=h_), 2, out=lamB[:, s:e])
            torch.sum(torch.mul(a_, At, out=h_), 2, out=gdl[:, s:e])
            gAt += a_.mul_(dl[:, s:e].unsqueeze(2)).sum((0, 1))
        gdl.addcmul_(ut, lamB)
        gu = dl * lamB
        gD = None
        if D is not None:
            gu.addcmul_(g, D.float())
            gD = (g * ut).sum((0, 1)).to(D.dtype)
        gdt = gdl * torch.sigmoid(dt) if ctx.delta_softplus else gdl
        gbias = gdt.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None

        def back(t, like):                               # (b, L, c) -> (b, c, L)
            return t.to(like.dtype).transpose(1, 2)

        return (back(gu, u), back(gdt, delta), gAt.t().to(A.dtype), back(gB, B), back(gC, C), gD,
                None if z is None else back(gz, z), gbias, None)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Chunked pure-PyTorch selective scan (same signature and semantics as
    :func:`selective_scan`); computes in fp32, returns u's dtype."""
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the PyTorch path")
    if B.dim() != 3 or C.dim() != 3:
        raise NotImplementedError("the PyTorch path takes input-dependent B, C of shape (batch, N, L)")
    return _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
