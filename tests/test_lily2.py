"""Lily v2 (the PEFT feature request): a model-wide LP bank mixed per layer by an LP router."""
import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

import lily
from lily import LilyAdapter, LPBank, LPMixture, MergeError, MethodConfig
from tests.test_lily import DEPTH, images, method_yaml, randomize_adapters, tiny_vit

V2 = {
    "qv_batch": dict(name="lily", targets=["q", "v"], rank=8, ne=3, lp_experts=2),
    "kvffn_sample": dict(name="lily", targets=["k", "v", "ffn"], rank={"k": 4, "v": 4, "ffn": 8}, ne=2,
                         lp_experts={"k": 3, "v": 2, "ffn": 4}, routing="sample"),
    "qvffn_token": dict(name="lily", targets=["q", "v", "ffn"], rank=4, ne=4, lp_experts=3, routing="token",
                        dropout=0.1),
    "qkv_static": dict(name="lily", targets=["q", "k", "v"], rank=4, ne=3, lp_experts=4, routing="static"),
    "ffn_uniform": dict(name="lily", targets=["ffn"], rank=8, ne=3, lp_experts=2, routing="uniform"),
    "qv_paper_init_bias": dict(name="lily", targets=["q", "v"], rank=8, ne=3, lp_experts=3, router_init="paper",
                               bias=True),
    "qv_shared_router": dict(name="lily", targets=["q", "v"], rank=4, ne=3, lp_experts=2, shared_router=True),
}


def randomize_v2(model, seed=4, std=0.2):
    """Random HP experts (zero-initialised) and random static logits of both routers."""
    randomize_adapters(model, seed=seed, std=std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".logits"):
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", V2)
def test_initial_outputs_equal_frozen_model(method):
    model, x = tiny_vit(), images()
    with torch.no_grad():
        y0 = model(x)
        lily.adapt(model, MethodConfig(**V2[method]))
        assert any(isinstance(a.lp, LPMixture) for v in lily.lily_adapters(model).values() for a in v)
        y1 = model(x)
    assert torch.equal(y0, y1)


def test_structure_banks_shared_routers_per_layer():
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q", "ffn"], rank={"q": 4, "ffn": 8}, ne=3,
                                   lp_experts={"q": 2, "ffn": 5}))
    ads = lily.lily_adapters(model)
    for kind, na, d in (("q", 2, 4), ("ffn", 5, 8)):
        lp_bank = ads[kind][0].lp.bank
        assert isinstance(lp_bank, LPBank) and lp_bank.experts.shape == (na, 48, d)
        assert all(a.lp.bank is lp_bank and a.bank is ads[kind][0].bank for a in ads[kind])
        assert len({id(a.lp) for a in ads[kind]}) == DEPTH          # one mixture (and LP router) per layer
        assert all(a.lp.router.weight.shape == (na, 48) and a.lp.router.bias is None for a in ads[kind])
        assert sum(p is lp_bank.experts for p in model.parameters()) == 1
    assert ads["q"][0].lp.bank is not ads["ffn"][0].lp.bank


# ---- N_a = 1 is Lily with one LP shared by every layer --------------------------------------
@pytest.mark.parametrize("routing", lily.ROUTING_MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_one_lp_expert_equals_lily_with_one_shared_lp(routing, bias):
    common = dict(name="lily", targets=["q", "v", "ffn"], rank=4, ne=3, routing=routing, bias=bias)
    v1, v2, x = tiny_vit(), tiny_vit(), images()
    lily.adapt(v1, MethodConfig(**common, lp_stride=0))
    lily.adapt(v2, MethodConfig(**common, lp_experts=1))
    randomize_v2(v2)
    a1, a2 = lily.lily_adapters(v1), lily.lily_adapters(v2)
    with torch.no_grad():
        for kind in a1:
            assert len({id(a.lp) for a in a1[kind]}) == 1
            a1[kind][0].lp.weight.copy_(a2[kind][0].lp.bank.experts[0].t())
            if bias:
                a1[kind][0].lp.bias.copy_(a2[kind][0].lp.bank.bias[0])
                a1[kind][0].bank.bias.copy_(a2[kind][0].bank.bias)
            a1[kind][0].bank.experts.copy_(a2[kind][0].bank.experts)
            for b1, b2 in zip(a1[kind], a2[kind]):
                if b1.router is not None:
                    for p1, p2 in zip(b1.router.parameters(), b2.router.parameters()):
                        p1.copy_(p2)
        y1, y2 = v1(x), v2(x)
    assert not torch.allclose(y2, tiny_vit()(x))  # the adapters do something
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)


# ---- the LP router's routing identities, on one LP mixture ---------------------------------
def make_mixture(routing, na=3, din=6, d=5, seed=0, bias=False):
    torch.manual_seed(seed)
    bank = LPBank(na, din, d, bias=bias)
    router = lily.layers.make_router(din, na, routing, "default")
    if routing == "static":
        nn.init.normal_(router.logits)
    return LPMixture(bank, router, routing)


def share_lp(a, b):
    b.bank = a.bank
    if isinstance(a.router, nn.Linear) and isinstance(b.router, nn.Linear):
        b.router = a.router
    return b


def reference_lp(m, x):
    """Weighted sum of each LP expert's output, one expert at a time (no combined LP)."""
    A, na = m.bank.experts, m.bank.na
    outs = torch.stack([x @ A[i] + (0 if m.bank.bias is None else m.bank.bias[i]) for i in range(na)], dim=-2)
    if m.routing == "uniform":
        w = torch.full((na,), 1 / na)
    elif m.routing == "static":
        w = torch.softmax(m.router.logits, -1)
    else:
        p = torch.softmax(x @ m.router.weight.t(), -1)
        w = {"token": p, "sample": p.mean(1, keepdim=True), "batch": p.mean((0, 1))}[m.routing]
    return (w[..., :, None] * outs).sum(-2)


@pytest.mark.parametrize("routing", lily.ROUTING_MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_lp_mixture_equals_the_mixture_of_lp_expert_outputs(routing, bias):
    m, x = make_mixture(routing, bias=bias), torch.randn(4, 9, 6)
    torch.testing.assert_close(m(x), reference_lp(m, x), rtol=1e-5, atol=1e-5)


def test_lp_batch_equals_sample_at_batch_size_one():
    x, xs = torch.randn(1, 9, 6), torch.randn(3, 9, 6)
    m = make_mixture("batch")
    torch.testing.assert_close(m(x), share_lp(m, make_mixture("sample"))(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(m(xs)[:1], share_lp(m, make_mixture("sample"))(xs)[:1])


def test_lp_sample_mode_is_batch_independent_and_batch_mode_is_not():
    x, others = torch.randn(1, 9, 6), torch.randn(5, 9, 6)
    for routing, independent in (("sample", True), ("token", True), ("batch", False)):
        m = make_mixture(routing)
        alone, together = m(x), m(torch.cat([x, others]))[:1]
        assert torch.allclose(alone, together, rtol=1e-6, atol=1e-6) == independent, routing


def test_lp_token_equals_sample_when_tokens_are_identical():
    x = torch.randn(4, 1, 6).expand(4, 9, 6)
    m = make_mixture("token", bias=True)
    torch.testing.assert_close(m(x), share_lp(m, make_mixture("sample", bias=True))(x), rtol=1e-5, atol=1e-6)


def test_lp_uniform_is_the_mean_of_the_lp_experts_outputs():
    m, x = make_mixture("uniform"), torch.randn(2, 9, 6)
    outs = torch.stack([x @ m.bank.experts[i] for i in range(m.bank.na)])
    torch.testing.assert_close(m(x), outs.mean(0), rtol=1e-6, atol=1e-6)
    assert m.router is None


def v2_adapter(routing, na=3, ne=2, din=6, d=5, dout=4, seed=0):
    torch.manual_seed(seed)
    bank = lily.HPBank(ne, d, dout)
    nn.init.normal_(bank.experts)
    hp_router = lily.layers.make_router(d, ne, routing, "default")
    a = LilyAdapter(make_mixture(routing, na=na, din=din, d=d, seed=seed + 1), bank, hp_router, routing, scale=0.7)
    for r in (a.router, a.lp.router):
        if routing == "static":
            nn.init.normal_(r.logits)
    return a


@pytest.mark.parametrize("routing", lily.ROUTING_MODES)
def test_v2_adapter_is_lily_after_the_lp_mixture(routing):
    """delta(x) = s * h @ sum_e w_e E_e with h = LP mixture of x and w from the HP router on h."""
    a, x = v2_adapter(routing), torch.randn(4, 9, 6)
    h = reference_lp(a.lp, x)
    E = a.bank.experts
    outs = torch.stack([h @ E[e] for e in range(E.shape[0])], dim=-2)
    if routing == "uniform":
        w = torch.full((E.shape[0],), 1 / E.shape[0])
    elif routing == "static":
        w = torch.softmax(a.router.logits, -1)
    else:
        p = torch.softmax(h @ a.router.weight.t(), -1)
        w = {"token": p, "sample": p.mean(1, keepdim=True), "batch": p.mean((0, 1))}[routing]
    torch.testing.assert_close(a(x), 0.7 * (w[..., :, None] * outs).sum(-2), rtol=1e-5, atol=1e-5)


def test_token_mode_never_builds_a_token_by_in_by_d_tensor():
    B, T, din, d, na = 8, 30, 40, 8, 3
    a = v2_adapter("token", na=na, ne=3, din=din, d=d, dout=40)
    x = torch.randn(B, T, din, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        a(x).sum().backward()
    assert sizes and max(sizes) <= B * T * din < B * T * din * d  # nothing larger than the input itself
    assert a.lp.bank.experts.grad is not None and a.lp.router.weight.grad is not None


# ---- training: gradients reach both banks, both routers and the head ------------------------
@pytest.mark.parametrize("method", V2)
def test_gradients_reach_both_banks_both_routers_and_head_only(method):
    model = tiny_vit(drop_path_rate=0.1)
    lily.adapt(model, MethodConfig(**V2[method]))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    seen = set()
    for _ in range(2):  # HP experts start at zero: LPs and routers move from the second step on
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        seen |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert seen == names, f"no gradient for {sorted(names - seen)}"
    assert all(n.startswith("head.") or ".adapters." in n for n in names)
    kinds = {"lp.bank.experts", "bank.experts", "head.weight"}
    if V2[method].get("routing", "batch") != "uniform":
        kinds |= {"lp.router", "router"} if not V2[method].get("shared_router") else {"lp.bank.router", "bank.router"}
    assert all(any(k in n for n in names) for k in kinds), kinds
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---- parameter counts -------------------------------------------------------------------------
def vit_b16_meta(cfg):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
        lily.adapt(model, cfg if isinstance(cfg, MethodConfig) else MethodConfig(**cfg))
    return model


def v2_count(ranks, na, ne, L=12, width=768, routing="batch"):
    """sum_t N_a*in*d + L*in*N_a + N_e*d*out + L*d*N_e (static: L*N_a + L*N_e; uniform: no router)."""
    total = 0
    for d in ranks:
        total += na * width * d + ne * d * width
        total += {"static": L * (na + ne), "uniform": 0}.get(routing, L * width * na + L * d * ne)
    return total


def test_lily2_kvffn_count_on_vit_b16_is_506880():
    cfg = dict(name="lily", targets=["k", "v", "ffn"], rank={"k": 16, "v": 16, "ffn": 32}, ne=4, lp_experts=4)
    assert lily.count_parameters(vit_b16_meta(cfg)) == 506_880 == v2_count([16, 16, 32], 4, 4)


@pytest.mark.parametrize("routing", lily.ROUTING_MODES)
def test_count_formula_per_routing_mode(routing):
    cfg = dict(name="lily", targets=["q", "ffn"], rank={"q": 8, "ffn": 24}, ne=3, lp_experts=5, routing=routing)
    assert lily.count_parameters(vit_b16_meta(cfg)) == v2_count([8, 24], 5, 3, routing=routing)
    shared = dict(cfg, routing="batch", shared_router=True)  # one LP router and one HP router per kind
    assert lily.count_parameters(vit_b16_meta(shared)) == sum(5 * 768 * d + 3 * d * 768 + 768 * 5 + d * 3
                                                              for d in (8, 24))


@pytest.mark.parametrize("ne", [2, 4, 6, 8])
def test_lily2_method_configs_count_and_follow_ne(ne):
    for name, ranks in (("lily2_qv", [32, 32]), ("lily2_qvffn", [16, 16, 32]), ("lily2_kvffn", [16, 16, 32]),
                        ("lily2_ffn", [64])):
        for recipe in ("authors", "paper"):
            cfg = method_yaml(name, recipe, ne=ne)
            assert cfg["lp_experts"] == ne and "lp_stride" not in cfg
            assert cfg["router_init"] == {"authors": "default", "paper": "paper"}[recipe]
            assert lily.count_parameters(vit_b16_meta(cfg)) == v2_count(ranks, ne, ne), (name, recipe)
    decoupled = method_yaml("lily2_kvffn", "authors", ne=ne, lp_experts=2)  # method.lp_experts=2
    assert lily.count_parameters(vit_b16_meta(decoupled)) == v2_count([16, 16, 32], 2, ne)


def test_router_inits_of_the_lp_router():
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q"], rank=4, ne=3, lp_experts=4, router_init="paper"))
    w = torch.cat([a.lp.router.weight.flatten() for a in lily.lily_adapters(model)["q"]])
    assert abs(w.mean().item() - 1.0) < 0.01 and abs(w.std().item() - 0.01) < 0.003
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q"], rank=4, ne=3, lp_experts=4, routing="static",
                                   router_init="paper"))
    for a in lily.lily_adapters(model)["q"]:  # static LP logits init like the HP static router's
        assert isinstance(a.lp.router, lily.StaticRouter) and a.lp.router.logits.shape == (4,)
        assert (a.lp.router.logits - 1).abs().max() < 0.06 and (a.router.logits - 1).abs().max() < 0.06
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q"], rank=4, ne=3, lp_experts=4, routing="static",
                                   router_init="default"))
    assert all(torch.equal(a.lp.router.logits, torch.zeros(4)) for a in lily.lily_adapters(model)["q"])


# ---- merge --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    dict(name="lily", targets=["q", "k", "v"], rank=4, ne=3, lp_experts=4, routing="static"),
    dict(name="lily", targets=["q", "v", "fc2"], rank=4, ne=3, lp_experts=2, routing="uniform", bias=True),
    dict(name="lily", targets=["v", "fc1"], rank=4, ne=2, lp_experts=3, routing="static", bias=True),
])
def test_merged_v2_gives_unmerged_outputs_and_unmerge_restores(cfg):
    model, x = tiny_vit(), images()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lily.adapt(model, MethodConfig(**cfg))
    randomize_v2(model)
    with torch.no_grad():
        y = model(x)
        assert not torch.allclose(y, tiny_vit()(x))
        lily.merge(model)
        assert not torch.allclose(model.blocks[0].attn.qkv.weight, original["blocks.0.attn.qkv.weight"])
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        lily.unmerge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in original:
            torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("routing", ["batch", "sample", "token"])
def test_data_dependent_v2_refuses_to_merge(routing):
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q", "v"], rank=4, ne=3, lp_experts=2, routing=routing))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match="cannot be merged"):
        lily.merge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    m = lily.lily_adapters(model)["q"][0].lp
    with pytest.raises(MergeError, match="LP router.*cannot be merged"):
        m.combined()


# ---- expert weights, save/load, config errors ---------------------------------------------------
def test_expert_weights_include_the_lp_routers():
    model = tiny_vit()
    lily.adapt(model, MethodConfig(name="lily", targets=["q", "ffn"], rank=4, ne=3, lp_experts={"q": 2, "ffn": 5},
                                   routing={"q": "sample", "ffn": "static"}))
    w = lily.expert_weights(model)
    assert set(w) == {"q", "q.lp", "ffn", "ffn.lp"}
    assert torch.isnan(w["q.lp"]).all()  # data-dependent: nothing before the first forward
    with torch.no_grad():
        model(images())
    w = lily.expert_weights(model)
    assert w["q"].shape == (DEPTH, 3) and w["q.lp"].shape == (DEPTH, 2) and w["ffn.lp"].shape == (DEPTH, 5)
    for k in w:
        torch.testing.assert_close(w[k].sum(1), torch.ones(DEPTH))
    ads = lily.lily_adapters(model)
    torch.testing.assert_close(w["ffn.lp"][1], torch.softmax(ads["ffn"][1].lp.router.logits, -1))
    v1 = tiny_vit()
    lily.adapt(v1, MethodConfig(name="lily", targets=["q"], rank=4, ne=3))
    assert set(lily.expert_weights(v1)) == {"q"}  # Lily v1 unchanged


def test_save_load_trainable_roundtrip(tmp_path):
    cfg = MethodConfig(name="lily", targets=["k", "v", "ffn"], rank=4, ne=3, lp_experts=2, routing="token")
    model, x = tiny_vit(), images()
    lily.adapt(model, cfg)
    randomize_v2(model)
    with torch.no_grad():
        y = model(x)
    lily.save_trainable(model, tmp_path / "t.pt")
    payload = lily.read_trainable(tmp_path / "t.pt")
    assert payload["method"]["lp_experts"] == 2
    assert sum(t.numel() for t in payload["state"].values()) == lily.count_parameters(model) + lily.head_parameters(model)
    fresh = tiny_vit()
    lily.load_trainable(fresh, tmp_path / "t.pt")
    assert isinstance(lily.lily_adapters(fresh)["k"][0].lp, LPMixture)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


@pytest.mark.parametrize("cfg,msg", [
    (dict(name="lily", targets=["q"], lp_experts=-1), "lp_experts"),
    (dict(name="lily", targets=["q"], lp_experts=1.5), "lp_experts"),
    (dict(name="lily", targets=["q"], lp_experts={"v": 2}), "without an entry"),
    (dict(name="lily", targets=["q"], lp_experts=2, lp_stride="depth//ne"), "lp_stride"),
    (dict(name="lily", targets=["q"], lp_experts=2, lp_stride=0), "lp_stride"),
])
def test_config_errors_are_clear(cfg, msg):
    with pytest.raises(lily.LilyConfigError, match=msg):
        lily.adapt(tiny_vit(), MethodConfig(**cfg))


def test_lp_experts_from_a_hydra_style_mapping():
    cfg = OmegaConf.create({"method": OmegaConf.load("configs/method/lily2_qv.yaml"),
                            "recipe": OmegaConf.load("configs/recipe/authors.yaml")})
    cfg.method.ne = 6
    assert MethodConfig.from_dict(OmegaConf.to_container(cfg.method, resolve=True)).lp_experts == 6
    cfg.method.lp_experts = 3
    assert MethodConfig.from_dict(OmegaConf.to_container(cfg.method, resolve=True)).lp_experts == 3
