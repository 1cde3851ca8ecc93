"""The method registry: options by name, unknown names/keys named, merge refusals change nothing,
unmerge restores the frozen weights bit for bit."""
import pytest
import timm
import torch
from torch import nn

import lily
from lily.methods.lora import LoRAOptions


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2, img_size=32,
                             patch_size=8, embed_dim=32, num_heads=2)


class Mixer(nn.Module):
    """A Mamba-like layer whose in_proj has no bias (as Vim's)."""

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(8, 16, bias=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.in_proj(x))


def test_method_config_builds_the_named_methods_options():
    opts = lily.MethodConfig(name="lora", targets=["q"], rank=4)
    assert isinstance(opts, LoRAOptions) and isinstance(opts, lily.MethodConfig) and opts.rank == 4
    assert isinstance(lily.MethodConfig(targets=["q"]), lily.LilyOptions)   # default name: lily
    assert lily.method_config({"name": "linear", "description": "free text"}).name == "linear"


def test_unknown_method_and_unknown_option_are_named():
    with pytest.raises(lily.LilyConfigError, match="'nope'.*registered methods"):
        lily.method_config({"name": "nope"})
    with pytest.raises(lily.LilyConfigError, match=r"\['ne'\].*'lora'"):
        lily.method_config({"name": "lora", "targets": ["q"], "ne": 4})   # a Lily option is not LoRA's


def test_every_registered_method_round_trips_its_default_options():
    for name, method in lily.registered().items():
        opts = lily.method_config({"name": name})
        assert method.name == name and isinstance(opts, method.options) and opts.name == name
        assert lily.method_config(opts.to_dict()).to_dict() == opts.to_dict()
        assert method.mergeable is True or (isinstance(method.mergeable, str) and method.mergeable), name


def test_refused_merge_changes_nothing_bias_into_linear_without_bias():
    """Issue 14 fault 1: a Lily with projector biases on a Linear without bias must refuse before
    any weight changes (it used to add the weight delta, then raise)."""
    model = Mixer()
    lily.adapt(model, lily.MethodConfig(name="lily", targets=["in_proj"], rank=2, ne=1, routing="uniform",
                                        bias=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bank" in n or "lp" in n:
                p.normal_()
    x = torch.randn(3, 8)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    y0 = model(x)
    with pytest.raises(lily.MergeError, match="without bias"):
        lily.merge(model)
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not model.in_proj.merged and torch.equal(model(x), y0)


def test_refused_merge_of_data_dependent_lily_changes_nothing():
    model = tiny_vit()
    lily.adapt(model, lily.MethodConfig(name="lily", targets=["q", "v"], rank=4, ne=2))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(lily.MergeError, match="data-dependent"):
        lily.merge(model)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize("cfg", [dict(name="lora", targets=["q", "v", "fc2"], rank=3, scale=0.5),
                                 dict(name="lily", targets=["k", "v"], rank=3, ne=2, routing="static"),
                                 dict(name="lily", targets=["proj"], rank=3, ne=2, routing="uniform", bias=True)])
def test_merge_equals_unmerged_and_unmerge_is_bit_exact(cfg):
    model = tiny_vit().eval()
    lily.adapt(model, lily.MethodConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x)
        lily.merge(model)
        changed = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, frozen[n])]
        assert changed, "merge must change the frozen weights"
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        lily.unmerge(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        assert torch.equal(model(x), y)
