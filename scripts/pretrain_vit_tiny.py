"""Pretrain the tiny ViT of the offline demo (``backbone=vit_tiny``) on a glyph task it draws itself.

A frozen *random* backbone cannot carry the demo, and there is no download, so this
script makes the pretrained weights offline and deterministically:

Source task ("glyphs", 102 classes, no digits among them):
  - 38 letter classes: A-Z and the lowercase letters whose shape differs from their
    capital (a b d e f g h n q r t y), drawn with the font that ships with Pillow
    (``ImageFont.load_default``) at random stroke widths;
  - 64 pen-stroke classes: fixed random prototypes of 1-3 cubic Bezier strokes, each
    sample with jittered control points and pen width.
Every sample gets a random rotation / shear / aspect / offset, is fitted into a 32x32
box, binarised and reduced to 8x8 ink counts (0..16) -- the same acquisition as the UCI
handwritten digits that scikit-learn ships -- then written as 0..255 grayscale and
resized to the model's input size with PIL bicubic on RGB, pixels in [0, 1], no mean/std
normalisation: exactly what the demo's data pipeline does with the digits images.

The architecture (arch, img_size, model_kwargs) is read from
``configs/backbone/vit_tiny.yaml`` so the two cannot drift apart. The weights are saved
without the source-task head (the demo builds its own) as safetensors.

    python scripts/pretrain_vit_tiny.py            # writes assets/vit_tiny.safetensors

Deterministic for a given machine and thread count (fixed seeds,
``torch.use_deterministic_algorithms``); another CPU may differ in the last bits.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.vit import build_vit  # noqa: E402

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrty"
NUM_STROKE_CLASSES = 64
PROTOTYPE_SEED = 12345
CANVAS = 64                 # drawing canvas (px) before the glyph is fitted into 32x32
_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


# ---------------------------------------------------------------------------------------
# the source task
# ---------------------------------------------------------------------------------------
def _font(size: int):
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _bezier(p: np.ndarray, n: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t ** 2 * p[2] + t ** 3 * p[3]


def stroke_prototypes(k: int = NUM_STROKE_CLASSES, seed: int = PROTOTYPE_SEED) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.uniform(0.1, 0.9, size=(4, 2)) for _ in range(int(rng.integers(1, 4)))] for _ in range(k)]


def draw_letter(ch: str, rng: np.random.Generator) -> Image.Image:
    img = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(img).text((CANVAS // 2, CANVAS // 2), ch, fill=255, font=_font(40), anchor="mm",
                             stroke_width=int(rng.integers(1, 4)), stroke_fill=255)
    return img


def draw_strokes(proto: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(img)
    width = int(rng.integers(4, 9))
    for p in proto:
        pts = (_bezier(p + rng.normal(0.0, 0.04, size=p.shape)) * (CANVAS - 14) + 7)
        draw.line([tuple(x) for x in pts], fill=255, width=width, joint="curve")
        for x, y in (pts[0], pts[-1]):  # round pen ends
            draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    return img


def to_ink_counts(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Random rotation/shear/aspect/offset, fit into 32x32, binarise, 4x4 ink counts -> 8x8 uint8."""
    img = img.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, expand=True)
    w, h = img.size
    shear = rng.uniform(-0.3, 0.3)
    img = img.transform((w, h), Image.Transform.AFFINE, (1, shear, -shear * h / 2, 0, 1, 0),
                        resample=Image.Resampling.BILINEAR)
    box = img.getbbox()
    if box is None:
        return np.zeros((8, 8), np.uint8)
    glyph = img.crop(box)
    gw, gh = glyph.size
    th = rng.uniform(26, 32)
    tw = gw * th / gh * rng.uniform(0.8, 1.2)
    if tw > 30:
        th, tw = th * 30 / tw, 30.0
    tw, th = max(2, round(tw)), max(2, round(th))
    canvas = Image.new("L", (32, 32), 0)
    canvas.paste(glyph.resize((tw, th), Image.Resampling.BILINEAR),
                 ((32 - tw) // 2 + int(rng.integers(-1, 2)), (32 - th) // 2 + int(rng.integers(-1, 2))))
    counts = (np.asarray(canvas) >= 128).reshape(8, 4, 8, 4).sum((1, 3))
    return np.round(counts * (255 / 16)).astype(np.uint8)


def class_names() -> list[str]:
    return [f"letter_{c}" for c in LETTERS] + [f"strokes_{i:02d}" for i in range(NUM_STROKE_CLASSES)]


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples (8x8 uint8 ink images, labels) drawn with ``seed``; balanced classes."""
    rng = np.random.default_rng(seed)
    protos = stroke_prototypes()
    num_classes = len(LETTERS) + len(protos)
    labels = rng.permutation(np.arange(n) % num_classes)
    images = np.empty((n, 8, 8), np.uint8)
    for i, y in enumerate(labels):
        glyph = draw_letter(LETTERS[y], rng) if y < len(LETTERS) else draw_strokes(protos[y - len(LETTERS)], rng)
        images[i] = to_ink_counts(glyph, rng)
    return images, labels.astype(np.int64)


def to_model_input(images: np.ndarray, size: int) -> torch.Tensor:
    """8x8 uint8 -> (n, 3, size, size) float in [0, 1], as the demo's loader does (PIL RGB bicubic)."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255)


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def backbone_config(path: Path) -> dict:
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {**cfg, "pretrained": False, "checkpoint": None, "hub_name": None, "pre_logits": False}


@torch.no_grad()
def accuracy(model, x, y, batch=512) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "backbone" / "vit_tiny.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "vit_tiny.safetensors")
    ap.add_argument("--train-size", type=int, default=40800)
    ap.add_argument("--val-size", type=int, default=2040)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    cfg = backbone_config(args.config)
    size = int(cfg["img_size"])
    names = class_names()
    x_train, y_train = make_split(args.train_size, seed=args.seed * 2 + 1)
    x_val, y_val = make_split(args.val_size, seed=args.seed * 2 + 2)
    x_train, x_val = to_model_input(x_train, size), to_model_input(x_val, size)
    y_train, y_val = torch.from_numpy(y_train), torch.from_numpy(y_val)
    print(f"source task: {len(names)} glyph classes, {len(x_train)} train / {len(x_val)} val images "
          f"at {size}px, drawn in {time.time() - t0:.0f}s", flush=True)

    model, _ = build_vit(cfg, num_classes=len(names))
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    print(f"model: {cfg['arch']} {cfg['model_kwargs']} img_size={size}: {n_params / 1e6:.2f}M parameters "
          f"without the head", flush=True)

    steps_per_epoch = len(x_train) // args.batch_size
    total, warmup = steps_per_epoch * args.epochs, int(steps_per_epoch * args.warmup_epochs)
    def decays(name, p):  # no weight decay on biases, norms, pos_embed, cls_token
        return p.ndim > 1 and name not in ("pos_embed", "cls_token")

    params = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in params if decays(n, p)], "weight_decay": args.weight_decay},
                             {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}], lr=args.lr)

    def lr_factor(step):  # per-step linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    t_train = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        acc = accuracy(model, x_val, y_val)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {running / steps_per_epoch:.3f}, "
              f"val acc {acc:.4f}, {time.time() - t_train:.0f}s", flush=True)

    from safetensors.torch import save_file
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    meta = {
        "source_task": f"glyphs: {len(LETTERS)} letters + {NUM_STROKE_CLASSES} pen-stroke classes (no digits)",
        "arch": cfg["arch"], "img_size": str(size), "model_kwargs": json.dumps(cfg["model_kwargs"]),
        "val_acc": f"{acc:.4f}",
        "command": " ".join(["python scripts/pretrain_vit_tiny.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": json.dumps({k: str(v) for k, v in vars(args).items()}),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); source val acc {acc:.4f}; "
          f"total time {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
