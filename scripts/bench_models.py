"""Models, methods and synthetic data for scripts/bench.py (random weights, no downloads).

Backbones: ``vit_b16`` (timm ``vit_base_patch16_224``, drop-path 0.1 as in the paper) and
``vim_s`` (models/vim.py Vim-S, drop-path 0.05). Methods are the paper's settings, the
same values as configs/method/<name>.yaml (Table 1 for ViT, Table 2 for Vim).
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lily  # noqa: E402
from data import SplitData, get_task  # noqa: E402

NUM_CLASSES = 100  # a VTAB-sized head (cifar)
BACKBONES = ("vit_b16", "vim_s")

_LILY_VIM = dict(name="lily", targets=["in_proj", "delta"], rank={"in_proj": 8, "delta": 4},
                 ne={"in_proj": 5, "delta": 1}, routing={"in_proj": "token", "delta": "uniform"},
                 shared_router={"in_proj": True, "delta": False}, dropout={"in_proj": 0.1, "delta": 0.0},
                 router_init="default")
METHODS = {
    "vit_b16": {
        "linear": dict(name="linear"),
        "lora": dict(name="lora", targets=["q", "v"], rank=32),
        "lily_kvffn": dict(name="lily", targets=["k", "v", "ffn"], rank={"k": 16, "v": 16, "ffn": 32}, ne=4,
                           routing="batch", ffn_act="relu"),
        "lily_qv": dict(name="lily", targets=["q", "v"], rank=32, ne=4, routing="batch"),
        "lily_qvffn": dict(name="lily", targets=["q", "v", "ffn"], rank={"q": 16, "v": 16, "ffn": 32}, ne=4,
                           routing="batch", ffn_act="relu"),
        "lily_ffn": dict(name="lily", targets=["ffn"], rank=64, ne=4, routing="batch", ffn_act="relu"),
        "adaptformer": dict(name="adaptformer", targets=["ffn"], rank=32, scale=0.1),
    },
    "vim_s": {
        "lily_vim": _LILY_VIM,  # the paper's Lily_5^{4,8}: token routing on in_proj
        "lily_vim_sample": dict(_LILY_VIM, routing={"in_proj": "sample", "delta": "uniform"}),
    },
}


def method_config(backbone: str, method: str) -> lily.MethodOptions:
    try:
        return lily.method_config(METHODS[backbone][method])
    except KeyError:
        raise SystemExit(f"unknown method '{method}' for {backbone}; known: {', '.join(METHODS[backbone])}") from None


def build_backbone(backbone: str, image_size: int) -> torch.nn.Module:
    if backbone == "vit_b16":
        import timm
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                                 img_size=image_size, drop_path_rate=0.1)
    if backbone == "vim_s":
        from models.vim import vim_small
        return vim_small(num_classes=NUM_CLASSES, img_size=image_size, drop_path_rate=0.05)
    raise SystemExit(f"unknown backbone '{backbone}'; known: {', '.join(BACKBONES)}")


def adapted(base: torch.nn.Module, backbone: str, method: str) -> torch.nn.Module:
    """``base`` adapted by ``method`` in a copy that *shares* base's frozen weights (the head
    is the copy's own), so several methods fit in memory side by side."""
    memo = {id(p): p for n, p in base.named_parameters() if not n.startswith("head.")}
    model = copy.deepcopy(base, memo)
    return lily.adapt(model, method_config(backbone, method))


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero adapter weights (experts and up-projections start at zero), for output checks."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("head."):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def synthetic_split(n: int, image_size: int, seed: int = 0) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return SplitData(images, labels, get_task("cifar"), "bench", True, 0, "")


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as in the paper (lr 1e-3, weight decay 1e-4) over the trainable parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
