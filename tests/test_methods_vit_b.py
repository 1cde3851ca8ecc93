"""Issue 15, part B on timm ViTs: the bottleneck Adapter (Houlsby, Pfeiffer), DoRA and VeRA from peft,
PEFT's own Lily, MoSLoRA and HydraLoRA (spec: ../shared/spec/baselines-vit.md sections 7-11, 13).

Counts: ViT-B/16 on the meta device through scripts/count_params.py, against the spec's numbers.
Forwards: each method's equation written out here with the method's own tensors (set to random
values) and the *frozen* model's sub-layers, not the implementation compared with itself.
Identity at init holds for every method here except the Adapter with its default ``xavier`` init
(NOAH's and PETL_Vision's: the up projection is xavier-uniform, not zero, so the adapted model
differs from the frozen one at init; ``lora_xavier`` and the released ``zero_released`` are checked
to be the identity).
"""
import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import lily
from tests.helpers import count_params_script

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
ALL = ["adapter_houlsby", "adapter_pfeiffer", "moslora", "hydralora", "dora", "vera", "peft_lily"]
MERGEABLE = ["moslora", "dora", "vera"]
REFUSED = ["adapter_houlsby", "adapter_pfeiffer", "hydralora", "peft_lily"]
# small settings for the tiny model (VeRA's default r=256 is larger than the tiny model needs)
SMALL = {"vera": {"rank": 16}, "peft_lily": {"rank": 4, "num_b": 3, "stride_a": 2}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vit(init_values=None, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2, img_size=32,
                             patch_size=8, embed_dim=32, num_heads=2, init_values=init_values).eval()


def adapted(name, seed=0, **kw):
    model = tiny_vit(seed=seed)
    lily.adapt(model, {"name": name, **SMALL.get(name, {}), **kw})
    return model


@torch.no_grad()
def randomize(model, seed=1):
    """Every trainable tensor random (not its init), so that each term of an equation counts."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in n else 0.0))


IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
TOK = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6))


# ---------------------------------------------------------------------------------------
# Counts on ViT-B/16 through scripts/count_params.py (meta device, in-process)
# ---------------------------------------------------------------------------------------
SPEC_COUNTS = {  # baselines-vit.md sections 7-11, 13 (head excluded)
    ("adapter_houlsby",): 313_536,
    ("adapter_houlsby", "method.bottleneck=16"): 608_640,
    ("adapter_pfeiffer",): 156_768,
    ("adapter_pfeiffer", "method.bottleneck=64"): 1_189_632,
    ("dora",): 322_560,
    ("dora", "method.targets=[qkv,proj,fc1,fc2]"): 1_262_592,
    ("moslora",): 296_448,
    ("moslora", "method.rank=16"): 595_968,
    ("hydralora",): 479_232,
    ("hydralora", "method.heads=4"): 811_008,
    ("vera",): 30_720,
    ("vera", "method.targets=[qkv,proj,fc1,fc2]"): 95_232,
    # PEFT's Lily (no spec number): ceil(12/3) A's of 768x32, 4 B's of 32x2304, 12 routers 32x4
    ("peft_lily",): 4 * 768 * 32 + 4 * 32 * 2304 + 12 * 32 * 4,
}


_count_params_module = count_params_script


def test_vit_b_counts_equal_the_spec_through_count_params(capsys):
    from hydra import compose, initialize_config_dir
    count = _count_params_module().count
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        got = {key: count(compose("train", overrides=["backbone=vit_b16_in21k", f"method={key[0]}", *key[1:]]))
               for key in SPEC_COUNTS}
    assert capsys.readouterr().out.count("trainable_params_excluding_head=") == len(SPEC_COUNTS)
    assert got == SPEC_COUNTS
    # the closed forms of the spec: Adapter 1537d + 768 per adapter, DoRA r(in+out)+out per Linear
    assert SPEC_COUNTS[("adapter_houlsby",)] == 24 * (1537 * 8 + 768)
    assert SPEC_COUNTS[("dora",)] == 12 * (8 * (768 + 2304) + 2304)


def test_dora_never_wraps_patch_embed_proj_and_q_v_slices_are_refused():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=10)
        lily.adapt(model, {"name": "dora", "targets": ["qkv", "proj", "fc1", "fc2"]})
    assert type(model.patch_embed.proj) is nn.Conv2d
    assert sum("base_layer" in n for n, _ in model.named_modules()) == 48
    with pytest.raises(lily.LilyConfigError, match="fused 'qkv'"):
        lily.adapt(tiny_vit(), {"name": "dora", "targets": ["q", "v"]})


# ---------------------------------------------------------------------------------------
# Forwards against the written-out equations
# ---------------------------------------------------------------------------------------
class Half(nn.Module):
    """A deterministic stand-in for drop-path (x / 2), so that its placement is visible."""

    def forward(self, x):
        return 0.5 * x


def bottleneck(a, y, act):
    """A(y) - y = s * up(act(down(y))) with the adapter's tensors (dropout 0)."""
    h = act(y @ a.down.weight.T + a.down.bias)
    return a.scale * (h @ a.up.weight.T + a.up.bias)


@pytest.mark.parametrize("mode", ["once", "twice_released", "outside"])
@pytest.mark.parametrize("name", ["adapter_houlsby", "adapter_pfeiffer"])
def test_adapter_forward_and_placement(name, mode):
    frozen = tiny_vit(init_values=0.7)             # LayerScale present, so ls placement counts
    for blk in frozen.blocks:
        blk.drop_path1, blk.drop_path2 = Half(), Half()
    model = copy.deepcopy(frozen)
    lily.adapt(model, {"name": name, "drop_path": mode, "scale": 0.5, "act": "gelu", "bottleneck": 3})
    randomize(model)
    x = torch.randn(2, 5, 32)
    for blk, ref in zip(model.blocks, frozen.blocks):
        def sub(kind, inp):
            f, ls, dp = {"attn": (ref.attn, ref.ls1, ref.drop_path1), "mlp": (ref.mlp, ref.ls2, ref.drop_path2)}[kind]
            o = f(inp)
            if kind not in blk.adapters:
                return dp(ls(o))
            A = lambda y: y + bottleneck(blk.adapters[kind], y, F.gelu)  # noqa: E731
            if mode == "once":
                return dp(ls(A(o)))
            if mode == "twice_released":
                return dp(ls(A(dp(ls(o)))))
            return A(dp(ls(o)))                                           # NOAH: outside
        h = x + sub("attn", ref.norm1(x))
        expected = h + sub("mlp", ref.norm2(h))
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-6)
        x = expected
    assert set(model.blocks[0].adapters) == ({"attn", "mlp"} if name == "adapter_houlsby" else {"mlp"})


def test_adapter_activations_and_dropout_order():
    model = adapted("adapter_pfeiffer", act="quick_gelu", drop_path="once")
    a = model.blocks[0].adapters["mlp"]
    y = torch.randn(4, 32)
    torch.testing.assert_close(a(y), bottleneck(a, y, lambda t: t * torch.sigmoid(1.702 * t)))
    relu = adapted("adapter_houlsby", act="relu", dropout=0.5).blocks[0].adapters["attn"].train()
    torch.manual_seed(3)
    got = relu(y)
    torch.manual_seed(3)   # dropout after the activation, on the bottleneck hidden
    h = F.dropout(F.relu(y @ relu.down.weight.T + relu.down.bias), 0.5, training=True)
    torch.testing.assert_close(got, relu.scale * (h @ relu.up.weight.T + relu.up.bias))


def test_adapter_inits():
    a = adapted("adapter_houlsby", init="xavier").blocks[0].adapters["mlp"]
    bound = math.sqrt(6 / (32 + 8))   # xavier_uniform bound for 32 <-> 8
    assert a.up.weight.abs().max() <= bound and a.up.weight.abs().max() > bound / 4
    assert a.down.bias.abs().max() < 1e-4 and a.down.bias.abs().max() > 0
    lx = adapted("adapter_houlsby", init="lora_xavier").blocks[0].adapters["mlp"]
    assert lx.down.weight.abs().max() > 0 and all(not t.any() for t in (lx.up.weight, lx.down.bias, lx.up.bias))
    z = adapted("adapter_houlsby", init="zero_released").blocks[0].adapters["mlp"]
    assert all(not t.any() for t in (z.up.weight, z.down.weight, z.down.bias, z.up.bias))


def test_zero_released_adapter_trains_only_up_bias():
    """Spec 7 pitfall (1): with all four tensors zero, down(y) = 0 for every y, so only up.bias ever
    gets a gradient; the adapter is a learned bias. Checked after several AdamW steps."""
    model = adapted("adapter_pfeiffer", init="zero_released", drop_path="once")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(IMG), torch.tensor([0, 2])).backward()
        opt.step()
    for blk in model.blocks:
        a = blk.adapters["mlp"]
        assert not a.up.weight.any() and not a.down.weight.any() and not a.down.bias.any()
        assert a.up.bias.abs().max() > 1e-3
    working = adapted("adapter_pfeiffer", init="lora_xavier", drop_path="once")
    F.cross_entropy(working(IMG), torch.tensor([0, 2])).backward()
    assert working.blocks[0].adapters["mlp"].up.weight.grad.abs().max() > 0


def qkv_tokens(model):
    """Input tokens and output of blocks[0].attn.qkv on random tokens."""
    return TOK, model.blocks[0].attn.qkv(TOK)


def test_moslora_forward_is_s_B_M_A_on_q_and_v():
    frozen = tiny_vit()
    model = adapted("moslora", rank=4, alpha=12)
    randomize(model)
    x, y = qkv_tokens(model)
    w, b = frozen.blocks[0].attn.qkv.weight, frozen.blocks[0].attn.qkv.bias
    expected = x @ w.T + b
    for i, kind in ((0, "q"), (2, "v")):
        a = model.blocks[0].attn.qkv.adapters[kind]
        delta = (12 / 4) * x @ a.lora_a.weight.T @ a.mixer.weight.T @ a.lora_b.weight.T
        expected[..., 32 * i:32 * (i + 1)] += delta
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_hydralora_forward_routes_heads_per_token():
    frozen = tiny_vit()
    model = adapted("hydralora", rank=4, heads=3, alpha=8)
    randomize(model)
    x, y = qkv_tokens(model)
    w, b = frozen.blocks[0].attn.qkv.weight, frozen.blocks[0].attn.qkv.bias
    expected = x @ w.T + b
    for i, kind in ((0, "q"), (2, "v")):
        a = model.blocks[0].attn.qkv.adapters[kind]
        gate = torch.softmax(x @ a.router.weight.T, dim=-1)           # (B, N, K): per token
        h = x @ a.lora_a.weight.T
        delta = sum(gate[..., k:k + 1] * (h @ a.lora_b[k].weight.T) for k in range(3)) * (8 / 4)
        expected[..., 32 * i:32 * (i + 1)] += delta
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # per token: changing one token changes no other token's routing or output
    x2 = x.clone()
    x2[:, 0] += 1.0
    y2 = model.blocks[0].attn.qkv(x2)
    torch.testing.assert_close(y2[:, 1:], y[:, 1:])


def test_dora_forward_is_the_row_normed_weight():
    frozen = tiny_vit()
    model = adapted("dora", rank=4, alpha=6)
    randomize(model)
    layer = model.blocks[0].attn.qkv
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    w0, b = frozen.blocks[0].attn.qkv.weight, frozen.blocks[0].attn.qkv.bias
    w = w0 + (6 / 4) * B @ A
    expected = TOK @ ((m / w.norm(dim=1))[:, None] * w).T + b          # norm of each output row
    torch.testing.assert_close(layer(TOK), expected, rtol=1e-5, atol=1e-5)
    # at init m = ||W0||_r (PEFT) so the layer is the frozen one
    fresh = adapted("dora").blocks[0].attn.qkv
    torch.testing.assert_close(fresh.lora_magnitude_vector["default"].weight, w0.norm(dim=1))


def test_vera_forward_shared_frozen_projections_and_init():
    frozen = tiny_vit()
    model = adapted("vera")
    l0, l1 = model.blocks[0].attn.qkv, model.blocks[1].attn.qkv
    assert torch.allclose(l0.vera_lambda_d["default"], torch.full((16,), 0.1))
    assert not l0.vera_lambda_b["default"].any()
    A, B = l0.vera_A["default"], l0.vera_B["default"]
    assert not A.requires_grad and not B.requires_grad
    assert A.data_ptr() == l1.vera_A["default"].data_ptr()          # one tensor shared by every layer
    assert "vera_A" not in str([n for n, _ in model.named_parameters()])
    randomize(model)
    ld, lb = l0.vera_lambda_d["default"], l0.vera_lambda_b["default"]
    w, b = frozen.blocks[0].attn.qkv.weight, frozen.blocks[0].attn.qkv.bias
    expected = TOK @ w.T + b + lb * ((ld * (TOK @ A[:, :32].T)) @ B[:96, :].T)
    torch.testing.assert_close(l0(TOK), expected, rtol=1e-5, atol=1e-5)


def test_peft_lily_forward_shares_A_by_stride_and_B_across_layers():
    frozen = tiny_vit()
    model = adapted("peft_lily", targets=["qkv", "fc1"], rank=4, num_b=3, stride_a=2, scaling=0.7)
    randomize(model)
    l0, l1 = model.blocks[0].attn.qkv, model.blocks[1].attn.qkv
    assert l0.lily_A["default"] is l1.lily_A["default"] and l0.lily_B["default"] is l1.lily_B["default"]
    assert l0.lily_router["default"] is not l1.lily_router["default"]
    assert l0.lily_B["default"] is not model.blocks[0].mlp.fc1.lily_B["default"]     # per target
    A, R = l0.lily_A["default"].weight, l0.lily_router["default"].weight
    Bs = l0.lily_B["default"].weight.reshape(3, 4, 96)                 # num_B HP experts r x out
    h = TOK @ A.T
    w = torch.softmax(h @ R.T, dim=-1).reshape(-1, 3).mean(0)          # batch routing
    expected = TOK @ frozen.blocks[0].attn.qkv.weight.T + frozen.blocks[0].attn.qkv.bias \
        + 0.7 * h @ torch.einsum("e,eio->io", w, Bs)
    torch.testing.assert_close(l0(TOK), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Identity at init, merge, gradients, save/load
# ---------------------------------------------------------------------------------------
IDENTITY = ALL[2:] + [("adapter_houlsby", "lora_xavier"), ("adapter_pfeiffer", "zero_released")]


@pytest.mark.parametrize("case", IDENTITY, ids=str)
def test_identity_at_init(case):
    name, init = case if isinstance(case, tuple) else (case, None)
    y0 = tiny_vit()(IMG)
    model = adapted(name, **({"init": init} if init else {}))
    torch.testing.assert_close(model(IMG), y0, rtol=0, atol=0)


def test_xavier_adapter_is_not_the_identity_at_init():
    assert not torch.allclose(adapted("adapter_houlsby")(IMG), tiny_vit()(IMG))


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores_bits(name):
    model = adapted(name)
    randomize(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    y = model(IMG)
    lily.merge(model)
    assert any(not torch.equal(before[n], t) for n, t in model.state_dict().items())   # weights changed
    torch.testing.assert_close(model(IMG), y, rtol=1e-5, atol=1e-5)
    lily.unmerge(model)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert torch.equal(model(IMG), y)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_merge_changes_nothing(name):
    model = adapted(name)
    randomize(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    y = model(IMG)
    with pytest.raises(lily.MergeError, match=name):
        lily.merge(model)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert torch.equal(model(IMG), y)


def test_peft_merge_refusal_in_a_later_layer_restores_the_earlier_ones():
    model = adapted("dora", targets=["qkv", "fc1"])
    randomize(model)
    with torch.no_grad():   # the last layer's merge is non-finite: PEFT's safe merge refuses it
        model.blocks[1].mlp.fc1.lora_B["default"].weight[0, 0] = float("inf")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(lily.MergeError, match="nothing was changed"):
        lily.merge(model)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


TRAINABLE = {  # the method's own tensors (by name part), besides the head
    "adapter_houlsby": ("adapters.attn.", "adapters.mlp."), "adapter_pfeiffer": ("adapters.mlp.",),
    "moslora": ("lora_a", "mixer", "lora_b"), "hydralora": ("lora_a", "lora_b", "router"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"), "vera": ("vera_lambda_b", "vera_lambda_d"),
    "peft_lily": ("lily_A", "lily_B", "lily_router"),
}


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_exactly_the_method_tensors_and_the_head(name):
    model = adapted(name)
    randomize(model)      # nonzero B's so that every tensor gets a nonzero gradient
    model.train()
    F.cross_entropy(model(IMG), torch.tensor([0, 2])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith("head.") or any(k in n for k in TRAINABLE[name])}
    assert trainable == expected and len(trainable) > 2
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in trainable), n


@pytest.mark.parametrize("name", ALL)
def test_save_load_reproduces_outputs(name, tmp_path):
    model = adapted(name)
    randomize(model)
    y = model(IMG)
    lily.save_trainable(model, tmp_path / "ckpt.pt")
    fresh = tiny_vit()                                   # same backbone; other global seed for the method
    torch.manual_seed(123)
    lily.load_trainable(fresh, tmp_path / "ckpt.pt")
    torch.testing.assert_close(fresh.eval()(IMG), y, rtol=0, atol=0)
    assert lily.count_parameters(fresh) == lily.count_parameters(model)


def test_options_are_checked_and_named():
    with pytest.raises(lily.LilyConfigError, match=r"\['ne'\].*'dora'"):
        lily.method_config({"name": "dora", "ne": 4})
    with pytest.raises(lily.LilyConfigError, match="method.init"):
        lily.method_config({"name": "adapter_houlsby", "init": "zero"})
    with pytest.raises(lily.LilyConfigError, match="method.targets of 'adapter_pfeiffer'"):
        lily.method_config({"name": "adapter_pfeiffer", "targets": ["attn", "mlp"]})
    with pytest.raises(lily.LilyConfigError, match="num_b"):
        lily.method_config({"name": "peft_lily", "num_b": 1})
    with pytest.raises(lily.LilyConfigError, match="method.heads"):
        lily.method_config({"name": "hydralora", "heads": 0})


def test_configs_load_as_their_methods():
    from omegaconf import OmegaConf
    for name in ALL:
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/method/{name}.yaml"))
        opts = lily.method_config(cfg)
        assert opts.name == name and "optim.lr" in cfg["search"] and "optim.weight_decay" in cfg["search"]


def test_peft_is_imported_lazily_and_named_when_missing(monkeypatch):
    code = ("import sys, lily; lily.adapt; import lily.methods; "
            "assert 'peft' not in sys.modules, 'lily imported peft'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "peft", None)      # import peft -> ImportError
    with pytest.raises(lily.LilyConfigError, match=r"pip install peft==0\.21\.2"):
        lily.adapt(tiny_vit(), {"name": "vera"})
