"""The VTAB-1k folder format (vtab.md section 3), decoded once into a memory-mapped cache.

``<root>/<task>/<split>.txt`` holds lines ``relative/path label``; paths are relative to
``<root>/<task>/``. Each image is opened with PIL, converted to RGB and resized directly
to (S, S) (no crop, aspect not kept), as in NOAH/FacT/RepAdapter (vtab.md section 5);
16-bit grey images are scaled to 8 bit, not clipped (:func:`to_rgb`).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.cache import atomic_memmap, cache_path, file_stats, open_cached
from data.registry import SPLITS, Task, get_task
from common.errors import UserError

log = logging.getLogger(__name__)

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_CHUNK = 512  # images handed to the thread pool at a time (bounds memory in flight)
_HOW_TO_GET_DATA = (
    "Set paths.data_root=/path/to/vtab-1k (or the VTAB_ROOT environment variable) to the "
    "folder that holds the task folders, or build it with `python scripts/prepare_vtab.py`."
)


@dataclass
class SplitData:
    images: torch.Tensor   # uint8 (N, 3, S, S), memory-mapped from the cache file
    labels: torch.Tensor   # int64 (N,)
    task: Task
    split: str
    cache_hit: bool
    decoded: int           # images decoded by this call (0 on a cache hit)
    cache_path: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Entry:
    path: Path   # absolute image path
    label: int
    where: str   # "<list file>:<line>" for error messages


def task_dir(root, task: Task) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data root '{root}' does not exist. {_HOW_TO_GET_DATA}")
    tdir = root / task.name
    if not tdir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise UserError(
            f"task folder '{tdir}' not found (data root holds: {', '.join(present) or 'nothing'}). "
            f"Prepare task '{task.name}' with `python scripts/prepare_vtab.py`, or point "
            "paths.data_root (VTAB_ROOT) at the folder that holds it."
        )
    return tdir


def read_list(tdir: Path, task: Task, split: str) -> tuple[Path, bytes, list[Entry]]:
    """Parse and validate ``<split>.txt`` (format and label range) without touching images."""
    list_file = tdir / f"{split}.txt"
    if not list_file.is_file():
        raise UserError(
            f"list file '{list_file}' not found: a task folder needs "
            f"{', '.join(s + '.txt' for s in SPLITS)}. Re-create the task with "
            "`python scripts/prepare_vtab.py`."
        )
    raw = list_file.read_bytes()
    entries = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{list_file}:{lineno}"
        parts = line.split()
        try:
            label = int(parts[1]) if len(parts) == 2 else None
        except ValueError:
            label = None
        if label is None:
            raise UserError(
                f"{where}: malformed line {line!r}; expected '<relative/image/path> <integer label>' "
                "(paths must not contain spaces). Fix or re-create the list file."
            )
        if not 0 <= label < task.num_classes:
            raise UserError(
                f"{where}: label {label} out of range [0, {task.num_classes}) for task "
                f"'{task.name}' ({task.num_classes} classes). Is this the right task folder?"
            )
        entries.append(Entry(tdir / parts[0], label, where))
    if not entries:
        raise UserError(f"list file '{list_file}' is empty. Re-create the task with `python scripts/prepare_vtab.py`.")
    if len(entries) not in task.accepted_sizes(split):
        log.warning("%s: %d images, expected %d for %s/%s; continuing.",
                    list_file, len(entries), task.expected_size(split), task.name, split)
    elif len(entries) != task.expected_size(split):
        log.warning("%s: %d images (a known variant; the reference size is %d).",
                    list_file, len(entries), task.expected_size(split))
    return list_file, raw, entries


def to_rgb(im: Image.Image, entry: Entry) -> Image.Image:
    """``im`` as 8-bit RGB. 16-bit grey (``I;16*``, or ``I`` holding 0..65535) is scaled to 8 bit
    (v / 257, rounded: 65535 -> 255) instead of PIL's clipping ``convert``; a mode whose range
    cannot be known (float ``F``, ``I`` outside 16 bit) is refused with the file named."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise UserError(f"image '{entry.path}' (listed at {entry.where}) has 32-bit integer pixels outside "
                            "0..65535: its range cannot be mapped to 8 bit; convert it to 8-bit RGB or grey")
        grey = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "F":
        raise UserError(f"image '{entry.path}' (listed at {entry.where}) has floating-point pixels (mode F): "
                        "their range cannot be mapped to 8 bit; convert it to 8-bit RGB or grey")
    return im.convert("RGB")


def decode_image(entry: Entry, size: int, resample) -> np.ndarray:
    """One image as uint8 (3, size, size) (:func:`to_rgb`, then resized)."""
    try:
        with Image.open(entry.path) as im:
            im = to_rgb(im, entry).resize((size, size), resample)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(
            f"cannot read image '{entry.path}' (listed at {entry.where}): {e}. "
            "Replace the file or re-create the task with `python scripts/prepare_vtab.py`."
        ) from None
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def check_files(entries: list[Entry]) -> None:
    missing = [e for e in entries if not e.path.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} image file(s) listed but missing, first '{missing[0].path}' "
            f"(listed at {missing[0].where}). Re-create the task with `python scripts/prepare_vtab.py`."
        )


def _decode_into(out: np.ndarray, entries: list[Entry], size: int, resample,
                 num_workers: int, desc: str, progress: bool) -> None:
    decode = lambda e: decode_image(e, size, resample)  # noqa: E731
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        with tqdm(total=len(entries), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(entries), _CHUNK):
                chunk = entries[start:start + _CHUNK]
                for i, img in enumerate((pool.map if pool else map)(decode, chunk), start):
                    out[i] = img
                    bar.update()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def load_split(root, task, split: str, image_size: int, cache_dir, interpolation: str = "bicubic",
               num_workers: int = 0, progress: bool = True) -> SplitData:
    """Images and labels of one split, decoded on first use and memory-mapped afterwards."""
    task = task if isinstance(task, Task) else get_task(task)
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}.")
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation '{interpolation}'; expected one of {', '.join(INTERPOLATIONS)}.")
    if int(image_size) != image_size or image_size <= 0:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}.")
    image_size = int(image_size)

    tdir = task_dir(root, task)
    _, raw, entries = read_list(tdir, task, split)
    try:
        stats = file_stats(e.path for e in entries)
    except OSError:
        check_files(entries)  # names the missing file
        raise
    path = cache_path(cache_dir, task.name, split, image_size, interpolation, raw, str(tdir.resolve()), stats)
    shape = (len(entries), 3, image_size, image_size)
    images, decoded, t0 = open_cached(path, shape), 0, time.perf_counter()
    if images is None:
        check_files(entries)
        with atomic_memmap(path, shape) as out:
            _decode_into(out, entries, image_size, INTERPOLATIONS[interpolation], num_workers,
                         f"{task.name}/{split} decode", progress)
        images, decoded = open_cached(path, shape), len(entries)
        log.info("%s/%s: %d images, decoded %d in %.1fs -> %s", task.name, split, len(entries),
                 decoded, time.perf_counter() - t0, path)
    else:
        log.info("%s/%s: %d images, cache hit %s", task.name, split, len(entries), path)
    labels = torch.tensor([e.label for e in entries], dtype=torch.int64)
    return SplitData(torch.from_numpy(images), labels, task, split, decoded == 0, decoded, os.fspath(path))
