"""The bundled offline demo task ``digits``, written in the VTAB-1k folder format.

scikit-learn ships 1797 handwritten digits (8x8, values 0..16, 10 classes). They are
written as 8x8 grayscale PNGs (scaled to 0..255; the loader resizes), split after a
fixed-seed permutation into train800 / val200 / train800val200 (own copies of those
1000) / test (the remaining 797), laid out as ``images/<split>/<idx:06d>.png``.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from data.registry import SPLITS, get_task
from common.errors import UserError

PERMUTATION_SEED = 0


def _split_indices(n: int) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(PERMUTATION_SEED).permutation(n)
    return {"train800": perm[:800], "val200": perm[800:1000],
            "train800val200": perm[:1000], "test": perm[1000:]}


def _incomplete(tdir: Path) -> str | None:
    """What makes ``tdir`` not a complete digits task (the file and why), or None."""
    task = get_task("digits")
    for split in SPLITS:
        f = tdir / f"{split}.txt"
        if not f.is_file():
            return f"{f} is missing"
        n = len(f.read_text().splitlines())
        if n != task.expected_size(split):
            return f"{f} lists {n} images, not {task.expected_size(split)}"
    return None


def _is_complete(tdir: Path) -> bool:
    return _incomplete(tdir) is None


def _write(tdir: Path) -> None:
    from sklearn.datasets import load_digits  # imported here: only needed once

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for split, idx in _split_indices(len(pixels)).items():
        (tdir / "images" / split).mkdir(parents=True)
        lines = []
        for j, i in enumerate(idx):
            rel = f"images/{split}/{j:06d}.png"
            Image.fromarray(pixels[i]).save(tdir / rel)  # 2-D uint8 -> grayscale "L"
            lines.append(f"{rel} {int(digits.target[i])}\n")
        (tdir / f"{split}.txt").write_text("".join(lines))


def ensure_digits(root) -> Path:
    """Write ``<root>/digits/`` unless it is already complete; return that folder.

    Built in a temp folder and renamed into place, so it is never seen half-written.
    """
    root = Path(root).expanduser()
    tdir = root / "digits"
    problem = _incomplete(tdir)
    if problem is None:
        return tdir
    if tdir.exists():
        raise UserError(f"'{tdir}' exists but is not a complete digits task ({problem}); delete it and run again.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".digits.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        _write(tmp)
        try:
            os.rename(tmp, tdir)
        except OSError:
            if not _is_complete(tdir):  # lost a race to another writer? then its copy is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tdir
