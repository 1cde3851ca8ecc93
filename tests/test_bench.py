"""scripts/bench.py: the replaced design it times against computes what ours computes, its methods
are the method configs composed as a run composes them, a method that trains a frozen weight does not
leak into the others' models, and ``--quick`` runs end to end printing the table, every method's
ratios to LoRA / LoRA(in_proj) and every other ratio (nothing about speed)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import lily

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_models  # noqa: E402
from bench_models import randomize_adapters  # noqa: E402
from bench_replaced import (check_same_outputs, make_image_folder, pil_decode, pil_epoch,  # noqa: E402
                            replace_design)

RATIOS = ["lily/lora step time", "lily/linear step time", "ours/replaced train speed", "ours/replaced eval speed",
          "cache/pil data epoch speed", "token/sample Vim-S peak memory"]


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


@pytest.mark.parametrize("routing", ["batch", "sample", "token"])
def test_replaced_design_computes_what_ours_computes(routing, monkeypatch):
    cfg = lily.MethodConfig(name="lily", targets=["k", "v", "ffn"], rank=4, ne=3, routing=routing)
    ours, replaced = lily.adapt(tiny_vit(), cfg), lily.adapt(tiny_vit(), cfg)
    randomize_adapters(ours)
    replaced.load_state_dict(ours.state_dict())
    assert replace_design(replaced) == {"attention": 2, "lily": 6}
    x = torch.rand(3, 3, 16, 16)
    assert check_same_outputs(ours, replaced, x) < 1e-5
    # the replaced model really runs the hand-written attention, and Lily's routing still reports weights
    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", lambda *a, **k: pytest.fail("fused attention used"))
        replaced(x)
    assert set(lily.expert_weights(replaced)) == {"k", "v", "ffn"}
    with torch.no_grad():
        replaced.blocks[0].attn.qkv.adapters["k"].bank.experts.add_(1.0)
    with pytest.raises(AssertionError, match="does not compute"):
        check_same_outputs(ours, replaced, x)


def test_pil_epoch_gives_the_cached_pixels(tmp_path):
    from data import get_task, load_split, normalize
    task = get_task("dtd")
    make_image_folder(tmp_path / "data", task.name, "val200", 6, task.num_classes, size=(40, 30))
    data = load_split(tmp_path / "data", task, "val200", 24, tmp_path / "cache", progress=False)
    paths = [tmp_path / "data" / task.name / line.split()[0]
             for line in (tmp_path / "data" / task.name / "val200.txt").read_text().splitlines()]
    order = torch.tensor([4, 1, 0, 5, 2, 3])
    got = list(pil_epoch(paths, data.labels, order, batch_size=4, image_size=24))
    assert len(got) == 1  # drop_last
    x, y = got[0]
    assert torch.equal(x, normalize(data.images[order[:4]], "none")) and torch.equal(y, data.labels[order[:4]])
    assert pil_decode(paths[0], 24).shape == (3, 24, 24)


@pytest.mark.slow
def test_quick_bench_prints_the_table_and_every_ratio():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--repeats", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = proc.stdout
    header = next((line for line in out.splitlines() if "train img/s" in line), None)
    assert header is not None, out
    for col in ("backbone", "method", "design", "precision", "train img/s", "eval img/s", "step peak MB"):
        assert col in header
    for what in RATIOS:
        m = re.search(rf"^{re.escape(what)} ratio: (\S+)$", out, re.M)
        assert m, f"no '{what} ratio' line in:\n{out}"
        value = float(m.group(1))
        assert math.isfinite(value) and value > 0, m.group(0)
    assert "sizes:" in out and "targets:" in out and "not measured (no GPU)" in out or torch.cuda.is_available()
    # one table per backbone: every field method with a config, its three ratios to the baseline
    for backbone, base in (("vit_b16", "lora"), ("vim_s", "vim_lora_in_proj")):
        head = re.search(rf"^{backbone} methods, ratios to {base} .*\n(.*)\n((?:.+\n)+)", out, re.M)
        assert head, out
        assert "step time / base" in head.group(1) and "step peak memory / base" in head.group(1)
        rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in head.group(2).splitlines()}
        assert rows[base][1:] == [1.0, 1.0, 1.0] or not math.isfinite(rows[base][3])
        expected = [m for m in bench_models.field_methods(backbone) if bench_models.has_config(m)]
        for m in expected:
            assert m in rows or f"{backbone}/{m}: not measured" in out, m
        for m, (params, step_t, eval_t, mem) in rows.items():
            assert params >= 0 and step_t > 0 and eval_t > 0, (m, rows[m])


def test_methods_are_the_field_configs_composed_as_a_run_composes_them():
    assert bench_models.field_methods("vit_b16")[:3] == ["full", "linear", "bitfit"]
    assert "vim_lora_in_proj" in bench_models.field_methods("vim_s")
    # per-task value resolved for the bench's task (cifar: 10 in configs/method/vpt_deep.yaml)
    opts = bench_models.method_options("vit_b16", "vpt_deep")
    assert opts["name"] == "vpt_deep" and opts["prompt_length"] == 10
    # recipe interpolation resolved as the default recipe (authors) sets it
    assert bench_models.method_options("vit_b16", "lily_kvffn")["lp_stride"] == "depth//ne"
    # the bench-only variant: lily_vim with per-sample routing on in_proj, all else the config's
    a, b = (bench_models.method_options("vim_s", m) for m in ("lily_vim", "lily_vim_sample"))
    assert a["routing"]["in_proj"] == "token" and b["routing"]["in_proj"] == "sample"
    assert {k: v for k, v in a.items() if k != "routing"} == {k: v for k, v in b.items() if k != "routing"}


def test_a_method_that_trains_frozen_weights_does_not_leak_into_the_others():
    base = tiny_vit()
    lora = bench_models.adapted(base, "vit_b16", "lora")
    bitfit = bench_models.adapted(base, "vit_b16", "bitfit")
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert not any(n.endswith(".bias") and not n.startswith("head.") for n in trainable), trainable
    assert "blocks.0.attn.qkv.bias" in {n for n, p in bitfit.named_parameters() if p.requires_grad}
    # frozen weights are still shared (memory), BitFit's biases are its own
    assert bitfit.blocks[0].attn.qkv.bias is not base.blocks[0].attn.qkv.bias
    assert bitfit.blocks[0].mlp.fc1.weight is base.blocks[0].mlp.fc1.weight
    opt = bench_models.make_optimizer(bitfit)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(bitfit(torch.rand(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    for n, p in lora.named_parameters():
        assert torch.equal(p, before[n]), n
