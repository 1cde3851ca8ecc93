"""models/vit.py: building timm ViTs and loading weights (npz / pth / safetensors / hub).

All on tiny random models; nothing is downloaded (the hub is monkeypatched).
"""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from common.errors import UserError
from models.vit import VisionTransformerPreLogits, build_vit

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def cfg(**over):
    c = dict(family="vit", name="tiny", arch="vit_tiny_patch16_224", hub_name=None, pretrained=False,
             checkpoint=None, img_size=16, drop_path_rate=0.0, pre_logits="auto", model_kwargs=dict(TINY))
    c.update(over)
    return c


def source_model(num_classes=5, img_size=16, **kw):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, img_size=img_size, **{**TINY, **kw})
    with torch.no_grad():  # non-trivial values everywhere (timm zero-inits some biases/head)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def to_google_npz(model, path, pre_logits=None):
    """Write ``model``'s weights under the names of the original Google ViT .npz (as timm reads them)."""
    t = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": t["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": t["patch_embed.proj.bias"],
        "cls": t["cls_token"],
        "Transformer/posembed_input/pos_embedding": t["pos_embed"],
        "Transformer/encoder_norm/scale": t["norm.weight"],
        "Transformer/encoder_norm/bias": t["norm.bias"],
        "head/kernel": t["head.weight"].T,
        "head/bias": t["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t[b + "norm1.weight"], t[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t[b + "norm2.weight"], t[b + "norm2.bias"]
        qkv_w, qkv_b = t[b + "attn.qkv.weight"], t[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[mha + f"{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            w[mha + f"{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        w[mha + "out/kernel"] = t[b + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        w[mha + "out/bias"] = t[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = t[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = t[b + f"mlp.fc{r + 1}.bias"]
    if pre_logits is not None:
        w["pre_logits/kernel"] = pre_logits.weight.detach().numpy().T
        w["pre_logits/bias"] = pre_logits.bias.detach().numpy()
    np.savez(path, **w)
    return path


def random_pre_logits(dim=32):
    torch.manual_seed(1)
    return torch.nn.Linear(dim, dim)


def x16(n=3):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def assert_same_backbone(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if k.startswith(("head.", "pre_logits.")) or k == "pos_embed":
            continue
        torch.testing.assert_close(v, sb[k], msg=k)


# ---------------------------------------------------------------------------------------
def test_random_weights_and_drop_path():
    model, info = build_vit(cfg(drop_path_rate=0.1), num_classes=7)
    assert info == {"weights": "random", "pre_logits": False}
    assert type(model).__name__ == "VisionTransformer" and not hasattr(model, "pre_logits")
    assert model.head.out_features == 7
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model(x16()).shape == (3, 7)

    model, info = build_vit(OmegaConf.create(cfg(pre_logits=True)), num_classes=7)  # OmegaConf node too
    assert info == {"weights": "random", "pre_logits": True}
    assert not any(p.requires_grad for p in model.pre_logits.parameters())


def test_npz_with_pre_logits(tmp_path):
    src, pl = source_model(num_classes=5), random_pre_logits()
    path = to_google_npz(src, tmp_path / "ViT-fake.npz", pre_logits=pl)

    model, info = build_vit(cfg(pretrained=True, checkpoint=str(path)), num_classes=5)
    assert info == {"weights": f"file:{path}", "pre_logits": True}
    assert isinstance(model, VisionTransformerPreLogits)
    assert_same_backbone(src, model)
    torch.testing.assert_close(model.pre_logits.fc.weight, pl.weight)
    # no name of the pre-logits layer contains 'head' or 'lily'; it is frozen; the head is model.head
    names = [n for n, _ in model.named_parameters() if n.startswith("pre_logits")]
    assert names == ["pre_logits.fc.weight", "pre_logits.fc.bias"]
    assert not any(p.requires_grad for p in model.pre_logits.parameters())
    # output == head(tanh(Linear(pooled cls token)))
    model.eval()
    x = x16()
    with torch.no_grad():
        pooled = model.forward_features(x)[:, 0]
        expected = model.head(torch.tanh(pl(pooled)))
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   torch.tanh(pl(pooled)))

    # pre_logits=false: the plain timm model, identical to the source (head fits, so it is loaded)
    model, info = build_vit(cfg(pretrained=True, checkpoint=str(path), pre_logits=False), num_classes=5)
    assert info["pre_logits"] is False and not hasattr(model, "pre_logits")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x))


def test_npz_without_pre_logits_new_head_and_size(tmp_path):
    src = source_model(num_classes=5)
    path = to_google_npz(src, tmp_path / "plain.npz")
    model, info = build_vit(cfg(pretrained=True, checkpoint=str(path), img_size=24), num_classes=3)
    assert info["pre_logits"] is False and model.head.out_features == 3
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 32)  # resampled from a 4x4 grid
    assert_same_backbone(src, model)
    assert model(torch.rand(2, 3, 24, 24)).shape == (2, 3)

    with pytest.raises(UserError, match="pre_logits=true.*no pre_logits/kernel.*ViT-B_16.npz"):
        build_vit(cfg(pretrained=True, checkpoint=str(path), pre_logits=True), num_classes=3)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torch_round_trip(tmp_path, fmt):
    src = source_model(num_classes=5)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save({"model": sd, "epoch": 3}, path)  # nested, with other entries
    else:
        save_file(sd, str(path))

    model, info = build_vit(cfg(pretrained=True, checkpoint=str(path)), num_classes=5)  # same head
    assert info == {"weights": f"file:{path}", "pre_logits": False}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x16()), src(x16()))

    model, _ = build_vit(cfg(pretrained=True, checkpoint=str(path)), num_classes=9)  # new head
    assert model.head.out_features == 9
    assert_same_backbone(src, model)

    model, _ = build_vit(cfg(pretrained=True, checkpoint=str(path), img_size=32), num_classes=9)  # new grid
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert_same_backbone(src, model)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 9)


def test_torch_pre_logits(tmp_path):
    src, pl = source_model(num_classes=5), random_pre_logits()
    sd = {**src.state_dict(), "pre_logits.fc.weight": pl.weight.detach(), "pre_logits.fc.bias": pl.bias.detach()}
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model, info = build_vit(cfg(pretrained=True, checkpoint=str(path)), num_classes=4)
    assert info["pre_logits"] is True
    torch.testing.assert_close(model.pre_logits.fc.bias, pl.bias)
    with torch.no_grad():
        x = x16()
        torch.testing.assert_close(model.eval()(x), model.head(torch.tanh(pl(model.forward_features(x)[:, 0]))))
    model, info = build_vit(cfg(pretrained=True, checkpoint=str(path), pre_logits=False), num_classes=4)
    assert info["pre_logits"] is False and not hasattr(model, "pre_logits")


def test_hub_weights_via_timm(monkeypatch):
    """The hub path goes through timm's load_pretrained (the download itself is faked)."""
    import timm.models._builder as builder
    src = source_model(num_classes=3)
    monkeypatch.setattr(builder, "load_state_dict_from_hf", lambda *a, **k: dict(src.state_dict()))
    monkeypatch.setattr(builder, "load_custom_from_hf", lambda *a, **k: pytest.fail("unexpected"), raising=False)
    model, info = build_vit(cfg(pretrained=True, hub_name="vit_tiny_patch16_224.augreg_in21k"), num_classes=4)
    assert info == {"weights": "hub:vit_tiny_patch16_224.augreg_in21k", "pre_logits": False}
    assert_same_backbone(src, model)


# ---------------------------------------------------------------------------------------
# errors a user can cause
def test_error_missing_file(tmp_path):
    missing = tmp_path / "nope" / "ViT-B_16.npz"
    with pytest.raises(UserError, match=f"'{missing}' does not exist.*backbone.pretrained=false"):
        build_vit(cfg(pretrained=True, checkpoint=str(missing)), num_classes=3)


def test_error_hub_offline(monkeypatch):
    import timm.models

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(timm.models, "load_pretrained", offline)
    with pytest.raises(UserError) as e:
        build_vit(cfg(pretrained=True, hub_name="vit_tiny_patch16_224.augreg_in21k"), num_classes=3)
    msg = str(e.value)
    for part in ("could not download", "vit_tiny_patch16_224.augreg_in21k", "backbone.checkpoint=",
                 "gs://vit_models/imagenet21k/ViT-B_16.npz", "google-research/vision_transformer",
                 "backbone.pretrained=false"):
        assert part in msg


def test_error_hub_config():
    with pytest.raises(UserError, match="unknown timm pretrained tag"):
        build_vit(cfg(pretrained=True, hub_name="vit_tiny_patch16_224.no_such_tag"), num_classes=3)
    with pytest.raises(UserError, match="not a weight tag of backbone.arch"):
        build_vit(cfg(pretrained=True, hub_name="vit_base_patch16_224.orig_in21k"), num_classes=3)
    with pytest.raises(UserError, match="names neither backbone.checkpoint nor backbone.hub_name"):
        build_vit(cfg(pretrained=True), num_classes=3)
    with pytest.raises(UserError, match="hub weights .* carry no pre-logits"):
        build_vit(cfg(pretrained=True, hub_name="vit_tiny_patch16_224.augreg_in21k", pre_logits=True), 3)


def test_error_state_dict_mismatch(tmp_path):
    path = tmp_path / "deeper.pth"
    torch.save(source_model(depth=3).state_dict(), path)
    with pytest.raises(UserError, match=r"does not fit backbone.arch.*unexpected keys: blocks\.2\."):
        build_vit(cfg(pretrained=True, checkpoint=str(path)), num_classes=3)
    path = tmp_path / "wider.safetensors"
    save_file(source_model(embed_dim=48, num_heads=2).state_dict(), str(path))
    with pytest.raises(UserError, match="shape mismatches: .*file .*48.* vs model"):
        build_vit(cfg(pretrained=True, checkpoint=str(path)), num_classes=3)
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in source_model().state_dict().items() if k != "norm.weight"}, path)
    with pytest.raises(UserError, match="missing keys: norm.weight"):
        build_vit(cfg(pretrained=True, checkpoint=str(path)), num_classes=3)
    path = tmp_path / "nolp.pth"
    torch.save(source_model().state_dict(), path)
    with pytest.raises(UserError, match="pre_logits=true but .* has no pre_logits.fc.weight"):
        build_vit(cfg(pretrained=True, checkpoint=str(path), pre_logits=True), num_classes=3)


def test_error_npz_mismatch_and_corrupt(tmp_path):
    path = to_google_npz(source_model(depth=1), tmp_path / "shallow.npz")
    with pytest.raises(UserError, match="does not fit the architecture"):
        build_vit(cfg(pretrained=True, checkpoint=str(path)), num_classes=3)
    for name in ("junk.npz", "junk.pth", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        with pytest.raises(UserError, match=f"could not read '.*{name}'"):
            build_vit(cfg(pretrained=True, checkpoint=str(tmp_path / name)), num_classes=3)


def test_error_config_values():
    with pytest.raises(UserError, match="not a timm model name"):
        build_vit(cfg(arch="vit_nonexistent"), num_classes=3)
    with pytest.raises(UserError, match="pre_logits must be auto, true or false"):
        build_vit(cfg(pre_logits="maybe"), num_classes=3)
    with pytest.raises(UserError, match="family=vit"):
        build_vit(cfg(family="vim"), num_classes=3)
    with pytest.raises(UserError, match="not a timm VisionTransformer"):
        build_vit(cfg(arch="resnet18", model_kwargs={}, img_size=None), num_classes=3)


# ---------------------------------------------------------------------------------------
# the backbone configs
KEYS = {"family", "name", "arch", "hub_name", "pretrained", "checkpoint", "img_size", "drop_path_rate",
        "pre_logits", "model_kwargs", "head_init"}


@pytest.mark.parametrize("name", ["vit_b16_in21k", "vit_b16_in1k", "vit_tiny"])
def test_backbone_config_schema(name):
    from timm.models import get_pretrained_cfg
    c = OmegaConf.load(ROOT / "configs" / "backbone" / f"{name}.yaml")
    assert set(c.keys()) == KEYS and c.family == "vit" and c.name == name
    assert timm.is_model(c.arch)
    if c.hub_name is not None:
        assert c.hub_name.split(".")[0] == c.arch and get_pretrained_cfg(c.hub_name) is not None


def test_vit_tiny_asset_loads():
    """backbone=vit_tiny: the committed pretrained weights load strictly into the configured model."""
    root = OmegaConf.create({"paths": {"root_dir": str(ROOT)},
                             "backbone": OmegaConf.load(ROOT / "configs" / "backbone" / "vit_tiny.yaml")})
    model, info = build_vit(root.backbone, num_classes=10)
    assert info == {"weights": f"file:{ROOT / 'assets' / 'vit_tiny.safetensors'}", "pre_logits": False}
    s = root.backbone.img_size
    assert model(torch.rand(2, 3, s, s)).shape == (2, 10)


def test_random_bytes_checkpoint_is_one_clear_message_without_unsafe_advice(tmp_path):
    """Issue 14 fault 8: a random-bytes .pth is named, and PyTorch's advice to load it with
    weights_only=False (unsafe, and no fix for a corrupt file) is not repeated."""
    from common.errors import UserError
    from models.vit import _read_state_dict
    path = tmp_path / "weights.pth"
    path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(UserError) as e:
        _read_state_dict(path)
    msg = str(e.value)
    assert str(path) in msg and "weights_only" not in msg and "\n" not in msg
