"""Lily and the baselines checked against mathematics on a tiny random-init timm ViT."""
import math

import pytest
import timm
import torch
from torch import nn

import lily
from lily import LilyAdapter, MergeError, MethodConfig

DEPTH, DIM = 5, 48


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=8,
                             embed_dim=DIM, depth=DEPTH, num_heads=3, **kw).eval()


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


METHODS = {
    "lily_qv_batch": dict(name="lily", targets=["q", "v"], rank=8, ne=3),
    "lily_kvffn_sample": dict(name="lily", targets=["k", "v", "ffn"], rank={"k": 4, "v": 4, "ffn": 8}, ne=2,
                              routing="sample"),
    "lily_qvffn_token": dict(name="lily", targets=["q", "v", "ffn"], rank=4, ne=4, routing="token", dropout=0.1),
    "lily_ffn_static": dict(name="lily", targets=["ffn"], rank=8, ne=3, routing="static"),
    "lily_ffn_uniform_stride": dict(name="lily", targets=["ffn"], rank=8, ne=3, routing="uniform", lp_stride=2),
    "lily_qv_default_init_bias": dict(name="lily", targets=["q", "v"], rank=8, ne=3, router_init="default",
                                      bias=True),
    "lily_generic_fc1": dict(name="lily", targets=["fc1"], rank=4, ne=2),
    "lora_qv": dict(name="lora", targets=["q", "v"], rank=4),
    "adaptformer": dict(name="adaptformer", targets=["ffn"], rank=8, scale=0.1),
    "full": dict(name="full"),
    "linear": dict(name="linear"),
}


def randomize_adapters(model, seed=3, std=0.2):
    """Give zero-initialised parts (HP experts, LoRA B, AdaptFormer up) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("experts" in n or "lora_b" in n or ".up." in n or "bank.bias" in n):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("method", METHODS)
def test_initial_outputs_equal_frozen_model(method):
    model, x = tiny_vit(), images()
    with torch.no_grad():
        y0 = model(x)
        lily.adapt(model, MethodConfig(**METHODS[method]))
        y1 = model(x)
    assert torch.equal(y0, y1)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("full",)])
def test_gradients_reach_adapters_and_head_only(method):
    model = tiny_vit()
    lily.adapt(model, MethodConfig(**METHODS[method]))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-4)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    seen = set()
    for _ in range(2):  # the second step also moves LPs and routers (HP experts start at zero)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        seen |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert seen == names, f"no gradient for {sorted(names - seen)}"
    assert names - {n for n in names if n.startswith("head.")} or method == "linear"
    assert all(n.startswith("head.") or ".adapters." in n for n in names)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_full_finetuning_trains_everything():
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert lily.count_parameters(model) == sum(p.numel() for n, p in model.named_parameters()
                                               if not n.startswith("head."))


@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_single_target_changes_only_its_third_of_qkv(target):
    model, x = tiny_vit(), images()
    lily.adapt(model, MethodConfig(name="lily", targets=[target], rank=4, ne=2))
    randomize_adapters(model)
    qkv, seen = model.blocks[2].attn.qkv, {}
    qkv.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    with torch.no_grad():
        model(x)
        frozen = nn.functional.linear(seen["x"], qkv.weight, qkv.bias)
        delta = qkv.adapters[target](seen["x"])
    i = "qkv".index(target)
    for j in range(3):
        part, ref = seen["y"][..., j * DIM:(j + 1) * DIM], frozen[..., j * DIM:(j + 1) * DIM]
        if i == j:
            assert delta.abs().sum() > 0
            torch.testing.assert_close(part, ref + delta)
        else:
            assert torch.equal(part, ref), (target, j)
    assert type(model.blocks[2].attn).forward is timm.layers.Attention.forward  # timm's attention kept


def test_ffn_adapter_sees_the_mlp_input_and_adds_to_its_output():
    model, x = tiny_vit(), images()
    lily.adapt(model, MethodConfig(name="lily", targets=["ffn"], rank=4, ne=2))
    randomize_adapters(model)
    blk = model.blocks[1]
    seen = {}
    blk.norm2.register_forward_hook(lambda m, a, o: seen.setdefault("norm2_out", o.detach()))
    blk.mlp.adapters["ffn"].register_forward_hook(lambda m, a, o: seen.update(ad_in=a[0].detach(), ad_out=o.detach()))
    blk.mlp.fc2.register_forward_hook(lambda m, a, o: seen.setdefault("fc2_out", o.detach()))
    blk.mlp.register_forward_hook(lambda m, a, o: seen.setdefault("mlp_out", o.detach()))
    with torch.no_grad():
        model(x)
    assert torch.equal(seen["ad_in"], seen["norm2_out"])
    torch.testing.assert_close(seen["mlp_out"], seen["fc2_out"] + seen["ad_out"])
    assert seen["ad_out"].abs().sum() > 0


def test_hp_bank_is_one_shared_parameter_and_lp_stride():
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q", "ffn"], rank=4, ne=3, lp_stride=2))
    ads = lily.lily_adapters(model)
    assert set(ads) == {"q", "ffn"} and all(len(v) == DEPTH for v in ads.values())
    for kind, layer_ads in ads.items():
        bank = layer_ads[0].bank.experts
        assert all(a.bank.experts is bank for a in layer_ads)
        assert len({id(a.lp) for a in layer_ads}) == math.ceil(DEPTH / 2)
        assert len({id(a.router) for a in layer_ads}) == DEPTH
        assert sum(p is bank for p in model.parameters()) == 1  # registered once in parameters()
    assert ads["q"][0].bank.experts is not ads["ffn"][0].bank.experts
    assert ads["q"][0].lp is ads["q"][1].lp and ads["q"][1].lp is not ads["q"][2].lp


def test_router_inits():
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q"], rank=16, ne=4, router_init="paper"))
    w = torch.cat([a.router.weight.flatten() for a in lily.lily_adapters(model)["q"]])
    assert abs(w.mean().item() - 1.0) < 0.01 and abs(w.std().item() - 0.01) < 0.003
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q"], rank=16, ne=4, router_init="default"))
    w = torch.cat([a.router.weight.flatten() for a in lily.lily_adapters(model)["q"]])
    assert abs(w.mean().item()) < 0.1 and w.abs().max() <= 1 / math.sqrt(16)


# ---- routing identities, checked on one adapter against the explicit formulas ----------
def make_adapter(routing, ne=3, d=5, din=6, dout=4, seed=0, bias=False):
    torch.manual_seed(seed)
    lp = nn.Linear(din, d, bias=bias)
    bank = lily.HPBank(ne, d, dout, bias=bias)
    nn.init.normal_(bank.experts)
    if bias:
        nn.init.normal_(bank.bias)
    router = lily.layers.make_router(d, ne, routing, "default")
    if routing == "static":
        nn.init.normal_(router.logits)
    return LilyAdapter(lp, bank, router, routing, scale=0.7)


def share(a, b):
    """Give adapter b the LP, experts and (if both have one) router of adapter a."""
    b.lp, b.bank = a.lp, a.bank
    if isinstance(a.router, nn.Linear) and isinstance(b.router, nn.Linear):
        b.router = a.router
    return b


def reference(adapter, x):
    """Mixture of expert outputs, one expert at a time (no combined HP)."""
    h = adapter.lp(x)
    E = adapter.bank.experts
    outs = torch.stack([h @ E[e] for e in range(E.shape[0])], dim=-2)  # (..., ne, out)
    if adapter.routing == "uniform":
        w = torch.full((E.shape[0],), 1 / E.shape[0])
    elif adapter.routing == "static":
        w = torch.softmax(adapter.router.logits, -1)
    else:
        p = torch.softmax(h @ adapter.router.weight.t(), -1)
        w = {"token": p, "sample": p.mean(1, keepdim=True), "batch": p.mean((0, 1))}[adapter.routing]
    return adapter.scale * (w[..., :, None] * outs).sum(-2)


@pytest.mark.parametrize("routing", lily.ROUTING_MODES)
def test_each_mode_equals_the_mixture_of_expert_outputs(routing):
    a, x = make_adapter(routing), torch.randn(4, 9, 6)
    torch.testing.assert_close(a(x), reference(a, x), rtol=1e-5, atol=1e-5)


def test_one_expert_all_modes_agree():
    x = torch.randn(4, 9, 6)
    base = make_adapter("batch", ne=1)
    outs = [share(base, make_adapter(m, ne=1))(x) for m in lily.ROUTING_MODES]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


def test_batch_equals_sample_at_batch_size_one():
    x = torch.randn(1, 9, 6)
    a = make_adapter("batch")
    torch.testing.assert_close(a(x), share(a, make_adapter("sample"))(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a(torch.randn(3, 9, 6))[:1], share(a, make_adapter("sample"))(torch.randn(3, 9, 6))[:1])


def test_sample_mode_is_batch_independent_and_batch_mode_is_not():
    x, others = torch.randn(1, 9, 6), torch.randn(5, 9, 6)
    for routing, independent in (("sample", True), ("token", True), ("batch", False)):
        a = make_adapter(routing)
        alone, together = a(x), a(torch.cat([x, others]))[:1]
        assert torch.allclose(alone, together, rtol=1e-6, atol=1e-6) == independent, routing


def test_token_equals_sample_when_tokens_are_identical():
    x = torch.randn(4, 1, 6).expand(4, 9, 6)
    a = make_adapter("token", bias=True)
    torch.testing.assert_close(a(x), share(a, make_adapter("sample", bias=True))(x), rtol=1e-5, atol=1e-6)


def test_uniform_is_the_mean_of_experts():
    a, x = make_adapter("uniform"), torch.randn(2, 9, 6)
    torch.testing.assert_close(a(x), a.scale * a.lp(x) @ a.bank.experts.mean(0), rtol=1e-6, atol=1e-6)
    assert a.router is None


def test_token_mode_never_builds_a_token_by_d_by_out_tensor():
    a = make_adapter("token", ne=3, d=5, din=6, dout=40)
    x = torch.randn(8, 30, 6, requires_grad=True)
    limit = 8 * 30 * 5 * 40
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        a(x).sum().backward()
    assert sizes and max(sizes) < limit / 5


# ---- parameter counts on the ViT-B/16 architecture (meta device: no weights) -------------
@pytest.mark.parametrize("cfg,expected", [
    (dict(name="lily", targets=["q", "v"], rank=32, ne=4), 789_504),
    (dict(name="lily", targets=["k", "v", "ffn"], rank={"k": 16, "v": 16, "ffn": 32}, ne=4), 789_504),
    (dict(name="lily", targets=["ffn"], rank=64, ne=4), 789_504),
    (dict(name="lora", targets=["q", "v"], rank=32), 1_179_648),
    (dict(name="lora", targets=["q", "v"], rank=8), 294_912),
    (dict(name="adaptformer", targets=["ffn"], rank=32), 589_824),
    (dict(name="linear"), 0),
])
def test_vit_b16_parameter_counts(cfg, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
        lily.adapt(model, MethodConfig(**cfg))
    assert lily.count_parameters(model) == expected
    assert lily.head_parameters(model) == 768 * 100 + 100


def test_count_formula_for_each_routing_mode():
    """params = sum_t [L*in*d + N_e*d*out + router], router: L*d*N_e | L*N_e | 0 | d*N_e (shared)."""
    L, d, ne = 12, 16, 6
    with torch.device("meta"):
        for routing, router in (("batch", L * d * ne), ("token", L * d * ne), ("static", L * ne), ("uniform", 0)):
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
            lily.adapt(model, MethodConfig(name="lily", targets=["q"], rank=d, ne=ne, routing=routing))
            assert lily.count_parameters(model) == L * 768 * d + ne * d * 768 + router, routing
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
        lily.adapt(model, MethodConfig(name="lily", targets=["q"], rank=d, ne=ne, shared_router=True, lp_stride=4))
        assert lily.count_parameters(model) == 3 * 768 * d + ne * d * 768 + d * ne


# ---- merge ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    dict(name="lily", targets=["q", "k", "v"], rank=4, ne=3, routing="static"),
    dict(name="lily", targets=["q", "v", "fc2"], rank=4, ne=3, routing="uniform", bias=True, lp_stride=2),
    dict(name="lora", targets=["q", "v", "fc1"], rank=4, bias=True),
])
def test_merge_gives_unmerged_outputs_and_unmerge_restores(cfg):
    model, x = tiny_vit(), images()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lily.adapt(model, MethodConfig(**cfg))
    randomize_adapters(model)
    with torch.no_grad():
        for a in [a for v in lily.lily_adapters(model).values() for a in v if a.routing == "static"]:
            nn.init.normal_(a.router.logits)
        y = model(x)
        lily.merge(model)
        assert not torch.allclose(model.blocks[0].attn.qkv.weight, original["blocks.0.attn.qkv.weight"])
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        lily.unmerge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in original:
            torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    dict(name="lily", targets=["q", "v"], rank=4, ne=3, routing="batch"),
    dict(name="lily", targets=["q", "v"], rank=4, ne=3, routing="token"),
    dict(name="lily", targets=["v", "ffn"], rank=4, ne=3, routing="static"),
    dict(name="adaptformer", targets=["ffn"], rank=4),
])
def test_data_dependent_or_nonlinear_adapters_refuse_to_merge(cfg):
    model = tiny_vit()
    lily.adapt(model, MethodConfig(**cfg))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match="cannot be merged"):
        lily.merge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- helpers -------------------------------------------------------------------------------
def test_save_load_trainable_roundtrip(tmp_path):
    cfg = MethodConfig(name="lily", targets=["k", "v", "ffn"], rank=4, ne=3, lp_stride=2)
    model, x = tiny_vit(), images()
    lily.adapt(model, cfg)
    randomize_adapters(model)
    with torch.no_grad():
        y = model(x)
    lily.save_trainable(model, tmp_path / "t.pt", extra={"epoch": 3})
    payload = lily.read_trainable(tmp_path / "t.pt")
    assert payload["extra"] == {"epoch": 3}
    n_stored = sum(t.numel() for t in payload["state"].values())
    assert n_stored == lily.count_parameters(model) + lily.head_parameters(model)
    fresh = tiny_vit()  # same frozen weights (same seed), not adapted: load adapts it
    lily.load_trainable(fresh, tmp_path / "t.pt")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    with pytest.raises(lily.LilyConfigError):
        lily.load_trainable(lily.adapt(tiny_vit(), MethodConfig(name="lora", targets=["q"], rank=2)), payload)


def test_expert_weights_per_layer():
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q", "ffn"], rank=4, ne=3,
                                   routing={"q": "sample", "ffn": "static"}))
    with torch.no_grad():
        model(images())
    w = lily.expert_weights(model)
    assert set(w) == {"q", "ffn"} and w["q"].shape == (DEPTH, 3) == w["ffn"].shape
    torch.testing.assert_close(w["q"].sum(1), torch.ones(DEPTH))
    torch.testing.assert_close(w["ffn"], torch.full((DEPTH, 3), 1 / 3), atol=0.02, rtol=0)


@pytest.mark.parametrize("cfg,msg", [
    (dict(name="lily", targets=["nonexistent"]), "matches nothing"),
    (dict(name="lily", targets=["q"], routing="softmax"), "routing"),
    (dict(name="lily", targets=["q"], rank={"v": 4}), "without an entry"),
    (dict(name="adaptformer", targets=["q"]), "targets must be"),
    (dict(name="lily", targets=["q"], head=["classifier"]), "no classification head"),
])
def test_config_errors_are_clear(cfg, msg):
    with pytest.raises(lily.LilyConfigError, match=msg):
        lily.adapt(tiny_vit(), MethodConfig(**cfg))


def test_unknown_config_key_rejected():
    with pytest.raises(lily.LilyConfigError, match="unknown method option"):
        MethodConfig.from_dict({"name": "lily", "rnak": 4})


# ---- LP sharing of the authors' ViT code: lp_stride="depth//ne" ---------------------------
def vit_b16_meta(cfg):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
        lily.adapt(model, MethodConfig(**cfg))
    return model


KVFFN = dict(name="lily", targets=["k", "v", "ffn"], rank={"k": 16, "v": 16, "ffn": 32})


@pytest.mark.parametrize("ne,stride", [(2, 6), (4, 3), (6, 2), (8, 1)])
def test_depth_over_ne_sharing_pattern_on_vit_b16(ne, stride):
    ads = lily.lily_adapters(vit_b16_meta(dict(KVFFN, ne=ne, lp_stride="depth//ne")))
    assert set(ads) == {"k", "v", "ffn"}
    for kind, layer_ads in ads.items():
        lps = [a.lp for a in layer_ads]
        assert len(lps) == 12 and len({id(lp) for lp in lps}) == 12 // stride
        for layer, lp in enumerate(lps):  # layer l uses the LP created at its block's first layer
            assert lp is lps[(layer // stride) * stride], (kind, layer)
            assert (lp is lps[layer - 1]) == (layer % stride != 0) or layer == 0
        assert len({id(a.router) for a in layer_ads}) == 12  # routers stay per layer


@pytest.mark.parametrize("ne,authors,paper", [(2, 198_144, 689_664), (4, 396_288, 789_504),
                                               (6, 594_432, 889_344), (8, 989_184, 989_184)])
def test_kvffn_counts_authors_vs_paper_lp_sharing(ne, authors, paper):
    assert lily.count_parameters(vit_b16_meta(dict(KVFFN, ne=ne, lp_stride="depth//ne"))) == authors
    assert lily.count_parameters(vit_b16_meta(dict(KVFFN, ne=ne, lp_stride=1))) == paper


def test_depth_over_ne_uses_each_kinds_own_ne_and_layer_count():
    model = tiny_vit()  # DEPTH = 5 layers
    lily.adapt(model, MethodConfig(name="lily", targets=["q", "v", "ffn"], rank=4, ne={"q": 2, "v": 8, "ffn": 5},
                                   lp_stride={"q": "depth//ne", "v": "depth//ne", "ffn": 0}))
    ads = lily.lily_adapters(model)
    q = [a.lp for a in ads["q"]]  # max(1, 5 // 2) = 2: layers {0,1} {2,3} {4}
    assert q[0] is q[1] and q[2] is q[3] and len({id(lp) for lp in q}) == 3
    assert len({id(a.lp) for a in ads["v"]}) == DEPTH  # max(1, 5 // 8) = 1: one LP per layer
    assert len({id(a.lp) for a in ads["ffn"]}) == 1   # 0: one LP for all layers
    for bad in ("depth/ne", "depth", -1, 1.5, True):
        with pytest.raises(lily.LilyConfigError, match="lp_stride"):
            MethodConfig(name="lily", targets=["q"], lp_stride=bad)
        with pytest.raises(lily.LilyConfigError, match="lp_stride"):
            MethodConfig(name="lily", targets=["q"], lp_stride={"q": bad})


LILY_VIT_CONFIGS = ("lily_qv", "lily_qvffn", "lily_kvffn", "lily_ffn", "lily_kvffn_monoscale", "lily_ffn_monoscale")


def method_yaml(name, recipe, **overrides):
    """configs/method/<name>.yaml resolved against configs/recipe/<recipe>.yaml (as Hydra composes them)."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"method": OmegaConf.load(f"configs/method/{name}.yaml"),
                            "recipe": OmegaConf.load(f"configs/recipe/{recipe}.yaml")})
    for k, v in overrides.items():
        cfg.method[k] = v
    # the method's options, without the config's meta keys (search space, description), as lily.method_config reads it
    from lily.registry import META_KEYS
    return {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in META_KEYS}


@pytest.mark.parametrize("name", LILY_VIT_CONFIGS)
def test_lily_vit_method_configs_follow_the_recipe(name):
    authors, paper = method_yaml(name, "authors"), method_yaml(name, "paper")
    assert (authors["lp_stride"], authors["router_init"]) == ("depth//ne", "default")
    assert (paper["lp_stride"], paper["router_init"]) == (1, "paper")


@pytest.mark.parametrize("name,ne,authors,paper", [
    ("lily_kvffn", 2, 198_144, 689_664), ("lily_kvffn", 4, 396_288, 789_504),
    ("lily_kvffn", 6, 594_432, 889_344), ("lily_kvffn", 8, 989_184, 989_184),
    ("lily_qv", 4, 4 * 768 * 32 * 2 + 4 * 32 * 768 * 2 + 12 * 32 * 4 * 2, 789_504),
    ("lily_ffn", 4, 4 * 768 * 64 + 4 * 64 * 768 + 12 * 64 * 4, 789_504),
])
def test_method_config_counts_per_recipe(name, ne, authors, paper):
    for recipe, expected in (("authors", authors), ("paper", paper)):
        assert lily.count_parameters(vit_b16_meta(method_yaml(name, recipe, ne=ne))) == expected, recipe


def test_baseline_configs_use_dropout_0_1():
    from omegaconf import OmegaConf
    for name in ("lora", "adaptformer"):
        assert OmegaConf.load(f"configs/method/{name}.yaml").dropout == 0.1


# ---- baselines as the Lily authors' code wrote them -----------------------------------------
def test_lora_dropout_acts_after_the_down_projection():
    a = lily.LoRAAdapter(6, 4, rank=3, scale=0.7, dropout=0.5).train()
    nn.init.normal_(a.lora_b.weight)
    x = torch.randn(2, 9, 6)
    torch.manual_seed(5)
    y = a(x)
    torch.manual_seed(5)
    ref = 0.7 * a.lora_b(nn.functional.dropout(a.lora_a(x), 0.5, training=True))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.manual_seed(5)
    assert not torch.allclose(y, 0.7 * a.lora_b(a.lora_a(nn.functional.dropout(x, 0.5, training=True))))
    a.eval()  # eval: no dropout, and the merged weight gives the same map
    dw, _ = a.delta_weight()
    torch.testing.assert_close(a(x), x @ dw.t(), rtol=1e-5, atol=1e-6)


def test_bottleneck_applies_relu_then_dropout():
    a = lily.BottleneckAdapter(6, 4, rank=3, scale=0.1, dropout=0.5).train()
    nn.init.normal_(a.up.weight)
    x = torch.randn(2, 9, 6)
    torch.manual_seed(5)
    y = a(x)
    torch.manual_seed(5)
    ref = 0.1 * a.up(nn.functional.dropout(torch.relu(a.down(x)), 0.5, training=True))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def adaptformer_block(seed=0, **kw):
    model = tiny_vit(seed, **kw)
    lily.adapt(model, MethodConfig(name="adaptformer", targets=["ffn"], rank=8, scale=0.1))
    randomize_adapters(model)
    return model


def record_block(blk):
    seen = {}
    blk.register_forward_pre_hook(lambda m, a: seen.update(block_in=a[0].detach()))
    blk.norm2.register_forward_pre_hook(lambda m, a: seen.update(norm2_in=a[0].detach()))
    blk.mlp.register_forward_hook(lambda m, a, o: seen.update(mlp_out=o.detach()))
    blk.adapters["ffn"].register_forward_hook(lambda m, a, o: seen.update(ad_in=a[0].detach(), ad_out=o.detach()))
    blk.register_forward_hook(lambda m, a, o: seen.update(block_out=o.detach()))
    return seen


def test_adaptformer_reads_the_residual_stream_before_norm2_and_adds_outside_layer_scale():
    model, x = adaptformer_block(init_values=0.3), images()  # layer scale gamma = 0.3
    blk = model.blocks[2]
    assert not hasattr(blk.mlp, "adapters") and set(blk.adapters) == {"ffn"}
    seen = record_block(blk)
    with torch.no_grad():
        model(x)
        ad = blk.adapters["ffn"]
        expected_ad = 0.1 * ad.up(torch.relu(ad.down(seen["norm2_in"])))
    assert torch.equal(seen["ad_in"], seen["norm2_in"])  # exactly norm2's input, not its output
    assert not torch.allclose(seen["ad_in"], blk.norm2(seen["norm2_in"]))
    torch.testing.assert_close(seen["ad_out"], expected_ad)
    assert seen["ad_out"].abs().sum() > 0
    # y = x_mid + ls2(mlp(norm2(x_mid))) + adapter(x_mid): the adapter is not scaled by gamma
    torch.testing.assert_close(seen["block_out"], seen["norm2_in"] + 0.3 * seen["mlp_out"] + seen["ad_out"])


@pytest.mark.parametrize("drop_prob", [1.0, 0.5])
def test_adaptformer_output_is_outside_drop_path(drop_prob):
    model, x = adaptformer_block(drop_path_rate=0.1), images(8)
    blk = model.blocks[3]
    blk.drop_path2.drop_prob = drop_prob
    model.train()
    seen = record_block(blk)
    with torch.no_grad():
        model(x)
    frozen_branch = seen["block_out"] - seen["norm2_in"] - seen["ad_out"]  # drop_path2(mlp(...)) only
    kept = torch.zeros(len(x), dtype=torch.bool)
    for i in range(len(x)):  # per sample: the MLP branch is dropped (0) or scaled by 1/keep; the adapter never
        if frozen_branch[i].abs().max() < 1e-5:
            continue
        torch.testing.assert_close(frozen_branch[i], seen["mlp_out"][i] / (1 - drop_prob), rtol=1e-4, atol=1e-5)
        kept[i] = True
    if drop_prob == 1.0:
        assert not kept.any()
        torch.testing.assert_close(seen["block_out"], seen["norm2_in"] + seen["ad_out"], rtol=0, atol=1e-6)
    else:
        assert kept.any() and not kept.all()  # seed-dependent but deterministic (tiny_vit seeds the RNG)
    assert seen["ad_out"].abs().sum() > 0


def test_adaptformer_parameter_count_and_no_norm2_error():
    model = vit_b16_meta(dict(name="adaptformer", targets=["ffn"], rank=32))
    assert lily.count_parameters(model) == 589_824
    assert set(lily.adapters(model)) == {"ffn"} and len(lily.adapters(model)["ffn"]) == 12
    block = nn.Module()
    with pytest.raises(lily.LilyConfigError, match="norm2"):
        lily.add_residual_adapter(block, "ffn", lily.BottleneckAdapter(4, 4, 2))
