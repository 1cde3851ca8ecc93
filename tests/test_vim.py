"""Vision Mamba Vim-S: state dict, selective scan / causal conv vs references, the
bidirectional mixer, checkpoint loading and the middle cls token (facts: vim.md)."""
import argparse
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from models import mamba_ops
from models.mamba_ops import causal_conv1d, selective_scan, selective_scan_ref, selective_scan_torch
from models.vim import (BiMambaMixer, RMSNorm, VisionMamba, build_vim, linear_no_bias,
                        load_checkpoint, resize_pos_embed_midcls)

# ---------------------------------------------------------------------------------------
# The expected state dict, written out from vim.md section 3.1 (not from the model).
# ---------------------------------------------------------------------------------------
TOP = [
    ("cls_token", (1, 1, 384)),
    ("pos_embed", (1, 197, 384)),
    ("patch_embed.proj.weight", (384, 3, 16, 16)),
    ("patch_embed.proj.bias", (384,)),
    ("head.weight", (1000, 384)),
    ("head.bias", (1000,)),
]
PER_BLOCK = [
    ("mixer.A_log", (768, 16)),
    ("mixer.D", (768,)),
    ("mixer.A_b_log", (768, 16)),
    ("mixer.D_b", (768,)),
    ("mixer.in_proj.weight", (1536, 384)),
    ("mixer.conv1d.weight", (768, 1, 4)),
    ("mixer.conv1d.bias", (768,)),
    ("mixer.x_proj.weight", (56, 768)),
    ("mixer.dt_proj.weight", (768, 24)),
    ("mixer.dt_proj.bias", (768,)),
    ("mixer.conv1d_b.weight", (768, 1, 4)),
    ("mixer.conv1d_b.bias", (768,)),
    ("mixer.x_proj_b.weight", (56, 768)),
    ("mixer.dt_proj_b.weight", (768, 24)),
    ("mixer.dt_proj_b.bias", (768,)),
    ("mixer.out_proj.weight", (384, 768)),
    ("norm.weight", (384,)),
]
EXPECTED = TOP + [(f"layers.{i}.{k}", s) for i in range(24) for k, s in PER_BLOCK] + [("norm_f.weight", (384,))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests issue thousands of small ops; with several intra-op threads on a busy
    shared machine each parallel region can wait a scheduler slice (measured: a Vim-S
    forward went from 0.55 s to 18 s with 2 threads while another job used the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vim_s():
    torch.manual_seed(0)
    model, info = build_vim({"pretrained": False, "checkpoint": None}, num_classes=1000)
    return model, info


def tiny_vim(seed=0, img_size=32, num_classes=5, depth=2, **kw):
    """Same code, reduced sizes: 2x2 patches of 16 px (M=4, cls at 2), d_model 16."""
    torch.manual_seed(seed)
    return VisionMamba(img_size=img_size, patch_size=16, num_classes=num_classes, embed_dim=16,
                       depth=depth, d_state=4, **kw)


def randomize_(module, seed=0):
    """Random values everywhere (init leaves D = 1, A_b_log = A_log, zero biases...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "A_" not in name else 0.5))
    return module


# ---------------------------------------------------------------------------------------
# State dict and model structure (real Vim-S config, no file)
# ---------------------------------------------------------------------------------------
def test_state_dict_names_and_shapes_match_spec(vim_s):
    model, info = vim_s
    sd = model.state_dict()
    assert len(EXPECTED) == 415
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == EXPECTED   # names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == 25_796_584
    assert sum(math.prod(s) for _, s in EXPECTED) == 25_796_584
    assert list(model.buffers()) == []
    assert info["weights"] == "random"
    assert info["kernels"] == ("pytorch" if not torch.cuda.is_available() else info["kernels"])
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 1000


def test_vim_s_hyper_parameters_and_drop_path_schedule(vim_s):
    model, _ = vim_s
    assert model.token_position == 98 and model.patch_embed.num_patches == 196
    mixer = model.layers[0].mixer
    assert (mixer.d_inner, mixer.dt_rank, mixer.d_state, mixer.d_conv) == (768, 24, 16, 4)
    assert model.norm_f.eps == 1e-5 and all(layer.norm.eps == 1e-5 for layer in model.layers)
    rate = 0.05                                                     # build_vim's default

    def prob(m):
        return 0.0 if isinstance(m, nn.Identity) else m.drop_prob

    # block i: ([0] + linspace(0, rate, 24))[i], so blocks 0 and 1 have none
    assert [prob(layer.drop_path) for layer in model.layers] == pytest.approx(
        [0.0] + [(i - 1) * rate / 23 for i in range(1, 24)])
    assert prob(model.drop_path) == pytest.approx(rate)            # before norm_f


def test_forward_returns_normed_middle_cls_token(vim_s):
    model, _ = vim_s
    model.eval()
    seen = {}
    def first_block_input(module, inputs):
        seen.setdefault("in", inputs[0])

    def norm_f_output(module, inputs, output):
        seen.setdefault("norm_f", output)

    hooks = [model.layers[0].register_forward_pre_hook(first_block_input),
             model.norm_f.register_forward_hook(norm_f_output)]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            feats = model.forward_features(x)
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    # the cls token sits at index 98 of the 197-token sequence, with pos_embed[:, 98]
    assert seen["in"].shape == (1, 197, 384)
    torch.testing.assert_close(seen["in"][0, 98], (model.cls_token + model.pos_embed[:, 98])[0, 0])
    patches = model.patch_embed(x)
    torch.testing.assert_close(seen["in"][0, :98], patches[0, :98] + model.pos_embed[0, :98])
    torch.testing.assert_close(seen["in"][0, 99:], patches[0, 98:] + model.pos_embed[0, 99:])
    # the feature is norm_f's output at index 98; the logits are head(feature)
    assert torch.equal(feats, seen["norm_f"][:, 98])
    torch.testing.assert_close(logits, model.head(feats))
    assert torch.isfinite(logits).all()


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert not hasattr(norm, "bias")


# ---------------------------------------------------------------------------------------
# Selective scan and causal conv vs the references
# ---------------------------------------------------------------------------------------
def scan_inputs(b=2, d=6, L=23, N=4, seed=0, token_last=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale

    def r3(c, scale=1.0):               # token_last: the mixer's (b, c, L) views of (b, L, c)
        return r(b, L, c, scale=scale).transpose(1, 2) if token_last else r(b, c, L, scale=scale)

    return dict(u=r3(d), delta=r3(d, scale=0.5), A=-torch.exp(r(d, N, scale=0.5)), B=r3(N), C=r3(N),
                D=r(d), z=r3(d), delta_bias=r(d, scale=0.5))


@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("with_bias_softplus", [True, False])
@pytest.mark.parametrize("chunk,save_starts", [(4 * 6 * 2 * 5, True), (4 * 6 * 2 * 5, False), (1 << 20, True)])
def test_scan_matches_sequential_reference(monkeypatch, with_z, with_bias_softplus, chunk, save_starts):
    # chunks of 5 steps (several chunks, last one partial) or one chunk; chunk-entry states
    # either kept from forward or recomputed in backward
    monkeypatch.setattr(mamba_ops, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(mamba_ops, "SAVE_STARTS_ELEMENTS", (1 << 30) if save_starts else 0)
    x = scan_inputs(token_last=chunk == 1 << 20)
    if not with_z:
        x["z"] = None
    if not with_bias_softplus:
        x["delta_bias"] = None
        x["delta"] = x["delta"].abs()                   # a plausible Delta without softplus
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
    args = {k: leaves.get(k) for k in x}
    out_ref = selective_scan_ref(**args, delta_softplus=with_bias_softplus)
    out = selective_scan_torch(**args, delta_softplus=with_bias_softplus)
    assert out.shape == out_ref.shape == (2, 6, 23) and out.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads_ref = torch.autograd.grad(out_ref, list(leaves.values()), g)
    grads = torch.autograd.grad(out, list(leaves.values()), g)
    for name, gr, gf in zip(leaves, grads_ref, grads):
        assert gf.shape == leaves[name].shape, name
        torch.testing.assert_close(gf, gr, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_scan_half_precision_inputs_and_dispatch(monkeypatch):
    monkeypatch.delenv("VIM_KERNELS", raising=False)
    x = scan_inputs()
    ref = selective_scan_ref(**x, delta_softplus=True)
    # the PyTorch path computes in fp32 and returns u's dtype
    xb = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    out = selective_scan_torch(**xb, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    # dispatch: CPU tensors always take the PyTorch path; kernels='cuda' refuses them
    for mode in ("auto", "pytorch", None):
        assert torch.equal(selective_scan(**x, delta_softplus=True, mode=mode),
                           selective_scan_torch(**x, delta_softplus=True))
    with pytest.raises(RuntimeError):
        selective_scan(**x, delta_softplus=True, mode="cuda")
    with pytest.raises(ValueError):
        selective_scan(**x, delta_softplus=True, mode="fast")


@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv_matches_explicit_formula(activation):
    b, d, L, w = 2, 5, 9, 4
    x = torch.randn(b, L, d).transpose(1, 2).requires_grad_()
    weight = torch.randn(d, 1, w, requires_grad=True)
    bias = torch.randn(d, requires_grad=True)
    expected = torch.empty(b, d, L)
    for c in range(d):
        for t in range(L):
            acc = bias[c].clone()
            for k in range(w):
                if t - w + 1 + k >= 0:                  # positions before t = 0 are zeros
                    acc = acc + weight[c, 0, k] * x[:, c, t - w + 1 + k]
            expected[:, c, t] = acc.detach()
    if activation == "silu":
        expected = F.silu(expected)
    out = causal_conv1d(x, weight, bias, activation=activation, mode="pytorch")
    torch.testing.assert_close(out, expected)
    # gradients equal those of the (truncated, left-padded) depthwise Conv1d
    conv = F.conv1d(x, weight, bias, padding=w - 1, groups=d)[..., :L]
    conv = F.silu(conv) if activation else conv
    gx = torch.autograd.grad(out.sum(), (x, weight, bias))
    gr = torch.autograd.grad(conv.sum(), (x, weight, bias))
    for a, r in zip(gx, gr):
        torch.testing.assert_close(a, r)


KERNELS = mamba_ops.kernel_status()
needs_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS["selective_scan"] and KERNELS["causal_conv1d"]),
    reason="needs a CUDA device and the mamba-ssm / causal-conv1d kernels (requirements-mamba.txt)")


@needs_kernels
def test_cuda_kernels_match_pytorch_path():
    dev = torch.device("cuda")
    x = {k: v.to(dev) for k, v in scan_inputs(b=3, d=64, L=197, N=16, token_last=True).items()}
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    out_k = selective_scan(**leaves, delta_softplus=True, mode="cuda")
    out_t = selective_scan(**leaves, delta_softplus=True, mode="pytorch")
    torch.testing.assert_close(out_k, out_t, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out_k)
    for name, a, b in zip(leaves, torch.autograd.grad(out_k, list(leaves.values()), g),
                          torch.autograd.grad(out_t, list(leaves.values()), g)):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=lambda m: f"grad {name}: {m}")
    conv_in = torch.randn(2, 197, 64, device=dev).transpose(1, 2)
    w, bias = torch.randn(64, 1, 4, device=dev), torch.randn(64, device=dev)
    torch.testing.assert_close(causal_conv1d(conv_in, w, bias, mode="cuda"),
                               causal_conv1d(conv_in, w, bias, mode="pytorch"), atol=1e-5, rtol=1e-5)
    model = randomize_(tiny_vim(), 7).to(dev).eval()
    imgs = torch.randn(2, 3, 32, 32, device=dev)
    with torch.no_grad():
        model.set_kernels("cuda")
        a = model(imgs)
        model.set_kernels("pytorch")
        b = model(imgs)
    print(f"tiny Vim, CUDA kernels vs PyTorch path: max |diff| = {(a - b).abs().max().item():.3e}")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# The bidirectional mixer
# ---------------------------------------------------------------------------------------
def reference_direction(x, z, conv_w, conv_b, xproj_w, dt_w, dt_b, A_log, D, rank, N):
    """Section 2.2 step 4 written with the plain references. x, z: (B, d_inner, L)."""
    L = x.shape[-1]
    u = F.silu(F.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=x.shape[1])[..., :L])
    x_dbl = u.transpose(1, 2) @ xproj_w.t()
    dt_low, B, C = x_dbl[..., :rank], x_dbl[..., rank:rank + N], x_dbl[..., rank + N:]
    delta = (dt_low @ dt_w.t()).transpose(1, 2)
    return selective_scan_ref(u, delta, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z=z,
                              delta_bias=dt_b, delta_softplus=True)


def reference_mixer(m, h):
    xz = (h @ m.in_proj.weight.t()).transpose(1, 2)
    x, z = xz[:, :m.d_inner], xz[:, m.d_inner:]
    k = dict(rank=m.dt_rank, N=m.d_state)
    y_f = reference_direction(x, z, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
                              m.dt_proj.bias, m.A_log, m.D, **k)
    # backward branch: the same math on the flipped sequence with the _b parameters
    y_b = reference_direction(x.flip(-1), z.flip(-1), m.conv1d_b.weight, m.conv1d_b.bias, m.x_proj_b.weight,
                              m.dt_proj_b.weight, m.dt_proj_b.bias, m.A_b_log, m.D_b, **k).flip(-1)
    return ((y_f + y_b) / 2).transpose(1, 2) @ m.out_proj.weight.t()


def tiny_mixer(seed=0):
    torch.manual_seed(seed)
    return randomize_(BiMambaMixer(d_model=16, d_state=4, d_conv=4, expand=2, kernels="pytorch"), seed)


def test_mixer_both_directions_match_reference():
    m = tiny_mixer()
    assert m.dt_rank == 1 and m.d_inner == 32
    h = torch.randn(2, 11, 16, requires_grad=True)
    out, ref = m(h), reference_mixer(m, h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    params = [p for _, p in m.named_parameters()]
    g = torch.randn(out.shape)
    for a, r, name in zip(torch.autograd.grad(out, [h] + params, g), torch.autograd.grad(ref, [h] + params, g),
                          ["h"] + [n for n, _ in m.named_parameters()]):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=lambda msg: f"{name}: {msg}")


def test_mixer_swapping_directions_flips_the_output():
    """Swapping the forward and _b parameter sets and reversing the input reverses the output."""
    m = tiny_mixer(1)
    swapped = tiny_mixer(1)
    with torch.no_grad():
        for a, b in [("conv1d", "conv1d_b"), ("x_proj", "x_proj_b"), ("dt_proj", "dt_proj_b")]:
            for p in ("weight", "bias"):
                if getattr(getattr(m, a), p) is not None:
                    getattr(getattr(swapped, a), p).copy_(getattr(getattr(m, b), p))
                    getattr(getattr(swapped, b), p).copy_(getattr(getattr(m, a), p))
        swapped.A_log.copy_(m.A_b_log), swapped.A_b_log.copy_(m.A_log)
        swapped.D.copy_(m.D_b), swapped.D_b.copy_(m.D)
    h = torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(swapped(h.flip(1)), m(h).flip(1), atol=1e-5, rtol=1e-5)


class WrappedLinear(nn.Module):
    """A stand-in for an adapter wrapper: exposes the wrapped Linear's weight and bias,
    takes include_bias, records how it was called."""

    def __init__(self, linear):
        super().__init__()
        self.base = linear
        self.calls = []

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x, include_bias=True):
        self.calls.append(include_bias)
        return F.linear(x, self.weight, self.bias if include_bias else None)


def test_adapter_hooks_give_identical_outputs():
    m = tiny_mixer(2)
    h = torch.randn(2, 7, 16)
    with torch.no_grad():
        before = m(h)
        m.in_proj, m.dt_proj, m.dt_proj_b = (WrappedLinear(m.in_proj), WrappedLinear(m.dt_proj),
                                              WrappedLinear(m.dt_proj_b))
        after = m(h)
    assert torch.equal(before, after)
    assert m.in_proj.calls == [True]                     # called as a module on (B, L, d_model)
    assert m.dt_proj.calls == [False] and m.dt_proj_b.calls == [False]
    lin = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    torch.testing.assert_close(linear_no_bias(lin, x), x @ lin.weight.t())
    torch.testing.assert_close(linear_no_bias(WrappedLinear(lin), x), x @ lin.weight.t())


def test_tiny_model_fast_scan_matches_reference_end_to_end(monkeypatch):
    model = randomize_(tiny_vim(), 3).train()             # drop_path 0: deterministic in train
    x = torch.randn(2, 3, 32, 32)

    def run():
        model.zero_grad()
        out = model(x)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = run()
    monkeypatch.setattr(mamba_ops, "selective_scan_torch", selective_scan_ref)
    out_ref, grads_ref = run()
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
class NotAllowed:
    """Something a weights_only load must refuse."""


def save_official(path, state_dict, **extra):
    args = argparse.Namespace(model="vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                              lr=5e-4, batch_size=128, drop_path=0.05, input_size=224, finetune="")
    torch.save({"model": state_dict, "optimizer": {}, "epoch": 299, "scaler": "none", "args": args,
                **extra}, path)
    return path


def test_official_format_loads_strictly_and_replaces_head(vim_s, tmp_path):
    model, _ = vim_s
    path = save_official(tmp_path / "vim_s_midclstok_80p5acc.pth", model.state_dict())
    # the file really needs the allow-list: a plain weights_only load refuses it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    torch.manual_seed(1)
    new, info = build_vim({"pretrained": True, "checkpoint": str(path), "img_size": 224,
                           "drop_path_rate": 0.05, "kernels": "pytorch"}, num_classes=10)
    assert info["weights"] == f"file:{path}" and info["kernels"] == "pytorch"
    assert info["head"] == "replaced" and info["pos_embed"] == "loaded"
    own, loaded = model.state_dict(), new.state_dict()
    assert loaded.keys() == own.keys()
    for k in own:
        if k.startswith("head."):
            continue
        assert torch.equal(loaded[k], own[k]), k
    assert new.head.weight.shape == (10, 384) and torch.equal(new.head.bias, torch.zeros(10))
    # same number of classes: the checkpoint head is kept
    same, info = build_vim({"pretrained": True, "checkpoint": str(path)}, num_classes=1000)
    assert info["head"] == "loaded" and torch.equal(same.head.weight, model.head.weight)


def test_checkpoint_variants_and_errors(tmp_path):
    src = randomize_(tiny_vim(num_classes=7), 4)
    sd = src.state_dict()
    # bare state dict
    torch.save(sd, tmp_path / "bare.pth")
    dst = tiny_vim(seed=9)
    assert load_checkpoint(dst, tmp_path / "bare.pth")["head"] == "replaced"
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items() if not k.startswith("head."))
    # 'model' + Namespace at the same sizes: everything loads
    save_official(tmp_path / "full.pth", sd)
    dst = tiny_vim(seed=9, num_classes=7)
    assert load_checkpoint(dst, tmp_path / "full.pth") == {"head": "loaded", "pos_embed": "loaded"}
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())
    # arbitrary pickled objects are refused (weights_only stays on)
    save_official(tmp_path / "evil.pth", sd, extra=NotAllowed())
    with pytest.raises(UserError, match="weights_only"):
        load_checkpoint(tiny_vim(), tmp_path / "evil.pth")
    # a checkpoint of another architecture fails with a clear message
    bad = dict(sd)
    bad.pop("layers.1.mixer.D_b")
    save_official(tmp_path / "bad.pth", bad)
    with pytest.raises(UserError, match="does not match"):
        load_checkpoint(tiny_vim(num_classes=7), tmp_path / "bad.pth")


def test_pos_embed_resize_keeps_middle_cls(tmp_path):
    # 64 px -> 4x4 grid (M=16, cls at 8); 48 px -> 3x3 grid (M=9, cls at 4)
    src = randomize_(tiny_vim(img_size=64), 5)
    pe = src.pos_embed.detach()
    # resizing to the same grid is the identity
    assert torch.equal(resize_pos_embed_midcls(pe, 16), pe)
    save_official(tmp_path / "ck.pth", src.state_dict())
    dst = tiny_vim(img_size=48, seed=6)
    assert dst.token_position == 4
    info = load_checkpoint(dst, tmp_path / "ck.pth")
    assert info["pos_embed"] == "resized 17->10"
    new = dst.pos_embed.detach()
    assert torch.equal(new[:, 4], pe[:, 8])                              # cls slot preserved exactly
    grid = torch.cat([pe[:, :8], pe[:, 9:]], 1).reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 9, 16)
    torch.testing.assert_close(torch.cat([new[:, :4], new[:, 5:]], 1), expected)
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 48, 48))).all()


def test_build_errors(tmp_path):
    with pytest.raises(UserError) as e:
        build_vim({"pretrained": True, "checkpoint": None}, num_classes=10)
    msg = str(e.value)
    assert "vim_s_midclstok_80p5acc.pth" in msg and "hustvl/Vim-small-midclstok" in msg
    assert "backbone.checkpoint=" in msg
    missing = tmp_path / "nowhere" / "vim.pth"
    with pytest.raises(UserError, match=str(missing)):
        build_vim({"pretrained": True, "checkpoint": str(missing)}, num_classes=10)
    with pytest.raises(UserError, match="kernels"):
        build_vim({"pretrained": False, "kernels": "fastest"}, num_classes=10)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="kernels=cuda"):
            build_vim({"pretrained": False, "kernels": "cuda"}, num_classes=10)


def test_build_reads_omegaconf_and_img_size():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"family": "vim", "pretrained": False, "checkpoint": None,
                                      "img_size": 112, "drop_path_rate": 0.0, "kernels": "pytorch"})
    model, info = build_vim(cfg, num_classes=3)
    assert model.patch_embed.num_patches == 49 and model.token_position == 24
    assert model.pos_embed.shape == (1, 50, 384) and info["kernels"] == "pytorch"
    assert isinstance(model.drop_path, nn.Identity)
    with pytest.raises(ValueError, match="112x112"):
        model(torch.randn(1, 3, 224, 224))
