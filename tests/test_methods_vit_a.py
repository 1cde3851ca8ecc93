"""Issue 15, part A: BitFit, VPT-shallow/deep, SSF, FacT-TT/TK, RepAdapter, Convpass on timm ViTs.

- exact trainable counts on ViT-B/16 (meta device, head excluded) through scripts/count_params.py's
  count(), at the spec's settings and at the authors' per-task values (baselines-vit.md 1-6, 13);
- each forward against a hand-written ViT forward (F.layer_norm, F.linear, softmax attention,
  written here from timm's Block) with the method's equation inserted where its authors insert it,
  written after the authors' code (reshapes, grouped conv, 1x1 cls image), not after ours;
- identity at initialisation where the authors' init gives it (BitFit, FacT, RepAdapter, Convpass).
  VPT and SSF are NOT the identity at init: VPT's prompts (uniform init) join every attention, and
  SSF's gamma ~ N(1, 0.02), beta ~ N(0, 0.02);
- merge = unmerged outputs and unmerge restores the weights bit for bit (BitFit, SSF, FacT,
  RepAdapter); VPT and Convpass refuse and change nothing;
- gradients reach exactly the method's parameters and the head.
"""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

import common  # noqa: F401  (registers ${by_task:...})
import lily
from tests.helpers import count_params_script

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["bitfit", "vpt_shallow", "vpt_deep", "ssf", "fact_tt", "fact_tk", "repadapter", "convpass"]
MERGEABLE = ["bitfit", "ssf", "fact_tt", "fact_tk", "repadapter"]
IDENTITY_AT_INIT = ["bitfit", "fact_tt", "fact_tk", "repadapter", "convpass"]


# ---------------------------------------------------------------------------------------------
# counts on ViT-B/16 through scripts/count_params.py
# ---------------------------------------------------------------------------------------------
def _count_fn():
    return count_params_script().count


COUNTS = [  # (overrides, spec count)
    (["method=bitfit"], 102_912),
    (["method=ssf"], 205_824),
    (["method=fact_tt", "method.rank=8"], 21_504),
    (["method=fact_tt", "method.rank=16"], 61_440),
    (["method=fact_tk", "method.rank=32"], 86_528),
    (["method=fact_tk", "method.rank=16"], 30_976),
    (["method=repadapter"], 239_808),
    (["method=repadapter", "method.targets=[attn]"], 119_904),
    (["method=convpass"], 327_552),
    (["method=convpass", "method.targets=[attn]"], 163_776),
    (["method=vpt_shallow", "method.prompt_length=10"], 7_680),
    (["method=vpt_deep", "method.prompt_length=10"], 92_160),
    # the authors' per-task values through ${by_task:...}
    (["method=vpt_deep", "task=sun397"], 9_216 * 5),
    (["method=fact_tt", "task=clevr_dist"], 8_448),         # r=4
]


def test_counts_on_vit_b16_equal_the_spec(capsys):
    count = _count_fn()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for overrides, expected in COUNTS:
            ov = ["backbone=vit_b16_in21k", "task=dtd", *overrides]
            cfg = compose("train", overrides=ov)
            assert count(cfg) == expected, overrides
    capsys.readouterr()


def test_per_task_values_and_overrides_resolve():
    from engine.setup import method_config
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        def opts(*ov):
            return method_config(compose("train", overrides=list(ov)).method)
        assert opts("task=dtd", "method=vpt_deep").prompt_length == 10
        assert opts("task=clevr_dist", "method=vpt_deep").prompt_length == 200
        assert opts("task=dtd", "method=vpt_deep", "method.prompt_length=5").prompt_length == 5   # override wins
        o = opts("task=svhn", "method=fact_tt")
        assert (o.rank, o.scale) == (16, 100)
        o = opts("task=oxford_iiit_pet", "method=fact_tk")
        assert (o.rank, o.scale) == (16, 10)
        assert opts("task=caltech101", "method=repadapter").scale == 5
        o = opts("task=dtd", "method=convpass")
        assert (o.scale, o.xavier_init) == (0.01, True)
        o = opts("task=cifar", "method=convpass")
        assert (o.scale, o.xavier_init) == (0.1, False)
        cfg = compose("train", overrides=["task=eurosat", "method=ssf", "backbone=vit_b16_in21k"])
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.backbone.drop_path_rate) == (3e-3, 5e-2, 0.2)
        assert cfg.optim.no_decay_1d is True
        cfg = compose("train", overrides=["task=eurosat", "method=ssf", "optim.lr=0.01"])
        assert cfg.optim.lr == 0.01
        cfg = compose("train", overrides=["task=dtd", "method=vpt_deep", "backbone=vit_b16_in21k"])
        assert cfg.backbone.drop_path_rate == 0.0


def test_unknown_option_is_named():
    with pytest.raises(lily.LilyConfigError, match=r"\['rank'\].*'vpt_deep'"):
        lily.method_config({"name": "vpt_deep", "rank": 4})
    with pytest.raises(lily.LilyConfigError, match="targets"):
        lily.method_config({"name": "convpass", "targets": ["q"]})


# ---------------------------------------------------------------------------------------------
# a hand-written ViT forward with the methods' equations inserted
# ---------------------------------------------------------------------------------------------
DIM, HEADS, DEPTH, PATCH, IMG = 32, 2, 2, 8, 32          # 4 x 4 patch grid


def tiny_vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, depth=DEPTH, img_size=IMG,
                             patch_size=PATCH, embed_dim=DIM, num_heads=HEADS, **kw)


def _ident(i, x, y):
    return y


def ref_vit(m, img, cb=None):
    """timm's VisionTransformer forward written out (eval mode). ``cb[site](i, x, y) -> y`` lets a
    method change the output ``y`` of a site given its input ``x``; ``*_in`` sites change an input."""
    cb = cb or {}
    c = lambda k: cb.get(k, _ident)  # noqa: E731
    ln = lambda mod, x: F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)  # noqa: E731
    B = img.shape[0]
    p = F.conv2d(img, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=PATCH)
    p = c("patch")(0, img, p)
    x = p.flatten(2).transpose(1, 2)
    x = torch.cat([m.cls_token.expand(B, -1, -1), x], dim=1) + m.pos_embed
    for i, blk in enumerate(m.blocks):
        x = c("tokens")(i, None, x)
        a = blk.attn
        n1 = c("norm1")(i, x, ln(blk.norm1, x))
        qin = c("qkv_in")(i, None, n1)
        qkv = c("qkv")(i, qin, F.linear(qin, a.qkv.weight, a.qkv.bias))
        N = x.shape[1]
        q, k, v = qkv.reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, N, DIM)
        o = c("proj")(i, o, F.linear(o, a.proj.weight, a.proj.bias))
        x = x + c("attn_out")(i, n1, o)
        n2 = c("norm2")(i, x, ln(blk.norm2, x))
        fin = c("fc1_in")(i, None, n2)
        h = c("fc1")(i, fin, F.linear(fin, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        z = F.gelu(h)
        h2 = c("fc2")(i, z, F.linear(z, blk.mlp.fc2.weight, blk.mlp.fc2.bias))
        x = x + c("mlp_out")(i, n2, h2)
    x = c("end")(0, None, x)
    if m.global_pool == "avg":
        feat = ln(m.fc_norm, x[:, m.num_prefix_tokens:].mean(1))
    else:
        feat = c("final")(0, x, ln(m.norm, x))[:, 0]
    return F.linear(feat, m.head.weight, m.head.bias)


def randomize(model, std=0.2):
    """Give every trainable tensor non-trivial values (the zero-initialised ones too)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


def adapted(name, seed=0, **kw):
    m = tiny_vit(**kw.pop("vit", {}))
    torch.manual_seed(seed)
    return lily.adapt(m, lily.MethodConfig(name=name, **kw))


def image(b=3):
    torch.manual_seed(7)
    return torch.randn(b, 3, IMG, IMG)


def close(a, b, tol=1e-5):
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


def test_reference_is_timm():
    m = tiny_vit().eval()
    x = image()
    close(m(x), ref_vit(m, x))
    m = tiny_vit(global_pool="avg").eval()
    close(m(x), ref_vit(m, x))


# -- BitFit --------------------------------------------------------------------------------
def test_bitfit_trains_exactly_the_encoder_biases():
    m = adapted("bitfit")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    expected = {"patch_embed.proj.bias", "norm.bias", "head.weight", "head.bias"}
    for i in range(DEPTH):
        expected |= {f"blocks.{i}.{s}.bias" for s in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")}
    assert trainable == expected
    # the formula of the spec (D + L * (D + 3D + D + D + 4D + D) + D) at D=32, L=2
    assert lily.count_parameters(m) == DIM + DEPTH * 11 * DIM + DIM
    randomize(m)
    m.eval()
    close(m(image()), ref_vit(m, image()))


# -- VPT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vpt_forward_matches_its_equation(deep, pool):
    p = 3
    m = adapted("vpt_deep" if deep else "vpt_shallow", prompt_length=p, vit={"global_pool": pool}).eval()
    P0 = m.vpt.prompt_embeddings[0]
    Pd = m.vpt.deep_prompt_embeddings
    assert (Pd is not None) == deep and (not deep or Pd.shape == (DEPTH - 1, p, DIM))
    bound = math.sqrt(6 / (3 * PATCH * PATCH + DIM))          # VPT's uniform init bound
    assert P0.abs().max() <= bound and P0.abs().max() > 0.5 * bound

    def tokens(i, _, x):
        B = x.shape[0]
        if i == 0:                                             # after cls, after the position embedding
            return torch.cat([x[:, :1], P0.expand(B, -1, -1), x[:, 1:]], dim=1)
        if deep:                                               # the previous prompt outputs are replaced
            return torch.cat([x[:, :1], Pd[i - 1].expand(B, -1, -1), x[:, 1 + p:]], dim=1)
        return x

    def end(_, __, x):                                         # the head never sees the prompts
        return torch.cat([x[:, :1], x[:, 1 + p:]], dim=1)

    x = image()
    close(m(x), ref_vit(m, x, {"tokens": tokens, "end": end}))
    # not the identity at init: the prompts take part in every attention
    frozen = tiny_vit(global_pool=pool).eval()
    assert not torch.allclose(m(x), frozen(x), atol=1e-4)
    assert lily.count_parameters(m) == (DEPTH if deep else 1) * p * DIM


def test_vpt_with_register_tokens_keeps_them_before_the_prompts():
    p = 2
    m = adapted("vpt_shallow", prompt_length=p, vit={"reg_tokens": 2}).eval()
    seen = {}
    m.blocks[0].register_forward_hook(lambda mod, a, out: seen.setdefault("x", a[0]))
    m(image())
    # 1 cls + 2 registers + p prompts + 16 patches; prompts right after the prefix tokens
    assert seen["x"].shape[1] == 3 + p + 16
    assert torch.equal(seen["x"][0, 3:3 + p], m.vpt.prompt_embeddings[0].detach())


# -- SSF -------------------------------------------------------------------------------------
def test_ssf_forward_matches_its_equation():
    m = adapted("ssf").eval()
    B = m.blocks
    g = lambda mod: (mod.ssf.scale, mod.ssf.shift)  # noqa: E731

    def ss(get):
        def f(i, x, y):
            s, b = get(i)
            return y * s + b
        return f
    cb = {
        "patch": lambda i, x, y: y * m.patch_embed.proj.ssf.scale[None, :, None, None]
        + m.patch_embed.proj.ssf.shift[None, :, None, None],          # before flatten, cls, pos-embed
        "norm1": ss(lambda i: g(B[i].norm1)), "qkv": ss(lambda i: g(B[i].attn.qkv)),
        "proj": ss(lambda i: g(B[i].attn.proj)), "norm2": ss(lambda i: g(B[i].norm2)),
        "fc1": ss(lambda i: g(B[i].mlp.fc1)),                          # before GELU
        "fc2": ss(lambda i: g(B[i].mlp.fc2)), "final": ss(lambda i: g(m.norm)),
    }
    x = image()
    close(m(x), ref_vit(m, x, cb))
    scales = torch.cat([mod.ssf.scale.detach() for mod in m.modules() if hasattr(mod, "ssf")])
    assert abs(scales.mean().item() - 1) < 0.01 and 0.01 < scales.std().item() < 0.03   # N(1, 0.02)
    assert lily.count_parameters(m) == 2 * DIM + DEPTH * 2 * 11 * DIM + 2 * DIM
    assert not torch.allclose(m(x), tiny_vit().eval()(x), atol=1e-4)   # not the identity at init


# -- FacT --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_fact_forward_matches_the_authors_equations(name):
    r, s = 4, 0.7
    m = adapted(name, rank=r, scale=s)
    randomize(m)
    m.eval()
    f = m.blocks[0].attn.qkv.adapters["q"].factors
    U, V = f.FacTu.weight, f.FacTv.weight
    u = lambda t: t @ U.t()  # noqa: E731
    vv = lambda t: t @ V.t()  # noqa: E731

    def cores(i):
        """q, k, v, proj (used as u @ C), fc1 (r x 4r), fc2 (used as @ fc2.t()): the authors' layout."""
        if name == "fact_tt":
            a, ml = m.blocks[i].attn, m.blocks[i].mlp
            lin = lambda ad: ad.core.weight  # noqa: E731  (Linear(in, out).weight: out x in)
            qa = a.qkv.adapters
            # TT: x -> Linear core: x @ W.T
            return ([lin(qa[k]).t() for k in "qkv"] + [lin(a.proj.adapters["proj"]).t()],
                    lin(ml.fc1.adapters["fc1"]).t(), lin(ml.fc2.adapters["fc2"]))
        c = f.FacTc @ f.FacTp[:, 12 * i:12 * i + 4]
        cm = f.FacTc @ f.FacTp[:, 12 * i + 4:12 * i + 12]
        return ([c[:, :, j] for j in range(4)], cm[:, :, :4].reshape(r, 4 * r), cm[:, :, 4:].reshape(r, 4 * r))

    def qkv(i, x, y):
        cq = cores(i)[0]
        return y + torch.cat([vv(u(x) @ cq[j]) for j in range(3)], dim=2) * s

    def proj(i, x, y):
        return y + vv(u(x) @ cores(i)[0][3]) * s

    def fc1(i, x, y):
        B, N, C = x.shape
        return y + vv((u(x) @ cores(i)[1]).reshape(B, N, 4, r)).reshape(B, N, 4 * C) * s

    def fc2(i, z, y):
        B, N, _ = z.shape
        return y + vv(u(z.reshape(B, N, 4, DIM)).reshape(B, N, 4 * r) @ cores(i)[2].t()) * s

    x = image()
    close(m(x), ref_vit(m, x, {"qkv": qkv, "proj": proj, "fc1": fc1, "fc2": fc2}))
    L = DEPTH
    expected = 2 * DIM * r + (L * 12 * r * r if name == "fact_tt" else L * 12 * r + r ** 3)
    assert lily.count_parameters(m) == expected


# -- RepAdapter -----------------------------------------------------------------------------------
def test_repadapter_forward_matches_the_authors_conv1d_form():
    s = 0.5
    m = adapted("repadapter", scale=s)
    randomize(m)
    m.eval()

    def ra(mod):
        def f(i, _, x):
            a = mod(i).repadapter
            t = x.transpose(1, 2)                                            # the authors' Conv1d layout
            h = F.conv1d(t, a.conv_A.weight, a.conv_A.bias)
            return (F.conv1d(h, a.conv_B.weight, a.conv_B.bias, groups=2) * s + t).transpose(1, 2)
        return f
    cb = {"qkv_in": ra(lambda i: m.blocks[i].attn.qkv), "fc1_in": ra(lambda i: m.blocks[i].mlp.fc1)}
    x = image()
    close(m(x), ref_vit(m, x, cb))
    a = m.blocks[0].attn.qkv.repadapter
    assert a.conv_A.weight.shape == (8, DIM, 1) and a.conv_B.weight.shape == (DIM, 4, 1)
    assert lily.count_parameters(m) == 2 * DEPTH * (DIM * 8 + 8 + DIM * 4 + DIM)


# -- Convpass -----------------------------------------------------------------------------------
@pytest.mark.parametrize("xavier", [False, True])
def test_convpass_forward_matches_the_authors_module(xavier):
    s = 0.3
    m = adapted("convpass", scale=s, xavier_init=xavier)
    cp0 = m.blocks[0].adapter_attn
    w = cp0.adapter_conv.weight.detach()
    if not xavier:   # zeros with an identity centre tap
        eye = torch.zeros_like(w)
        eye[:, :, 1, 1] = torch.eye(8)
        assert torch.equal(w, eye)
    else:
        assert w[:, :, 0, 0].abs().sum() > 0
    randomize(m)
    m.eval()
    qg = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731

    def cp(mod, x):
        B, N, C = x.shape
        d = qg(F.linear(x, mod.adapter_down.weight, mod.adapter_down.bias))
        conv = lambda t: F.conv2d(t, mod.adapter_conv.weight, mod.adapter_conv.bias, padding=1)  # noqa: E731
        patch = conv(d[:, 1:].reshape(B, 4, 4, 8).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, 16, 8)
        cls = conv(d[:, :1].reshape(B, 1, 1, 8).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, 1, 8)
        return F.linear(qg(torch.cat([cls, patch], dim=1)), mod.adapter_up.weight, mod.adapter_up.bias)

    cb = {"attn_out": lambda i, n1, y: y + cp(m.blocks[i].adapter_attn, n1) * s,   # same LN output as attn
          "mlp_out": lambda i, n2, y: y + cp(m.blocks[i].adapter_mlp, n2) * s}
    x = image()
    close(m(x), ref_vit(m, x, cb))
    assert lily.count_parameters(m) == 2 * DEPTH * ((DIM * 8 + 8) + (8 * 8 * 9 + 8) + (8 * DIM + DIM))


# ---------------------------------------------------------------------------------------------
# init, merge, gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [(n, {}) for n in IDENTITY_AT_INIT] + [("convpass", {"xavier_init": True})])
def test_identity_at_init(name, kw):
    x = image()
    frozen = tiny_vit().eval()
    m = adapted(name, **kw).eval()
    close(m(x), frozen(x), tol=1e-6)


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores_bit_for_bit(name):
    kw = {"rank": 4} if name.startswith("fact") else {}
    m = adapted(name, **kw)
    randomize(m)
    m.eval()
    x = image()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    y0 = m(x)
    lily.merge(m)
    close(m(x), y0, tol=1e-5)
    if name != "bitfit":   # the method's own path is off while merged: zeroing it changes nothing
        changed = [n for n, t in m.state_dict().items() if not torch.equal(t, before[n])]
        assert changed, "merge changed no frozen weight"
    lily.unmerge(m)
    after = m.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    close(m(x), y0, tol=1e-6)


@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep", "convpass"])
def test_refused_merge_changes_nothing(name):
    m = adapted(name)
    randomize(m)
    before = {n: t.clone() for n, t in m.state_dict().items()}
    with pytest.raises(lily.MergeError, match=name):
        lily.merge(m)
    assert all(torch.equal(before[n], t) for n, t in m.state_dict().items())


OWN = {  # which parameter names are the method's own (the authors' trainable rule, our names)
    "bitfit": lambda n: n.endswith(".bias"),
    "vpt_shallow": lambda n: n.startswith("vpt."),
    "vpt_deep": lambda n: n.startswith("vpt."),
    "ssf": lambda n: ".ssf." in n,
    "fact_tt": lambda n: "FacT" in n or ".core." in n,
    "fact_tk": lambda n: "FacT" in n,
    "repadapter": lambda n: ".repadapter." in n,
    "convpass": lambda n: ".adapter_attn." in n or ".adapter_mlp." in n,
}


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_exactly_the_method_and_the_head(name):
    m = adapted(name)
    randomize(m)       # no zero factor that would block a gradient
    m.train()
    m(image()).square().mean().backward()
    names = {n for n, _ in m.named_parameters()}
    expected = {n for n in names if OWN[name](n) and not n.startswith("head.")}
    assert expected
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == expected | {"head.weight", "head.bias"}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == got


@pytest.mark.parametrize("name", ["vpt_deep", "fact_tk", "ssf", "repadapter"])
def test_save_and_load_trainable_round_trip(name, tmp_path):
    m = adapted(name)
    randomize(m)
    m.eval()
    x = image()
    y = m(x)
    lily.save_trainable(m, tmp_path / "t.pt")
    fresh = tiny_vit()
    lily.load_trainable(fresh, tmp_path / "t.pt")
    close(fresh.eval()(x), y, tol=0)


def test_methods_build_on_the_meta_device():
    for name in METHODS:
        with torch.device("meta"):
            m = lily.adapt(tiny_vit(), lily.MethodConfig(name=name))
        assert lily.count_parameters(m) > 0


def test_non_vit_models_are_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.head = torch.nn.Linear(4, 2)
    for name in METHODS[1:]:
        with pytest.raises(lily.LilyConfigError, match=name):
            lily.adapt(model, lily.MethodConfig(name=name))
