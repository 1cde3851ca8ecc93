"""Vision Mamba small (Vim-S, middle cls token, bidirectional "v2" mixers).

Facts: ../shared/spec/vim.md. Module and parameter names follow the official
``VisionMamba`` exactly (415 state-dict entries, no buffers), so the official
``vim_s_midclstok_80p5acc.pth`` loads with strict matching once the head is replaced.

    model, info = build_vim(cfg, num_classes)     # cfg: pretrained, checkpoint, img_size,
                                                  #      drop_path_rate, kernels
    feats = model.forward_features(images)        # (B, 384): normed cls token (index M//2)
    logits = model(images)                        # head(feats)

The selective scan and causal conv run on mamba-ssm / causal-conv1d CUDA kernels when
they are installed and the tensors are on CUDA, else on the PyTorch code of
``models/mamba_ops.py`` (``kernels: auto | cuda | pytorch``).

Hooks for adapters (the ``lily`` package does not import this module): every mixer
``layers.{i}.mixer`` calls ``in_proj`` as a module on token-last input (B, L, 384); the
dt projections ``dt_proj`` / ``dt_proj_b`` are applied without bias through
:func:`linear_no_bias` and their ``.bias`` is given to the scan as ``delta_bias`` (added
before the softplus). All three may be replaced by wrapper modules.

Hooks for token and state methods (MambaPEFT's prompt, Affix and Additional-scan; the
``lily`` methods set them, all are None by default so the plain model is unchanged):

* ``VisionMamba.prompt``: a module whose ``forward()`` returns (P, D) input tokens and whose
  ``num_prefix`` says how many of them go before the sequence (the rest after it), added
  after the position embedding; the cls read-out index moves by ``num_prefix``.
* ``VisionMamba.affix``: a module whose ``forward()`` returns (depth, 2, T, 2*d_inner):
  per layer and per scan direction (0 forward, 1 backward) T tokens in xz space (x | z),
  prepended to that direction's xz, through conv1d/SiLU/scan, dropped before the average.
* ``BiMambaMixer.scan_addition``: a module with ``A_log``, ``A_b_log`` (d_inner, N') and
  ``x_proj``, ``x_proj_b`` (Linear d_inner -> 2N', rows [B_new | C_new]): N' extra scan
  states per direction, placed before the N pretrained ones.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_

from common.errors import UserError
from models import mamba_ops

OFFICIAL_CHECKPOINT = "vim_s_midclstok_80p5acc.pth"
OFFICIAL_HUB_REPO = "hustvl/Vim-small-midclstok"

# Vim-S (vim.md section 1)
VIM_S = dict(img_size=224, patch_size=16, embed_dim=384, depth=24, d_state=16, expand=2,
             d_conv=4, norm_eps=1e-5)


def linear_no_bias(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s projection of ``x`` without its bias.

    A plain Linear uses its weight only; adapter wrappers (e.g. ``lily.AdaptedLinear``)
    take ``include_bias=False`` and add their own delta.
    """
    if type(module) is nn.Linear:
        return F.linear(x, module.weight)
    return module(x, include_bias=False)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32; no bias parameter."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(out_dtype or x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> (B, M, dim), flattened row-major."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.grid_size = (img_size - patch_size) // patch_size + 1
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if (H, W) != (self.img_size, self.img_size):
            raise ValueError(f"Vim was built for {self.img_size}x{self.img_size} inputs, got "
                             f"{H}x{W} (set backbone.img_size)")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _flip(t: torch.Tensor) -> torch.Tensor:
    """Reverse (B, C, L) along L; done token-last so the copy stays token-last."""
    return t.transpose(1, 2).flip(1).transpose(1, 2)


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer, ``bimamba_type="v2"`` with divide-out (vim.md 2.2).

    Both directions share in_proj, out_proj and the z gate; the backward direction has its
    own conv1d_b, x_proj_b, dt_proj_b, A_b_log and D_b and runs on the flipped sequence.
    """

    def __init__(self, d_model: int = 384, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, kernels: str | None = None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.kernels = kernels
        # own parameters first: this is the official state-dict order
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D_b = nn.Parameter(torch.ones(self.d_inner))
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1)
        self.act = nn.SiLU()                      # no parameters; kept from the official tree
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.conv1d_b = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                  padding=d_conv - 1)
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        # dt_proj init (vim.md 2.3); dt_proj_b keeps PyTorch's default weight, and its bias
        # is zeroed by VisionMamba's init like every other Linear bias.
        with torch.no_grad():
            std = self.dt_rank ** -0.5 * dt_scale
            self.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
        self.dt_proj.bias._no_reinit = True
        self.scan_addition = None                 # hook: extra scan states (see the module doc)

    def _direction(self, x, z, conv1d, x_proj, dt_proj, A_log, D, extra=None):
        """One scan direction. x, z: (B, d_inner, L) -> (B, d_inner, L). ``extra``:
        (A_log_new (d_inner, N'), x_proj_new) for N' additional states placed first."""
        u = mamba_ops.causal_conv1d(x, conv1d.weight, conv1d.bias, activation="silu",
                                    mode=self.kernels)
        x_dbl = x_proj(u.transpose(1, 2))                                  # (B, L, R + 2N)
        dt_low, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = linear_no_bias(dt_proj, dt_low)                            # (B, L, d_inner)
        A = -torch.exp(A_log.float())
        if extra is not None:                     # states [new N' | pretrained N]
            A_new, proj_new = extra
            B_new, C_new = proj_new(u.transpose(1, 2)).chunk(2, dim=-1)    # (B, L, N') each
            B, C = torch.cat([B_new, B], dim=-1), torch.cat([C_new, C], dim=-1)
            A = torch.cat([-torch.exp(A_new.float()), A], dim=1)
        return mamba_ops.selective_scan(
            u, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D.float(),
            z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True, mode=self.kernels)

    def forward(self, h: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """h: (B, L, d_model) -> (B, L, d_model). ``prefix``: optional (2, T, 2 d_inner)
        xz-space tokens prepended to the forward (index 0) and backward (index 1) scans;
        their outputs are dropped before the two directions are averaged."""
        xz = self.in_proj(h)                                               # (B, L, 2 d_inner)
        add = self.scan_addition
        ex_f = ex_b = None
        if add is not None:
            ex_f, ex_b = (add.A_log, add.x_proj), (add.A_b_log, add.x_proj_b)
        if prefix is None:
            x, z = xz.transpose(1, 2).chunk(2, dim=1)                      # (B, d_inner, L) each
            x_f, z_f, x_b, z_b, T = x, z, x, z, 0
        else:
            # one extra copy per layer: [prefix_f | xz | flip(prefix_b)] (B, 2T+L, 2 d_inner).
            # The forward scan reads its first T+L positions (a view); the backward scan
            # reads the flip of its last T+L (the flip copy the plain mixer makes anyway).
            T, n = prefix.shape[1], xz.shape[0]
            pre = prefix.to(xz.dtype)
            ext = torch.cat([pre[0].expand(n, -1, -1), xz, pre[1].flip(0).expand(n, -1, -1)], dim=1)
            x, z = ext.transpose(1, 2).chunk(2, dim=1)                     # (B, d_inner, 2T+L)
            L = xz.shape[1]
            x_f, z_f, x_b, z_b = x[..., :T + L], z[..., :T + L], x[..., T:], z[..., T:]
        y_f = self._direction(x_f, z_f, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D,
                              ex_f)
        y_b = self._direction(_flip(x_b), _flip(z_b), self.conv1d_b, self.x_proj_b,
                              self.dt_proj_b, self.A_b_log, self.D_b, ex_b)
        if T:
            y_f, y_b = y_f[..., T:], y_b[..., T:]                         # drop the affix positions
        y = (y_f + _flip(y_b)).transpose(1, 2) / 2                         # divide-out
        return self.out_proj(y)


class Block(nn.Module):
    """residual += DropPath(h) (fp32); h = mixer(RMSNorm(residual))."""

    def __init__(self, dim: int, mixer: nn.Module, norm_eps: float, drop_path: float):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, prefix=None):
        residual = h.float() if residual is None else residual + self.drop_path(h).float()
        h = self.norm(residual, out_dtype=h.dtype)
        return (self.mixer(h) if prefix is None else self.mixer(h, prefix=prefix)), residual


class VisionMamba(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 384, depth: int = 24,
                 d_state: int = 16, expand: int = 2, d_conv: int = 4, norm_eps: float = 1e-5,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, kernels: str | None = None):
        super().__init__()
        self.num_classes, self.embed_dim, self.num_features = num_classes, embed_dim, embed_dim
        # registration order = official state-dict order
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        M = self.patch_embed.num_patches
        self.token_position = M // 2                                       # 98 for 224 / 16
        self.pos_embed = nn.Parameter(torch.zeros(1, M + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # stochastic depth (vim.md 1): block i gets ([0] + linspace(0, rate, depth))[i];
        # the model-level DropPath before norm_f gets the full rate.
        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList(
            Block(embed_dim, BiMambaMixer(embed_dim, d_state, d_conv, expand, kernels=kernels),
                  norm_eps, dpr[i]) for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self._init_weights(depth)
        self.prompt = None                        # hooks (see the module doc)
        self.affix = None

    def _init_weights(self, depth: int):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for name, m in self.layers.named_modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
            if name.endswith("out_proj"):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                with torch.no_grad():
                    m.weight /= math.sqrt(depth)

    def set_kernels(self, mode: str | None):
        for layer in self.layers:
            layer.mixer.kernels = mode

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim): the final-normed middle cls token."""
        x = self.patch_embed(x)
        p = self.token_position
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :p], cls, x[:, p:]], dim=1) + self.pos_embed
        if self.prompt is not None:               # after the position embedding; cls moves
            tokens, k, n = self.prompt().to(x.dtype), self.prompt.num_prefix, x.shape[0]
            x = torch.cat([tokens[:k].expand(n, -1, -1), x, tokens[k:].expand(n, -1, -1)], dim=1)
            p = p + k
        prefixes = self.affix() if self.affix is not None else None
        h, residual = self.pos_drop(x), None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, None if prefixes is None else prefixes[i])
        residual = residual + self.drop_path(h).float()
        h = self.norm_f(residual, out_dtype=h.dtype)
        return h[:, p]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)


def vim_small(num_classes: int = 1000, img_size: int = 224, drop_path_rate: float = 0.05,
              kernels: str | None = None, **overrides) -> VisionMamba:
    kw = {**VIM_S, **overrides}
    kw["img_size"] = img_size
    return VisionMamba(num_classes=num_classes, drop_path_rate=drop_path_rate, kernels=kernels, **kw)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------
def resize_pos_embed_midcls(pos_embed: torch.Tensor, new_num_patches: int) -> torch.Tensor:
    """Resize a (1, M+1, C) middle-cls position embedding to new_num_patches + 1 tokens.

    The cls slot sits at index M//2 (not 0): take it out, interpolate the M patch rows as
    a square grid (bicubic, align_corners=False), put it back at index new_M//2.
    """
    _, n_old, dim = pos_embed.shape
    M = n_old - 1
    g_old, g_new = math.isqrt(M), math.isqrt(new_num_patches)
    if g_old * g_old != M or g_new * g_new != new_num_patches:
        raise ValueError(f"pos_embed resize needs square grids, got {M} -> {new_num_patches} patches")
    c = M // 2
    cls = pos_embed[:, c:c + 1]
    grid = torch.cat([pos_embed[:, :c], pos_embed[:, c + 1:]], dim=1)
    grid = grid.reshape(1, g_old, g_old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_num_patches, dim).to(pos_embed.dtype)
    c_new = new_num_patches // 2
    return torch.cat([grid[:, :c_new], cls, grid[:, c_new:]], dim=1)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """State dict from an official Vim checkpoint (``checkpoint['model']``) or a bare state
    dict, loaded with ``weights_only=True``; the pickled ``argparse.Namespace`` of the
    training args is allow-listed, nothing else is."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Vim checkpoint not found: {path}. Pass backbone.checkpoint=/path/to/"
                        f"{OFFICIAL_CHECKPOINT} (from the {OFFICIAL_HUB_REPO} model on the "
                        f"Hugging Face hub).")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:          # legacy (non-zip) files cannot be mmapped
                if "mmap" not in str(e):
                    raise
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        from models.vit import load_error_reason
        raise UserError(f"could not read Vim checkpoint {path} with weights_only=True ({load_error_reason(e)}); "
                        "is the file complete and a checkpoint?") from None
    if isinstance(ckpt, dict) and "model" in ckpt:
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a Vim checkpoint: expected a dict with a 'model' state "
                        f"dict (or a bare state dict), found {keys}")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_checkpoint(model: VisionMamba, path: str | os.PathLike) -> dict:
    """Load an official checkpoint strictly into ``model``: the head is kept when its shape
    matches and otherwise left at the model's fresh init; pos_embed is resized when the
    grid differs. Returns {'head': 'loaded'|'replaced', 'pos_embed': 'loaded'|'resized'}."""
    sd = dict(read_checkpoint(path))
    own = model.state_dict()
    report = {"head": "loaded", "pos_embed": "loaded"}
    for k in ("head.weight", "head.bias"):
        if k not in own:                                   # num_classes == 0: no head
            sd.pop(k, None)
            report["head"] = "none"
        elif k in sd and sd[k].shape != own[k].shape:
            sd[k] = own[k]                                 # replaced: keep the fresh init
            report["head"] = "replaced"
    pe = sd.get("pos_embed")
    if pe is not None and pe.shape != own["pos_embed"].shape:
        sd["pos_embed"] = resize_pos_embed_midcls(pe, model.patch_embed.num_patches)
        report["pos_embed"] = f"resized {pe.shape[1]}->{own['pos_embed'].shape[1]}"
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path} does not match Vim-S ({OFFICIAL_CHECKPOINT} expected; the "
                        f"stride-8 'ft' file is a different model): {e}") from e
    return report


def build_vim(cfg, num_classes: int):
    """Build Vim-S from a backbone config (dict or OmegaConf node).

    Keys: pretrained (bool), checkpoint (path or null), img_size (224), drop_path_rate
    (0.05), kernels (auto | cuda | pytorch; null reads $VIM_KERNELS, default auto),
    num_classes_override (null: the task's class count; MambaPEFT's configs: 100).
    Returns (model, info) with info = {'weights': 'file:<path>' | 'random',
    'kernels': 'cuda' | 'pytorch', ...}.
    """
    get = cfg.get
    kernels = get("kernels", None)
    try:
        mode = mamba_ops.resolve_mode(kernels)
    except ValueError as e:
        raise UserError(f"backbone.kernels: {e}") from e
    status = mamba_ops.kernel_status() if mode != "pytorch" else None
    if mode == "cuda":
        missing = [k for k in ("selective_scan", "causal_conv1d") if not status[k]]
        if missing or not torch.cuda.is_available():
            why = ("no CUDA device" if not missing else
                   "; ".join(f"{k}: {status['errors'].get(k)}" for k in missing))
            raise UserError(f"backbone.kernels=cuda but the Mamba CUDA kernels cannot be used "
                            f"({why}). Install them with requirements-mamba.txt on a CUDA "
                            f"machine, or set backbone.kernels=auto|pytorch.")
    override = get("num_classes_override", None)
    if override:                               # MambaPEFT's released configs: a fixed 100-way head
        if num_classes > int(override):
            raise UserError(f"backbone.num_classes_override={override} is smaller than the task's "
                            f"{num_classes} classes (MambaPEFT's fixed 100-way head cannot train "
                            f"sun397); drop the override to size the head by the task")
        num_classes = int(override)
    model = vim_small(num_classes=num_classes, img_size=int(get("img_size", 224)),
                      drop_path_rate=float(get("drop_path_rate", 0.05)), kernels=mode)
    info = {"weights": "random"}
    if get("pretrained", False):
        ckpt = get("checkpoint", None)
        if not ckpt:
            raise UserError(f"backbone.pretrained=true needs the official Vim-S weights "
                            f"{OFFICIAL_CHECKPOINT} (from the {OFFICIAL_HUB_REPO} model on the "
                            f"Hugging Face hub); download it and pass "
                            f"backbone.checkpoint=/path/to/{OFFICIAL_CHECKPOINT}")
        path = Path(os.path.expanduser(str(ckpt)))
        info.update(load_checkpoint(model, path))
        info["weights"] = f"file:{path}"
    use_cuda = (mode != "pytorch" and status["selective_scan"] and status["causal_conv1d"]
                and torch.cuda.is_available())
    info["kernels"] = "cuda" if use_cuda else "pytorch"
    return model, info
