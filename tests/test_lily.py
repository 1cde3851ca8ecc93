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
