"""Adapter modules and the wrappers that attach them to frozen layers.

An *adapter* maps the input of a frozen layer ``x (..., in)`` to an additive change of
(a slice of) its output ``delta (..., out)``. Adapters never touch the frozen weights;
wrappers add their output:

- :class:`AdaptedLinear` wraps an ``nn.Linear`` (it *is* an ``nn.Linear`` holding the
  same weight and bias, so state-dict names do not change) and adds each adapter's
  output to a column slice of the output: this is how q, k and v are adapted inside
  timm's fused ``qkv`` while timm's own attention kernel stays in use.
- :func:`add_parallel_adapter` adds an adapter beside a whole sub-layer (the ViT MLP):
  ``module(x) + adapter(x)`` (Lily's ``ffn`` placement: inside drop-path and layer scale).
- :func:`add_residual_adapter` adds an adapter beside the second half of a pre-norm
  block: it reads the residual stream before ``norm2`` and its output is added to the
  block's output, outside drop-path and layer scale (AdaptFormer as its authors wrote it).

Lily (paper eq. 3-5, Alg. 1-2): ``delta(x) = s * h @ sum_e w_e E[e]`` with
``h = act(dropout(x @ LP))`` and ``w = softmax(h @ R^T)`` reduced per routing mode.
Experts are always combined before the matmul.

Lily v2 (the PEFT feature request): the LP too is a mixture over a model-wide bank of
``N_a`` LP experts, ``LP = sum_i w_A,i A_i`` with ``w_A = softmax(x @ R_A^T)`` from a
per-layer LP router on the layer's input, reduced by the same routing mode
(:class:`LPBank`, :class:`LPMixture`); everything after the LP is Lily as above.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from .errors import LilyConfigError, MergeError
from .merging import Mergeable

_ACTS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}


class Adapter(nn.Module):
    """Base class of every adapter; all parameters under an Adapter are trainable."""

    in_features: int
    out_features: int

    def delta_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The equivalent ``(out, in)`` weight change and ``(out,)`` bias change (or None)."""
        raise MergeError(f"{type(self).__name__} cannot be merged")

    def merged_slice(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """The merged ``(weight, bias)`` of the frozen slice this adapter adds to (bias None when the
        Linear has none). Additive adapters use :meth:`delta_weight`; others (DoRA) override this."""
        dw, db = self.delta_weight()
        if db is not None and bias is None:
            raise MergeError(f"{type(self).__name__} has a bias change that cannot be merged into a Linear "
                             "without bias (the frozen layer has no bias to fold it into)")
        return weight + dw.to(weight.dtype), (bias if db is None else bias + db.to(bias.dtype))


# ---------------------------------------------------------------------------------------
# Lily
# ---------------------------------------------------------------------------------------
class HPBank(nn.Module):
    """The model-wide bank of N_e high-dimension projector experts of one target kind.

    Shared (the same Parameter) by every layer's adapter of that kind. Zero-initialised,
    so a freshly adapted model computes exactly what the frozen model computes.
    With ``shared_router`` the router lives here too (the authors' Vim code).
    """

    def __init__(self, ne: int, d: int, out_features: int, bias: bool = False,
                 router: nn.Module | None = None):
        super().__init__()
        self.ne, self.d, self.out_features = ne, d, out_features
        self.experts = nn.Parameter(torch.zeros(ne, d, out_features))
        self.bias = nn.Parameter(torch.zeros(ne, out_features)) if bias else None
        self.router = router

    def extra_repr(self):
        return f"ne={self.ne}, d={self.d}, out_features={self.out_features}, bias={self.bias is not None}"


class StaticRouter(nn.Module):
    """Input-independent routing: learned logits per layer (mergeable)."""

    def __init__(self, ne: int, init: str):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(ne))
        if init == "paper":
            nn.init.normal_(self.logits, mean=1.0, std=0.01)


def make_router(d: int, ne: int, routing: str, init: str) -> nn.Module | None:
    if routing == "uniform":
        return None
    if routing == "static":
        return StaticRouter(ne, init)
    router = nn.Linear(d, ne, bias=False)
    if init == "paper":  # all experts start with (almost) the same weight
        nn.init.normal_(router.weight, mean=1.0, std=0.01)
    return router


def routing_weights(router: nn.Module | None, routing: str, n: int, inp: torch.Tensor) -> torch.Tensor:
    """Expert weights from ``router`` applied to ``inp`` (..., features), reduced per routing mode:
    (n,) for batch/static/uniform, (B, n) for sample, (..., n) for token. Shared by the HP
    router (on ``h``) and Lily v2's LP router (on ``x``)."""
    if routing == "uniform":
        return inp.new_full((n,), 1.0 / n)
    if routing == "static":
        return torch.softmax(router.logits, dim=-1).to(inp.dtype)
    probs = torch.softmax(router(inp), dim=-1)                       # (B, *tokens, n)
    if routing == "token":
        return probs
    if routing == "sample":
        return probs.reshape(probs.shape[0], -1, n).mean(dim=1)      # (B, n)
    return probs.reshape(-1, n).mean(dim=0)                          # batch: (n,)


def _fixed_only(routing: str, what: str):
    if routing not in ("static", "uniform"):
        raise MergeError(
            f"{what} with routing='{routing}' is data-dependent (its expert mixture depends "
            "on the input) and cannot be merged; only 'static' and 'uniform' routing merge")


# ---------------------------------------------------------------------------------------
# Lily v2 (the PEFT feature request): LP experts with a router of their own
# ---------------------------------------------------------------------------------------
class LPBank(nn.Module):
    """Lily v2: the model-wide bank of N_a low-dimension projector experts of one target kind.

    ``experts``: (N_a, in, d), shared (the same Parameter) by every layer's adapter of that
    kind, like the HP bank. Each expert is initialised like an ``nn.Linear(in, d)`` weight
    (uniform in +-1/sqrt(in)), as Lily's per-layer LPs are. With ``shared_router`` the LP
    router lives here too.
    """

    def __init__(self, na: int, in_features: int, d: int, bias: bool = False, router: nn.Module | None = None):
        super().__init__()
        self.na, self.in_features, self.d = na, in_features, d
        bound = 1.0 / math.sqrt(in_features)
        self.experts = nn.Parameter(torch.empty(na, in_features, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(na, d).uniform_(-bound, bound)) if bias else None
        self.router = router

    def extra_repr(self):
        return f"na={self.na}, in_features={self.in_features}, d={self.d}, bias={self.bias is not None}"


class LPMixture(nn.Module):
    """Lily v2's LP of one layer: ``x @ sum_i w_A,i A_i`` over the model-wide :class:`LPBank`.

    ``w_A`` comes from this layer's LP router ``R_A: in -> N_a`` (no bias) applied to the
    layer's input ``x``, reduced by the routing mode (the same mode as the HP router).
    Experts are combined before the matmul (batch/static/uniform: one (in, d) matrix;
    sample: one per sample); ``token`` computes ``x`` against all experts at once
    (``x @ A.reshape(in, N_a*d)``) and takes the per-token weighted sum, never a
    (B, T, in, d) tensor. Used as a :class:`LilyAdapter`'s ``lp``.
    """

    def __init__(self, bank: LPBank, router: nn.Module | None, routing: str):
        super().__init__()
        self.bank, self.router, self.routing = bank, router, routing
        self.in_features, self.out_features = bank.in_features, bank.d
        self.last_weights: torch.Tensor | None = None  # (N_a,) mean LP routing weights of the last forward

    @property
    def _router(self) -> nn.Module | None:
        return self.router if self.router is not None else self.bank.router

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        return routing_weights(self._router, self.routing, self.bank.na, x)

    def fixed_weights(self) -> torch.Tensor:
        """The input-independent LP expert weights (N_a,) of static and uniform routing."""
        _fixed_only(self.routing, "Lily v2's LP router")
        return self.routing_weights(self.bank.experts)  # ignores its input for these two modes

    def combined(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The input-independent combined LP (in, d) and bias (d,) or None: static and uniform only."""
        w = self.fixed_weights()
        bias = None if self.bank.bias is None else w @ self.bank.bias
        return einsum(w, self.bank.experts, "a, a i d -> i d"), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        na, d = self.bank.na, self.bank.d
        w = self.routing_weights(x)
        self.last_weights = w.detach() if w.dim() == 1 else w.detach().reshape(-1, na).mean(dim=0)
        experts = self.bank.experts.to(x.dtype)
        if self.routing == "token":
            # x against every LP expert in one matmul, then the per-token weighted sum:
            # (..., N_a*d) -> (..., N_a, d) -> (..., d); never a (..., in, d) tensor
            xa = (x @ rearrange(experts, "a i d -> i (a d)")).unflatten(-1, (na, d))
            out = (w[..., :, None] * xa).sum(dim=-2)
        elif self.routing == "sample":
            lp = einsum(w, experts, "b a, a i d -> b i d")              # one combined LP per sample
            out = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), lp).reshape(*x.shape[:-1], d)
        else:  # one combined LP for the batch
            out = x @ (w @ experts.reshape(na, -1)).view(experts.shape[1:])
        if self.bank.bias is not None:
            b = w @ self.bank.bias.to(x.dtype)                          # (d,), (B, d) or (..., d)
            if self.routing == "sample":
                b = b.reshape(b.shape[0], *([1] * (out.dim() - 2)), -1)
            out = out + b
        return out

    def extra_repr(self):
        return f"routing={self.routing}"


# ---------------------------------------------------------------------------------------
# The Lily adapter
# ---------------------------------------------------------------------------------------
class LilyAdapter(Adapter):
    """One layer's Lily adapter for one target kind.

    ``lp`` is an ``nn.Linear`` (in -> d), possibly shared with neighbouring layers
    (``lp_stride``), or Lily v2's :class:`LPMixture` over a model-wide LP bank; ``bank``
    is shared by all layers of the model; ``router`` is this layer's HP router (None when
    the bank carries a model-shared router, or for ``uniform`` routing).
    """

    def __init__(self, lp: nn.Linear | LPMixture, bank: HPBank, router: nn.Module | None, routing: str,
                 scale: float = 1.0, dropout: float = 0.0, act: str = "identity"):
        super().__init__()
        self.lp, self.bank, self.router = lp, bank, router
        self.routing, self.scale = routing, float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.act = _ACTS[act]()
        self.act_name = act
        self.in_features, self.out_features = lp.in_features, bank.out_features
        self.last_weights: torch.Tensor | None = None  # (N_e,) mean routing weights of the last forward

    @property
    def _router(self) -> nn.Module | None:
        return self.router if self.router is not None else self.bank.router

    def fixed_weights(self) -> torch.Tensor:
        """The input-independent expert weights (N_e,) of static and uniform routing."""
        _fixed_only(self.routing, "Lily")
        return self.routing_weights(self.bank.experts)  # ignores its input for these two modes

    def routing_weights(self, h: torch.Tensor) -> torch.Tensor:
        """Expert weights: (N_e,) for batch/static/uniform, (B, N_e) sample, (..., N_e) token."""
        return routing_weights(self._router, self.routing, self.bank.ne, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.dropout(self.lp(x)))
        w = self.routing_weights(h)
        ne = self.bank.ne
        self.last_weights = w.detach() if w.dim() == 1 else w.detach().reshape(-1, ne).mean(dim=0)
        experts, bias = self.bank.experts.to(h.dtype), self.bank.bias
        if self.routing == "token":
            # per-token mixture as one flattened matmul: ((w ⊗ h) @ E.reshape(N_e*d, out)),
            # never a (B, T, d, out) tensor
            wh = rearrange(w[..., :, None] * h[..., None, :], "... e d -> ... (e d)")
            out = wh @ rearrange(experts, "e d o -> (e d) o")
        elif self.routing == "sample":
            hp = einsum(w, experts, "b e, e d o -> b d o")             # one combined HP per sample
            out = torch.bmm(h.reshape(h.shape[0], -1, h.shape[-1]), hp).reshape(*h.shape[:-1], -1)
        else:  # one combined HP for the batch: (N_e,) @ (N_e, d*out), then one matmul
            out = h @ (w @ experts.reshape(ne, -1)).view(experts.shape[1:])
        if bias is not None:
            b = w @ bias.to(h.dtype)                                   # (N_e,)->(out,), (B,out), (...,out)
            if self.routing == "sample":
                b = b.reshape(b.shape[0], *([1] * (out.dim() - 2)), -1)
            out = out + b
        return out if self.scale == 1.0 else self.scale * out

    def combined_hp(self) -> torch.Tensor:
        """The input-independent combined HP (d, out): static and uniform routing only."""
        return einsum(self.fixed_weights(), self.bank.experts, "e, e d o -> d o")

    def delta_weight(self):
        hp = self.combined_hp()
        if self.act_name != "identity":
            raise MergeError(f"Lily with a {self.act_name} hidden activation is not linear and cannot be merged")
        if isinstance(self.lp, LPMixture):                            # Lily v2: the combined LP
            lp_weight, lp_bias = self.lp.combined()                   # (in, d), (d,) or None
        else:
            lp_weight, lp_bias = self.lp.weight.t(), self.lp.bias
        dw = self.scale * (lp_weight @ hp).t()                        # (out, in)
        db = None
        if lp_bias is not None:
            db = lp_bias @ hp
        if self.bank.bias is not None:
            bb = self.fixed_weights() @ self.bank.bias
            db = bb if db is None else db + bb
        return dw, None if db is None else self.scale * db


# ---------------------------------------------------------------------------------------
# Shared by the LoRA-style baselines
# ---------------------------------------------------------------------------------------
def _down_up(in_features: int, rank: int, out_features: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    """A kaiming-uniform down projection and a zero-initialised up projection (zero output at init)."""
    down, up = nn.Linear(in_features, rank, bias=bias), nn.Linear(rank, out_features, bias=bias)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)
    for lin in (down, up):
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    return down, up


# ---------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------
class AdaptedLinear(Mergeable, nn.Linear):
    """A frozen ``nn.Linear`` plus adapters on column slices of its output.

    It holds the *same* weight and bias Parameters as the layer it replaces, so the
    model's state-dict names are unchanged; adapters live under ``.adapters``.
    ``forward(x, include_bias=False)`` omits the frozen bias (Mamba's dt projection,
    whose bias is added inside the selective-scan kernel).
    """

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.adapters = nn.ModuleDict()
        self.slices: dict[str, tuple[int, int]] = {}
        self.merged = False

    def add_adapter(self, name: str, adapter: Adapter, start: int = 0, stop: int | None = None):
        stop = self.out_features if stop is None else stop
        if adapter.in_features != self.in_features or adapter.out_features != stop - start:
            raise LilyConfigError(
                f"adapter '{name}' maps {adapter.in_features}->{adapter.out_features} but the "
                f"slice [{start}:{stop}] of a {self.in_features}->{self.out_features} Linear needs "
                f"{self.in_features}->{stop - start}")
        self.adapters[name] = adapter
        self.slices[name] = (start, stop)

    def forward(self, x: torch.Tensor, include_bias: bool = True) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if include_bias else None)
        if self.merged:  # a merged bias change sits in self.bias, like the frozen bias
            return y
        for name, adapter in self.adapters.items():
            start, stop = self.slices[name]
            # in place on the fresh output of F.linear (its backward does not need it)
            y.narrow(-1, start, stop - start).add_(adapter(x))
        return y

    # -- merge (lily.merging.safe_merge) ------------------------------------------------
    def merge_plan(self):
        """The merged weight and bias; raises MergeError before anything is changed."""
        weight = self.weight.detach().clone()
        bias = None if self.bias is None else self.bias.detach().clone()
        bias_changed = False
        for name, adapter in self.adapters.items():
            start, stop = self.slices[name]
            b = None if bias is None else bias[start:stop]
            w_new, b_new = adapter.merged_slice(weight[start:stop], b)
            weight[start:stop] = w_new
            if b_new is not None and b_new is not b:
                bias[start:stop] = b_new
                bias_changed = True
        plan = [(self.weight, weight)]
        if bias_changed:
            plan.append((self.bias, bias))
        return plan

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, slices={self.slices}, merged={self.merged}")


def _parallel_adapter_hook(module: nn.Module, args, output):
    x = args[0]
    for adapter in module.adapters.values():
        output = output + adapter(x)
    return output


def add_parallel_adapter(module: nn.Module, name: str, adapter: Adapter) -> None:
    """Add ``adapter(x)`` to ``module(x)``'s output (a parallel adapter beside a sub-layer).

    The adapter is registered under ``module.adapters[name]`` (the module's own
    parameter names are unchanged) and applied by a forward hook.
    """
    if not hasattr(module, "adapters"):
        module.adapters = nn.ModuleDict()
        module.register_forward_hook(_parallel_adapter_hook)
    module.adapters[name] = adapter


def _residual_input_hook(norm: nn.Module, args):
    norm._residual_input = args[0]  # popped by the block's hook below, in the same forward


def _residual_adapter_hook(block: nn.Module, args, output):
    x = getattr(block, block._residual_norm).__dict__.pop("_residual_input", None)
    if x is None:
        raise RuntimeError(f"{type(block).__name__}.{block._residual_norm} was not called in this forward: "
                           "a residual adapter needs a pre-norm block (x + mlp(norm2(x)))")
    for adapter in block.adapters.values():
        output = output + adapter(x)
    return output


def add_residual_adapter(block: nn.Module, name: str, adapter: Adapter, norm: str = "norm2") -> None:
    """AdaptFormer's placement, as in its authors' code, on a pre-norm block
    (timm ``Block``: ``x = x + drop_path2(ls2(mlp(norm2(x))))``)::

        y = block(x_in) + adapter(x)     # x: the residual stream entering norm2

    The adapter reads ``norm``'s *input* (captured by a forward pre-hook on ``norm``) and
    its output is added to the block's output (a forward hook on the block), so neither
    drop-path nor layer scale touch it. Registered under ``block.adapters[name]``.
    """
    norm_module = getattr(block, norm, None)
    if not isinstance(norm_module, nn.Module):
        raise LilyConfigError(f"{type(block).__name__} has no '{norm}' module: a residual (AdaptFormer) "
                              f"adapter needs a pre-norm block x + mlp({norm}(x))")
    if not hasattr(block, "adapters"):
        block.adapters = nn.ModuleDict()
        block._residual_norm = norm
        norm_module.register_forward_pre_hook(_residual_input_hook)
        block.register_forward_hook(_residual_adapter_hook)
    block.adapters[name] = adapter
