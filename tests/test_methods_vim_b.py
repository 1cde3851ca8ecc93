"""MambaPEFT's ParallelAdapter, prompt tuning, Affix-tuning and Additional-scan on Vision Mamba
(issue 16 part B; facts: ../shared/spec/baselines-vim.md sections 3.5-3.8).

Counts on Vim-S (depth 24, d_model 384, head excluded) through scripts/count_params.py on the
meta device; forwards against a hand-written reference of the whole model (patch embed, middle
cls, pos embed, prompts, pre-norm residual blocks, both scans written with the sequential
selective_scan_ref and F.conv1d, affix prefixes, extra states, the parallel adapter); identity
at init where the spec says so (ParallelAdapter; Additional-scan with the fixed zero init) and
not where it does not (prompt, affix: new tokens; Additional-scan's released random init);
refused merges change nothing; gradients reach exactly the trainable tensors, and the z half of
every affix token gets an exactly zero gradient (a dead half, reported as MambaPEFT has it).
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lily
from common.errors import UserError
from models.mamba_ops import selective_scan_ref
from models.vim import build_vim, vim_small
from tests.helpers import count_params_script

ROOT = Path(__file__).resolve().parents[1]
D_MODEL = 16

SPEC_COUNTS = {                       # spec section 6 (method config -> exact count, head excluded)
    "vim_parallel_adapter": 884_736,
    "vim_prompt": 3_072,
    "vim_prompt_proj": 298_752,
    "vim_affix": 221_184,
    "vim_affix_proj": 115_685_376,
    "vim_additional_scan": 663_552,
}
METHODS = {
    "parallel_adapter": {"name": "vim_parallel_adapter"},
    "prompt": {"name": "vim_prompt"},
    "prompt_proj": {"name": "vim_prompt", "projection": True},
    "affix": {"name": "vim_affix", "projection": False},
    "affix_proj": {"name": "vim_affix", "projection": True, "hidden": 12},
    "additional_scan": {"name": "vim_additional_scan", "num_states": 3},
    "additional_scan_released": {"name": "vim_additional_scan", "num_states": 3, "x_proj_init": "random_released"},
    "additional_scan_zeros": {"name": "vim_additional_scan", "num_states": 3, "x_proj_init": "zeros"},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_vim(seed=0):
    """depth 2, d_model 16 (d_inner 32, dt_rank 1, d_state 16), 32 px images: M = 4 patches, cls at 2."""
    torch.manual_seed(seed)
    return vim_small(num_classes=5, img_size=32, depth=2, embed_dim=D_MODEL, kernels="pytorch").eval()


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomize(model, std=0.3, seed=3):
    """Every trainable tensor except the head: random (zero-initialised ups and projections included)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("head."):
                p.copy_(std * torch.randn(p.shape, generator=g))


def adapted(key, seed=0, random_trainables=True):
    model = lily.adapt(small_vim(seed), METHODS[key])
    if random_trainables:
        randomize(model)
    return model.eval()


# ---------------------------------------------------------------------------------------
# The reference: the whole Vim forward written out from vim.md 2.1-2.2 and the spec's 3.5-3.8
# ---------------------------------------------------------------------------------------
def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_direction(x, z, conv, x_proj_w, dt, A, D, R, N, new_rows=None):
    """One scan on (B, E, L) x and z. ``new_rows``: (2N', E) rows giving [B_new | C_new], placed first."""
    L = x.shape[-1]
    u = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1, groups=x.shape[1])[..., :L])
    ut = u.transpose(1, 2)
    x_dbl = ut @ x_proj_w.t()
    dt_low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    if new_rows is not None:
        n_new = new_rows.shape[0] // 2
        new = ut @ new_rows.t()
        B, C = torch.cat([new[..., :n_new], B], -1), torch.cat([new[..., n_new:], C], -1)
    delta = (dt_low @ dt.weight.t()).transpose(1, 2)
    return selective_scan_ref(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z, delta_bias=dt.bias,
                              delta_softplus=True)


def ref_mixer(m, h, prefix_f=None, prefix_b=None, add=None):
    """Returns (mixer output, o = out_proj's input). prefix_*: (T, 2E) xz tokens of that scan."""
    E, R, N = m.d_inner, m.dt_rank, m.d_state
    xz = h @ m.in_proj.weight.t()                                  # (B, L, 2E)
    xz_f, xz_b, T = xz, xz.flip(1), 0
    if prefix_f is not None:
        T = prefix_f.shape[0]
        xz_f = torch.cat([prefix_f.expand(xz.shape[0], -1, -1), xz_f], 1)
        xz_b = torch.cat([prefix_b.expand(xz.shape[0], -1, -1), xz_b], 1)
    A_f, A_b = -torch.exp(m.A_log), -torch.exp(m.A_b_log)
    new_f = new_b = None
    if add is not None:
        A_f = torch.cat([-torch.exp(add.A_log), A_f], 1)
        A_b = torch.cat([-torch.exp(add.A_b_log), A_b], 1)
        new_f, new_b = add.x_proj.weight, add.x_proj_b.weight
    xf, zf = xz_f.transpose(1, 2)[:, :E], xz_f.transpose(1, 2)[:, E:]
    xb, zb = xz_b.transpose(1, 2)[:, :E], xz_b.transpose(1, 2)[:, E:]
    y_f = ref_direction(xf, zf, m.conv1d, m.x_proj.weight, m.dt_proj, A_f, m.D, R, N, new_f)[..., T:]
    y_b = ref_direction(xb, zb, m.conv1d_b, m.x_proj_b.weight, m.dt_proj_b, A_b, m.D_b, R, N, new_b)[..., T:]
    o = ((y_f + y_b.flip(-1)) / 2).transpose(1, 2)
    return o @ m.out_proj.weight.t(), o


def ref_features(model, imgs, prompt=None, num_prefix=0, affix=None, add=False, adapter=None):
    """prompt: (P, D) tokens; affix: per layer (prefix_f, prefix_b); adapter: per layer (down, up, s)."""
    x = F.conv2d(imgs, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)
    x = x.flatten(2).transpose(1, 2)
    n, p = x.shape[0], x.shape[1] // 2
    x = torch.cat([x[:, :p], model.cls_token.expand(n, -1, -1), x[:, p:]], 1) + model.pos_embed
    if prompt is not None:
        x = torch.cat([prompt[:num_prefix].expand(n, -1, -1), x, prompt[num_prefix:].expand(n, -1, -1)], 1)
        p += num_prefix
    h, residual = x, None
    for i, layer in enumerate(model.layers):
        residual = h if residual is None else residual + h
        pf, pb = affix[i] if affix is not None else (None, None)
        h, o = ref_mixer(layer.mixer, rms(residual, layer.norm.weight), pf, pb,
                         layer.mixer.scan_addition if add else None)
        if adapter is not None:
            down, up, s = adapter[i]
            h = h + s * torch.relu(o @ down.t()) @ up.t()
    return rms(residual + h, model.norm_f.weight)[:, p]


# ---------------------------------------------------------------------------------------
# Counts on Vim-S through scripts/count_params.py (meta device)
# ---------------------------------------------------------------------------------------
def test_vim_s_counts_equal_the_spec_through_count_params(capsys):
    from hydra import compose, initialize_config_dir
    mod = count_params_script()
    got = {}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for name in SPEC_COUNTS:
            got[name] = mod.count(compose("train", overrides=["backbone=vim_s", f"method={name}", "task=cifar"]))
        # TAB's ParallelAdapter row (663K) is r = 24; Additional-scan is 110,592 per extra state
        got["pa_r24"] = mod.count(compose("train", overrides=["backbone=vim_s", "method=vim_parallel_adapter",
                                                              "method.rank=24", "task=cifar"]))
        got["scan_1"] = mod.count(compose("train", overrides=["backbone=vim_s", "method=vim_additional_scan",
                                                              "method.num_states=1", "task=cifar"]))
    assert capsys.readouterr().out.count("trainable_params_excluding_head=") == len(got)
    assert {k: got[k] for k in SPEC_COUNTS} == SPEC_COUNTS
    # the formulas of the spec: 24 r (768 + 384); 110,592 N'
    assert got["pa_r24"] == 24 * 24 * (768 + 384) == 663_552
    assert got["scan_1"] == 2 * 24 * (768 + 2 * 768) == 110_592


# ---------------------------------------------------------------------------------------
# Forwards against the reference
# ---------------------------------------------------------------------------------------
def test_parallel_adapter_forward_and_identity_at_init():
    x = images()
    plain = small_vim()
    with torch.no_grad():
        base = plain.forward_features(x)
    model = adapted("parallel_adapter", random_trainables=False)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), base)          # up zero-initialised: identity
    randomize(model)
    adapters = [layer.mixer.out_proj.adapters["parallel_adapter"] for layer in model.layers]
    assert all(a.scale == 0.1 and a.down.bias is None and a.up.bias is None for a in adapters)
    assert adapters[0].down.in_features == 2 * D_MODEL and adapters[0].up.out_features == D_MODEL
    with torch.no_grad():
        ref = ref_features(model, x, adapter=[(a.down.weight, a.up.weight, 0.1) for a in adapters])
        torch.testing.assert_close(model.forward_features(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_prompt_forward_places_tokens_after_pos_embed_and_shifts_the_cls_read_out(projection):
    x = images()
    model = adapted("prompt_proj" if projection else "prompt")
    pr = model.prompt
    assert pr.num_prefix == 4 and pr.embedding.weight.shape == (8, D_MODEL)
    w = pr.embedding.weight
    if projection:      # Embedding -> Linear -> Tanh -> Linear, written out
        l1, l2 = pr.projection[0], pr.projection[2]
        tokens = torch.tanh(w @ l1.weight.t() + l1.bias) @ l2.weight.t() + l2.bias
    else:
        tokens = w
    seen = {}
    def first_block_input(module, args):
        seen.setdefault("in", args[0])
    model.layers[0].register_forward_pre_hook(first_block_input)
    with torch.no_grad():
        out = model.forward_features(x)
        ref = ref_features(model, x, prompt=tokens, num_prefix=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the sequence: 4 prompts | patches 0-1 | cls | patches 2-3 | 4 prompts (no position embedding on prompts)
    assert seen["in"].shape == (2, 4 + 5 + 4, D_MODEL)
    torch.testing.assert_close(seen["in"][0, :4], tokens[:4])
    torch.testing.assert_close(seen["in"][0, 9:], tokens[4:])
    torch.testing.assert_close(seen["in"][0, 4 + 2], (model.cls_token + model.pos_embed[:, 2])[0, 0])
    # the read-out index moved to 2 + 4: the feature changes if a different position is read
    with torch.no_grad():
        wrong = ref_features(model, x, prompt=tokens, num_prefix=0)
    assert not torch.allclose(out, wrong, atol=1e-3)


def test_prompt_placements():
    for placement, k in (("prefix", 3), ("suffix", 0)):
        model = lily.adapt(small_vim(), {"name": "vim_prompt", "num_tokens": 3, "placement": placement})
        randomize(model)
        assert model.prompt.num_prefix == k
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(images()),
                                       ref_features(model, images(), prompt=model.prompt.embedding.weight,
                                                    num_prefix=k), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_affix_forward_prepends_per_layer_per_direction_tokens_and_drops_them(projection):
    x = images()
    model = adapted("affix_proj" if projection else "affix")
    af, E2, T = model.affix, 4 * D_MODEL, 3
    w = af.embedding.weight
    if projection:
        l1, l2 = af.projection[0], af.projection[2]
        assert w.shape == (T, E2) and l1.out_features == 12 and l2.out_features == 2 * 2 * E2
        flat = torch.tanh(w @ l1.weight.t() + l1.bias) @ l2.weight.t() + l2.bias
    else:
        assert w.shape == (T, 2 * 2 * E2)        # Embedding(T, depth * 2 * 2 d_inner)
        flat = w
    # per token: [layer 0: f (x | z), b (x | z)][layer 1: ...]
    per_layer = [(flat[:, (2 * i) * E2:(2 * i + 1) * E2], flat[:, (2 * i + 1) * E2:(2 * i + 2) * E2])
                 for i in range(2)]
    with torch.no_grad():
        out = model.forward_features(x)
        torch.testing.assert_close(out, ref_features(model, x, affix=per_layer), atol=1e-5, rtol=1e-5)
        # swapping the directions' tokens gives another output: each scan reads its own prefix
        swapped = ref_features(model, x, affix=[(b, f) for f, b in per_layer])
    assert not torch.allclose(out, swapped, atol=1e-4)


def test_affix_mixer_sequence_length_and_kernels_see_the_prefix():
    """The scans run on T + L positions; the mixer output keeps L."""
    from models import mamba_ops
    model = adapted("affix")
    lengths = []
    orig = mamba_ops.selective_scan

    def spy(u, *a, **k):
        lengths.append(u.shape[-1])
        return orig(u, *a, **k)
    mamba_ops.selective_scan = spy
    try:
        with torch.no_grad():
            model.forward_features(images())
    finally:
        mamba_ops.selective_scan = orig
    assert lengths == [3 + 5] * 4                   # 2 layers x 2 directions, T = 3, L = 5


@pytest.mark.parametrize("key", ["additional_scan", "additional_scan_released", "additional_scan_zeros"])
def test_additional_scan_forward_and_init(key):
    x = images()
    plain = small_vim()
    with torch.no_grad():
        base = plain.forward_features(x)
    model = adapted(key, random_trainables=False)
    add = model.layers[1].mixer.scan_addition
    # A_log_new = pretrained A_log[:, 0] repeated N' times, per direction
    assert torch.equal(add.A_log, plain.layers[1].mixer.A_log[:, :1].repeat(1, 3))
    assert torch.equal(add.A_b_log, plain.layers[1].mixer.A_b_log[:, :1].repeat(1, 3))
    assert add.x_proj.weight.shape == (6, 2 * D_MODEL) and add.x_proj.bias is None
    with torch.no_grad():
        out = model.forward_features(x)
        torch.testing.assert_close(out, ref_features(model, x, add=True), atol=1e-5, rtol=1e-5)
    bound = (2 * D_MODEL) ** -0.5                  # PyTorch's default Linear init U(+-1/sqrt(d_inner))
    rows_b, rows_c = add.x_proj.weight[:3], add.x_proj.weight[3:]
    if key == "additional_scan_released":          # the output changes at init
        assert bound / 2 < add.x_proj.weight.abs().max() <= bound
        assert (out - base).abs().max() > 1e-3
    else:                                          # zero_c (default) and zeros: identity at init
        assert torch.count_nonzero(rows_c) == 0
        assert (torch.count_nonzero(rows_b) == 0) == (key == "additional_scan_zeros")
        torch.testing.assert_close(out, base, atol=1e-6, rtol=1e-6)
    randomize(model)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref_features(model, x, add=True), atol=1e-5, rtol=1e-5)


def test_additional_scan_all_zero_init_is_a_saddle_and_the_default_trains():
    """The released zero_init_x_proj (x_proj_init: zeros) gives every tensor of the method an
    exactly zero gradient (B_new = 0 keeps the new states at 0, C_new = 0 reads nothing back): it
    never trains. The default zero_c (only the C rows zero) gives C_new a gradient at once."""
    grads = {}
    for key in ("additional_scan_zeros", "additional_scan"):
        model = adapted(key, random_trainables=False)
        model.head.weight.data.normal_()          # a head that passes gradient back
        model(images(4)).pow(2).sum().backward()
        grads[key] = {n: p.grad for n, p in model.named_parameters() if "scan_addition" in n}
    assert all(torch.count_nonzero(g) == 0 for g in grads["additional_scan_zeros"].values())
    g = grads["additional_scan"]
    assert all(torch.count_nonzero(g[f"layers.{i}.mixer.scan_addition.{t}"][3:]) > 0
               for i in range(2) for t in ("x_proj.weight", "x_proj_b.weight"))


@pytest.mark.parametrize("key", ["prompt", "affix"])
def test_token_methods_are_not_the_identity_at_init(key):
    """The spec (5.8): prompt and affix change the output at init (N(0,1) tokens enter the scans)."""
    x = images()
    with torch.no_grad():
        base = small_vim().forward_features(x)
        out = adapted(key, random_trainables=False).forward_features(x)
    assert (out - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# Merge refused, gradients, options
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(METHODS))
def test_merge_is_refused_and_changes_nothing(key):
    model = adapted(key)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model.forward_features(images())
    with pytest.raises(lily.MergeError):
        lily.merge(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images()), out)


TRAINABLE = {   # the names each method adds (beyond head.weight, head.bias), per the spec
    "parallel_adapter": {f"layers.{i}.mixer.out_proj.adapters.parallel_adapter.{m}.weight"
                         for i in range(2) for m in ("down", "up")},
    "prompt": {"prompt.embedding.weight"},
    "prompt_proj": {"prompt.embedding.weight"} | {f"prompt.projection.{j}.{t}" for j in (0, 2)
                                                  for t in ("weight", "bias")},
    "affix": {"affix.embedding.weight"},
    "affix_proj": {"affix.embedding.weight"} | {f"affix.projection.{j}.{t}" for j in (0, 2)
                                                for t in ("weight", "bias")},
    "additional_scan": {f"layers.{i}.mixer.scan_addition.{t}" for i in range(2)
                        for t in ("A_log", "A_b_log", "x_proj.weight", "x_proj_b.weight")},
}


@pytest.mark.parametrize("key", list(TRAINABLE))
def test_gradients_reach_exactly_the_trainable_tensors(key):
    model = adapted(key)
    model.train()
    for m in model.modules():                       # deterministic: no dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == TRAINABLE[key] | {"head.weight", "head.bias"}
    loss = F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("projection", [False, True])
def test_affix_z_half_is_dead(projection):
    """z only gates the prefix outputs, which are dropped: the z half of every affix token gets an
    exactly zero gradient (spec 3.7), the x half does not. With projection the z-half *outputs* of
    the MLP are the dead ones (their gradient is zero; the MLP weights still train via x)."""
    model = adapted("affix_proj" if projection else "affix")
    E = 2 * D_MODEL
    captured = {}
    orig = model.affix.forward

    def capture():
        t = orig()
        t.retain_grad()
        captured["t"] = t
        return t
    model.affix.forward = capture
    model(images(4)).pow(2).sum().backward()
    g = captured["t"].grad                                   # (depth, 2, T, 2 d_inner)
    assert g.shape == (2, 2, 3, 2 * E)
    assert torch.count_nonzero(g[..., E:]) == 0              # z half: exactly zero
    assert (g[..., :E].abs() > 0).float().mean() > 0.9       # x half: alive
    if not projection:
        gw = model.affix.embedding.weight.grad.view(3, 2, 2, 2 * E)
        assert torch.count_nonzero(gw[..., E:]) == 0


def test_options_are_checked_and_named():
    with pytest.raises(lily.LilyConfigError, match="x_proj_init"):
        lily.MethodConfig(name="vim_additional_scan", x_proj_init="random")
    with pytest.raises(lily.LilyConfigError, match="num_tokens"):
        lily.MethodConfig(name="vim_prompt", num_tokens=7)      # prefix_suffix needs an even count
    with pytest.raises(lily.LilyConfigError, match="placement"):
        lily.MethodConfig(name="vim_prompt", placement="middle")
    with pytest.raises(lily.LilyConfigError, match="projection"):
        lily.MethodConfig(name="vim_affix", projection="yes")
    with pytest.raises(lily.LilyConfigError, match="unknown method option"):
        lily.method_config({"name": "vim_parallel_adapter", "dim_adaptf": 32})
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=1, img_size=32)
    for cfg in METHODS.values():
        with pytest.raises(lily.LilyConfigError, match="Vision Mamba"):
            lily.adapt(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=1,
                                         img_size=32), cfg)
    assert vit is not None


def test_additional_scan_decay_rule_matches_the_new_A_only():
    from engine.recipes import decay_for, method_decay_mult
    rules = method_decay_mult("vim_additional_scan")
    model = adapted("additional_scan")
    wd = {n: decay_for(n, p, 1e-4, rules) for n, p in model.named_parameters() if p.requires_grad}
    assert wd["layers.0.mixer.scan_addition.A_log"] == wd["layers.1.mixer.scan_addition.A_b_log"] == 0.0
    assert wd["layers.0.mixer.scan_addition.x_proj.weight"] == 1e-4
    assert wd["head.weight"] == 1e-4 and wd["head.bias"] == 0.0


def test_save_load_trainable_round_trip(tmp_path):
    model = adapted("affix")
    lily.save_trainable(model, tmp_path / "t.pt")
    fresh = lily.load_trainable(small_vim(), tmp_path / "t.pt").eval()
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(images()), model.forward_features(images()))


def test_num_classes_override_is_the_released_100_way_head_and_refuses_larger_tasks():
    with torch.device("meta"):
        model, _ = build_vim({"pretrained": False, "num_classes_override": 100}, num_classes=37)
        assert model.head.out_features == 100
        model, _ = build_vim({"pretrained": False}, num_classes=37)
        assert model.head.out_features == 37
        with pytest.raises(UserError, match="sun397"):
            build_vim({"pretrained": False, "num_classes_override": 100}, num_classes=397)


# ---------------------------------------------------------------------------------------
# Demo: every method learns a small task (slow: run by .ci/run)
# ---------------------------------------------------------------------------------------
def toy_task(n, seed):
    """4 classes: a bright 16x16 quadrant (one per class) on noise, 32 px images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, :, 16 * r:16 * r + 16, 16 * col:16 * col + 16] += 1.5
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize("key", ["parallel_adapter", "prompt", "prompt_proj", "affix", "affix_proj",
                                 "additional_scan"])
def test_demo_every_method_learns(key):
    torch.manual_seed(0)
    model = lily.adapt(vim_small(num_classes=4, img_size=32, depth=2, embed_dim=32, kernels="pytorch"), METHODS[key])
    xt, yt = toy_task(256, 0)
    xv, yv = toy_task(128, 1)
    with torch.no_grad():
        chance = (model.eval()(xv).argmax(-1) == yv).float().mean().item()   # frozen random head
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=1e-4)
    model.train()
    for epoch in range(8):
        for i in range(0, 256, 32):
            loss = F.cross_entropy(model(xt[i:i + 32]), yt[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model.eval()(xv).argmax(-1) == yv).float().mean().item()
    moved = [n for n, p in model.named_parameters() if n in before and not n.startswith("head.")
             and not torch.equal(p, before[n])]
    print(f"{key}: val acc {acc:.3f} (frozen random head {chance:.3f})")
    assert moved                                  # the method's own tensors trained
    assert acc >= 0.7 and acc > chance + 0.3
