"""MambaPEFT's LoRA family, DoRA, partial tuning (A, D, conv1d, bias), cls/pos tuning and the
compose method on Vision Mamba (spec: ../shared/spec/baselines-vim.md sections 1-3.4, 3.9, 5).

Every forward is compared with the plain Vim whose frozen tensors were changed by the method's
equation written out here (W + s W_up W_down on the right rows and branch, DoRA's column-normed
weight, A_log + dA, ...), on a small random Vim. Identity at init holds for all of these methods
(DoRA with the released backward-magnitude defect excepted: checked to differ).
"""
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import lily
from lily.registry import Method, MethodOptions, register
from models.vim import vim_small
from tests.helpers import count_params_script

ROOT = Path(__file__).resolve().parents[1]
E, D_MODEL, R, N = 64, 32, 2, 16          # small Vim: d_inner, d_model, dt_rank, d_state

# Vim-S (depth 24, d_model 384), head excluded: the spec's exact counts (baselines-vim.md 3.1-3.4, 3.9)
SPEC_COUNTS = {
    "vim_lora_in_proj": 1_474_560, "vim_lorap_x": 1_769_472, "vim_lorap_z": 1_769_472,
    "vim_lora_out_proj": 2_654_208, "vim_lora_x_proj": 2_531_328, "vim_lorap_d": 2_433_024,
    "vim_lorap_b": 2_408_448, "vim_lorap_c": 2_408_448, "vim_lora_dt": 2_433_024, "vim_lora_embed": 36_864,
    "vim_dora_x": 1_778_688, "vim_a_tuning": 589_824, "vim_d_tuning": 36_864, "vim_conv1d_tuning": 147_456,
    "vim_bias_tuning": 36_864, "vim_cls_tuning": 384, "vim_pos_tuning": 75_648,
}
CONFIGS = {n: OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/method/{n}.yaml")) for n in SPEC_COUNTS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_vim(seed=0, **kw):
    torch.manual_seed(seed)
    return vim_small(num_classes=5, img_size=32, depth=2, embed_dim=D_MODEL, kernels="pytorch", **kw).eval()


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomize(model, std=0.3, seed=3):
    """Every trainable tensor except the head: random (LoRA ups, deltas, DoRA magnitudes)."""
    model.eval()                                  # the adapters' dropouts were built in training mode
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("head."):
                if n.endswith("magnitude"):
                    p.mul_(1 + std * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=g))


def feats(model, x):
    """The normed cls features (B, D): far more sensitive than the logits of the 0.02-init head."""
    return model.forward_features(x)


def mixers(model):
    return [layer.mixer for layer in model.layers]


def lora_dw(adapter, s=0.1):
    return s * adapter.lora_b.weight @ adapter.lora_a.weight


# ---------------------------------------------------------------------------------------
# Counts on Vim-S through scripts/count_params.py (meta device, in-process)
# ---------------------------------------------------------------------------------------
_count_params_module = count_params_script


def test_vim_s_counts_equal_the_spec_through_count_params(capsys):
    from hydra import compose, initialize_config_dir
    count = _count_params_module().count
    got = {}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for name in SPEC_COUNTS:
            got[name] = count(compose("train", overrides=["backbone=vim_s", f"method={name}"]))
        if "vim_affix" in lily.registered():     # the template's affix part is another module's method
            got["vim_hybrid"] = count(compose("train", overrides=["backbone=vim_s", "method=vim_hybrid"]))
            # the one released-space setting that fits the paper's w/ proj row (spec 3.9): dt removed,
            # out r4, in r12, X r4, B r4, affix T=1 w/ proj, A, cls = 117,197,184
            got["fit"] = count(compose("train", overrides=[
                "backbone=vim_s", "method=vim_hybrid", "method.parts.0.rank=4", "method.parts.1.rank=12",
                "method.parts.2.rank=4", "method.parts.3.rank=4"]))
    out = capsys.readouterr().out
    assert out.count("trainable_params_excluding_head=") == len(got)
    for name, expected in SPEC_COUNTS.items():
        assert got[name] == expected, name
    if "vim_hybrid" in got:
        assert got["vim_hybrid"] == 117_386_112
        # removing the dt part (2*24*4*(24+768) = 152,064) gives the spec's fitting setting
        assert got["fit"] - 152_064 == 117_197_184


def test_composed_count_is_the_sum_of_its_parts_on_vim_s():
    parts = [CONFIGS[n] for n in ("vim_lora_out_proj", "vim_lorap_x", "vim_a_tuning", "vim_cls_tuning",
                                  "vim_bias_tuning", "vim_lora_dt", "vim_lora_embed")]
    with torch.device("meta"):
        model = vim_small(num_classes=10)
        lily.adapt(model, {"name": "compose", "parts": parts})
    assert lily.count_parameters(model) == sum(SPEC_COUNTS[n] for n in (
        "vim_lora_out_proj", "vim_lorap_x", "vim_a_tuning", "vim_cls_tuning", "vim_bias_tuning", "vim_lora_dt",
        "vim_lora_embed"))


# ---------------------------------------------------------------------------------------
# Identity at init, forward = the equation, merge
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_identity_at_init(name):
    model, x = small_vim(), images()
    with torch.no_grad():
        y0 = feats(model, x)
        lily.adapt(model, CONFIGS[name])
        assert torch.equal(feats(model, x), y0)


def reference(edit):
    """The plain small Vim (same frozen weights) with its tensors changed by ``edit(ref)``."""
    ref = small_vim()
    with torch.no_grad():
        edit(ref)
    return ref


ROWS = {"in_proj": (0, 2 * E), "X": (0, E), "Z": (E, 2 * E), "x_proj": (0, R + 2 * N), "d": (0, R),
        "B": (R, R + N), "C": (R + N, R + 2 * N), "out_proj": (0, D_MODEL), "dt": (0, E)}
LINEARS = {"in_proj": ["in_proj"], "X": ["in_proj"], "Z": ["in_proj"], "out_proj": ["out_proj"],
           "x_proj": ["x_proj", "x_proj_b"], "d": ["x_proj", "x_proj_b"], "B": ["x_proj", "x_proj_b"],
           "C": ["x_proj", "x_proj_b"], "dt": ["dt_proj", "dt_proj_b"]}


@pytest.mark.parametrize("target", list(ROWS))
def test_lora_forward_is_w_plus_s_up_down_on_its_rows_and_branches(target):
    model, x = small_vim(), images()
    lily.adapt(model, {"name": "vim_lora", "target": target, "rank": 3})
    randomize(model, std=3.0)         # large: the small random Vim's scan path is a small part of its output
    a, b = ROWS[target]

    def edit(ref):
        for m, r in zip(mixers(model), mixers(ref)):
            for attr in LINEARS[target]:
                ad = getattr(m, attr).adapters[f"vim_lora_{target}"]
                getattr(r, attr).weight[a:b] += lora_dw(ad)
    with torch.no_grad():
        y, y_ref = feats(model, x), feats(reference(edit), x)
    assert (y - feats(small_vim(), x)).abs().max() > 1e-3      # the adapter does change the output (100x atol)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    ad = getattr(mixers(model)[0], LINEARS[target][0]).adapters[f"vim_lora_{target}"]
    activation = target in ("in_proj", "X", "Z", "out_proj")    # dropout 0.1 on the rank bottleneck
    assert (isinstance(ad.dropout, nn.Dropout) and ad.dropout.p == 0.1) if activation else isinstance(ad.dropout, nn.Identity)
    assert ad.scale == 0.1 and ad.lora_a.bias is None and ad.lora_b.bias is None


def test_embed_lora_is_a_conv_lora_with_scale_one():
    model, x = small_vim(), images()
    lily.adapt(model, CONFIGS["vim_lora_embed"])
    randomize(model)
    proj = model.patch_embed.proj
    assert proj.lora_down.kernel_size == (16, 16) and proj.lora_down.stride == (16, 16)
    assert proj.lora_up.kernel_size == (1, 1) and proj.dropout.p == 0.1 and proj.scale == 1.0

    def edit(ref):
        up = proj.lora_up.weight[:, :, 0, 0]                             # (D, r)
        down = proj.lora_down.weight.reshape(up.shape[1], -1)            # (r, 3*16*16)
        ref.patch_embed.proj.weight += (up @ down).reshape(ref.patch_embed.proj.weight.shape)
    with torch.no_grad():
        torch.testing.assert_close(feats(model, x), feats(reference(edit), x), rtol=1e-4, atol=1e-5)


def dora_weight(w, a, b, m, s=0.1):
    v = w + s * b @ a
    return m * v / torch.linalg.vector_norm(v, dim=0, keepdim=True)   # per input column


@pytest.mark.parametrize("target", ["X", "B", "dt"])
def test_dora_forward_is_the_column_normed_weight(target):
    model, x = small_vim(), images()
    lily.adapt(model, {"name": "vim_lora", "target": target, "rank": 3, "dora": True})
    a, b = ROWS[target]
    for m in mixers(model):                                   # magnitude = ||W||_2 per input column
        for attr in LINEARS[target]:
            ad = getattr(m, attr).adapters[f"vim_lora_{target}"]
            assert ad.magnitude.shape == (1, getattr(m, attr).in_features)
            torch.testing.assert_close(ad.magnitude, getattr(m, attr).weight[a:b].norm(dim=0, keepdim=True))
    randomize(model)

    def edit(ref):
        for m, r in zip(mixers(model), mixers(ref)):
            for attr in LINEARS[target]:
                ad = getattr(m, attr).adapters[f"vim_lora_{target}"]
                w = getattr(r, attr).weight
                w[a:b] = dora_weight(w[a:b].clone(), ad.lora_a.weight, ad.lora_b.weight, ad.magnitude)
    with torch.no_grad():
        torch.testing.assert_close(feats(model, x), feats(reference(edit), x), rtol=1e-4, atol=1e-5)


def test_dora_released_backward_magnitude_defect_is_an_option():
    """Issue 16 item 4: the released code takes the x_proj_b sub-block magnitude from x_proj."""
    x = images()
    y0 = small_vim()(x)
    fixed, released = small_vim(), small_vim()
    lily.adapt(fixed, {"name": "vim_lora", "target": "B", "rank": 3, "dora": True})
    lily.adapt(released, {"name": "vim_lora", "target": "B", "rank": 3, "dora": True,
                          "dora_b_magnitude": "forward_released"})
    m = mixers(released)[0]
    torch.testing.assert_close(m.x_proj_b.adapters["vim_lora_B"].magnitude, m.x_proj.weight[R:R + N].norm(dim=0, keepdim=True))
    torch.testing.assert_close(m.x_proj.adapters["vim_lora_B"].magnitude, m.x_proj.weight[R:R + N].norm(dim=0, keepdim=True))
    with torch.no_grad():
        assert torch.equal(fixed(x), y0)
        assert (feats(released, x) - small_vim().forward_features(x)).abs().max() > 1e-3  # not the identity at init


DELTA_TENSORS = {"A": ["A_log", "A_b_log"], "D": ["D", "D_b"], "conv1d": ["conv1d.weight", "conv1d_b.weight"],
                 "bias": ["dt_proj.bias", "dt_proj_b.bias"]}


def _get(module, dotted):
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


@pytest.mark.parametrize("param", list(DELTA_TENSORS))
def test_delta_tuning_forward_adds_the_delta_per_branch(param):
    model, x = small_vim(), images()
    lily.adapt(model, {"name": "vim_delta_tuning", "param": param})
    randomize(model, std=3.0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert len(trainable) == 2 * 2 and all(n.endswith(f"delta_{param}") for n in trainable)

    def edit(ref):
        for i, r in enumerate(mixers(ref)):
            for t in DELTA_TENSORS[param]:
                owner, leaf = _get(r, t)
                d = trainable[f"layers.{i}.mixer.{t.rsplit('.', 1)[0] + '.' if '.' in t else ''}"
                              f"parametrizations.{leaf}.0.delta_{param}"]
                getattr(owner, leaf).add_(d)
    with torch.no_grad():
        y = feats(model, x)
        assert (y - feats(small_vim(), x)).abs().max() > 1e-3
        torch.testing.assert_close(y, feats(reference(edit), x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which,tensor", [("cls", "cls_token"), ("pos", "pos_embed")])
def test_token_tuning_adds_the_delta(which, tensor):
    model, x = small_vim(), images()
    lily.adapt(model, {"name": "vim_token_tuning", "which": which})
    randomize(model)
    delta = model.parametrizations[tensor][0].delta
    with torch.no_grad():
        y = feats(model, x)
        assert (y - feats(small_vim(), x)).abs().max() > 1e-3
        torch.testing.assert_close(y, feats(reference(lambda r: getattr(r, tensor).add_(delta)), x), rtol=1e-4, atol=1e-5)


def test_bias_tuning_original_form_unfreezes_the_dt_biases():
    model = small_vim()
    lily.adapt(model, {"name": "vim_delta_tuning", "param": "bias", "form": "original"})
    names = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert names == {f"layers.{i}.mixer.{a}.bias" for i in range(2) for a in ("dt_proj", "dt_proj_b")}


MERGE_CASES = list(CONFIGS) + ["compose_mergeable"]
COMPOSE_MERGEABLE = {"name": "compose", "parts": [
    CONFIGS["vim_lora_out_proj"], CONFIGS["vim_lorap_x"], {"name": "vim_lora", "target": "dt", "rank": 2},
    CONFIGS["vim_bias_tuning"], CONFIGS["vim_a_tuning"], CONFIGS["vim_cls_tuning"], CONFIGS["vim_dora_x"] | {"target": "B"}]}


@pytest.mark.parametrize("name", MERGE_CASES)
def test_merge_equals_unmerged_and_unmerge_restores_bits(name):
    model, x = small_vim(), images()
    lily.adapt(model, COMPOSE_MERGEABLE if name == "compose_mergeable" else CONFIGS[name])
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = feats(model, x)
        lily.merge(model)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all(".original" in k or k.endswith(".weight") for k in changed)
        torch.testing.assert_close(feats(model, x), y, rtol=1e-4, atol=1e-5)
        lily.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(feats(model, x), y)


# ---------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------
@dataclass
class _ShiftOptions(MethodOptions):
    name: str = "test_unmergeable_shift"


@register
class _Shift(Method):
    """A test-only, non-mergeable method: a trainable shift after the final norm."""
    name = "test_unmergeable_shift"
    options = _ShiftOptions
    mergeable = "it is a test method that refuses"

    def apply(self, model, opts):
        model.norm_f.shift = nn.Parameter(torch.zeros(model.embed_dim))
        model.norm_f.register_forward_hook(lambda mod, args, out: out + mod.shift)


def test_compose_forward_is_its_parts_and_refused_merge_names_the_part():
    model, x = small_vim(), images()
    parts = [CONFIGS["vim_lorap_x"], CONFIGS["vim_a_tuning"], {"name": "test_unmergeable_shift"},
             CONFIGS["vim_cls_tuning"]]
    lily.adapt(model, {"name": "compose", "parts": parts})
    randomize(model)
    shift = model.norm_f.shift

    def edit(ref):
        for m, r in zip(mixers(model), mixers(ref)):
            r.in_proj.weight[:E] += lora_dw(m.in_proj.adapters["vim_lora_X"])
            r.A_log += m.parametrizations.A_log[0].delta_A
            r.A_b_log += m.parametrizations.A_b_log[0].delta_A
        ref.cls_token += model.parametrizations.cls_token[0].delta_cls
        ref.norm_f.register_forward_hook(lambda mod, args, out: out + shift)
    with torch.no_grad():
        y = feats(model, x)
        torch.testing.assert_close(y, feats(reference(edit), x), rtol=1e-4, atol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lily.MergeError, match=r"part 2 \('test_unmergeable_shift'\)"):
        lily.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(feats(model, x), y)


def test_compose_refusals():
    with pytest.raises(lily.LilyConfigError, match=r"parts\[1\].*\['rnak'\]"):
        lily.method_config({"name": "compose", "parts": [CONFIGS["vim_lorap_x"], {"name": "vim_lora", "rnak": 2}]})
    with pytest.raises(lily.LilyConfigError, match="already carries"):
        lily.adapt(small_vim(), {"name": "compose", "parts": [CONFIGS["vim_lorap_x"], CONFIGS["vim_lorap_x"]]})
    with pytest.raises(lily.LilyConfigError, match="already carries a delta"):
        lily.adapt(small_vim(), {"name": "compose", "parts": [CONFIGS["vim_a_tuning"], CONFIGS["vim_a_tuning"]]})
    with pytest.raises(lily.LilyConfigError, match="at least one part"):
        lily.adapt(small_vim(), {"name": "compose"})
    opts = lily.method_config({"name": "compose", "parts": [CONFIGS["vim_lorap_x"]]})
    assert lily.method_config(opts.to_dict()).to_dict() == opts.to_dict()
    assert [n for n, _ in lily.get_method("compose").parts(opts)] == ["vim_lora"]


def test_options_are_checked_and_named():
    for bad, key in (({"target": "q"}, "target"), ({"rank": 0}, "rank"), ({"dora_b_magnitude": "x"}, "dora_b_magnitude"),
                     ({"target": "embed", "dora": True}, "dora")):
        with pytest.raises(lily.LilyConfigError, match=key):
            lily.method_config({"name": "vim_lora", **bad})
    with pytest.raises(lily.LilyConfigError, match="param"):
        lily.method_config({"name": "vim_delta_tuning", "param": "E"})
    with pytest.raises(lily.LilyConfigError, match="which"):
        lily.method_config({"name": "vim_token_tuning", "which": "head"})
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=1, img_size=32)
    with pytest.raises(lily.LilyConfigError, match="Vision Mamba"):
        lily.adapt(vit, {"name": "vim_lora", "target": "X"})


def test_decay_mult_keys_match_exactly_the_deltas():
    """MambaPEFT's custom keys (spec 3.3): wd x10 on the A, D, conv1d deltas, x100 on the bias delta."""
    rules = lily.get_method("vim_delta_tuning").decay_mult
    assert rules == {"delta_A": 10.0, "delta_D": 10.0, "delta_conv1d": 10.0, "delta_bias": 100.0}
    model = small_vim()
    lily.adapt(model, {"name": "compose", "parts": [CONFIGS[n] for n in (
        "vim_a_tuning", "vim_d_tuning", "vim_conv1d_tuning", "vim_bias_tuning", "vim_lorap_x", "vim_cls_tuning")]})
    for name, p in model.named_parameters():
        hits = [k for k in rules if k in name]
        is_delta = p.requires_grad and ".parametrizations." in name and not name.endswith("delta_cls")
        assert len(hits) == (1 if is_delta else 0), name
    assert set(rules) <= set(lily.get_method("compose").decay_mult)


def test_gradients_reach_exactly_the_trainable_tensors():
    model = small_vim(drop_path_rate=0.1)
    lily.adapt(model, COMPOSE_MERGEABLE | {"parts": COMPOSE_MERGEABLE["parts"] + [
        CONFIGS["vim_lora_embed"], CONFIGS["vim_pos_tuning"], CONFIGS["vim_d_tuning"], CONFIGS["vim_conv1d_tuning"],
        CONFIGS["vim_lora_x_proj"], CONFIGS["vim_lorap_z"], CONFIGS["vim_lora_in_proj"]]})
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
    assert seen == trainable
    assert all(n.startswith("head.") or ".adapters." in n or ".lora_" in n or "parametrizations." in n
               for n in trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
