"""scripts/bench.py: the replaced design it times against computes what ours computes, and
``--quick`` runs end to end printing the table and every ratio (nothing about speed)."""
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
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
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
