"""Lily and the paper's Mamba baselines on Vision Mamba (small random Vim + Vim-S counts)."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import lily
from lily import MethodConfig
from models.vim import vim_small
from tests.test_lily import randomize_adapters

CONFIGS = {n: OmegaConf.to_container(OmegaConf.load(f"configs/method/{n}.yaml"))
           for n in ("lily_vim", "deltafit", "deltainfit", "lily0_vim", "linear", "full")}
CONFIGS["deltafit8"] = dict(CONFIGS["deltafit"], rank=8)


def small_vim(seed=0, **kw):
    torch.manual_seed(seed)
    return vim_small(num_classes=5, img_size=32, depth=3, embed_dim=32, kernels="pytorch", **kw).eval()


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_zero_initialised_adapters_leave_vim_unchanged(name):
    model, x = small_vim(), images()
    with torch.no_grad():
        y0 = model(x)
        lily.adapt(model, MethodConfig.from_dict(CONFIGS[name]))
        assert torch.equal(model(x), y0)


@pytest.mark.parametrize("name", ["lily_vim", "deltafit", "deltainfit", "lily0_vim"])
def test_gradients_reach_adapters_and_head_only(name):
    model = small_vim(drop_path_rate=0.1)
    lily.adapt(model, MethodConfig.from_dict(CONFIGS[name]))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = set()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
        seen |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert seen == trainable and all(n.startswith("head.") or ".adapters." in n for n in trainable)
    assert any(".dt_proj.adapters." in n for n in trainable) and any(".dt_proj_b.adapters." in n for n in trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_delta_adapter_is_added_before_bias_and_softplus():
    """A linear delta adapter (N_e=1) equals a plain Vim whose dt weights are W + dW (same bias)."""
    model, x = small_vim(), images()
    lily.adapt(model, MethodConfig(name="lily", targets=["delta"], rank=2, ne=1, routing="uniform"))
    randomize_adapters(model, std=2.0)
    reference = small_vim()  # the same frozen weights
    with torch.no_grad():
        y = model(x)
        for m, r in zip(model.layers, reference.layers):
            for attr in ("dt_proj", "dt_proj_b"):
                dw, db = getattr(m.mixer, attr).adapters["delta_" + attr[-1].replace("j", "f")].delta_weight()
                assert db is None
                getattr(r.mixer, attr).weight += dw
        assert (y - small_vim()(x)).abs().max() > 1e-4  # the adapter changes the output (10x the tolerance below)
        torch.testing.assert_close(reference(x), y, rtol=1e-4, atol=1e-5)


def test_in_proj_token_routing_with_model_shared_router():
    model = small_vim()
    lily.adapt(model, MethodConfig.from_dict(CONFIGS["lily_vim"]))
    ads = lily.lily_adapters(model)
    assert set(ads) == {"in_proj", "delta_f", "delta_b"}
    inp = ads["in_proj"]
    assert all(a.routing == "token" and a.router is None and a.bank is inp[0].bank for a in inp)
    assert isinstance(inp[0].bank.router, nn.Linear) and isinstance(inp[0].dropout, nn.Dropout)
    assert inp[0].dropout.p == 0.1
    assert ads["delta_f"][0].bank is not ads["delta_b"][0].bank and ads["delta_f"][0].bank.ne == 1


def vim_s_count(cfg):
    with torch.device("meta"):
        model = vim_small(num_classes=100)
        lily.adapt(model, MethodConfig.from_dict(cfg))
    return lily.count_parameters(model)


def test_vim_s_parameter_counts():
    L, D, d_in, dt_rank, d_inner = 24, 384, 1536, 24, 768
    assert vim_s_count(CONFIGS["lily_vim"]) == 145_960
    # DeltaFit_m: delta per-layer LP (bias) + one shared HP (bias) per direction; in_proj one shared LP/HP pair
    for name, m in (("deltafit", 4), ("deltafit8", 8)):
        delta = 2 * (L * (dt_rank * m + m) + (m * d_inner + d_inner))
        inproj = (D * m + m) + (m * d_in + d_in)
        assert vim_s_count(CONFIGS[name]) == delta + inproj, name
    delta = 2 * (L * (dt_rank * 4 + 4) + (4 * d_inner + d_inner))
    assert vim_s_count(CONFIGS["deltainfit"]) == delta + L * (D * 1 + 1) + (1 * d_in + d_in)
    assert vim_s_count(CONFIGS["lily0_vim"]) == L * (D * 4 + 4 * d_in) + 2 * L * (dt_rank * 4 + 4 * d_inner)
    assert vim_s_count(CONFIGS["linear"]) == 0
