"""Decode-once cache: a split's images as one uint8 ``.npy`` array, memory-mapped on reuse.

The key hashes what determines the decoded pixels we can see cheaply: the list file's
bytes, the image size, the interpolation and a format version (bump it when the decode
changes). Image files edited in place are not noticed; delete the cache dir then.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


def cache_path(cache_dir, task: str, split: str, image_size: int, interpolation: str,
               list_bytes: bytes) -> Path:
    """``<cache_dir>/<task>/<split>-<S>px-<interpolation>-<hash16>.npy``."""
    h = hashlib.sha256()
    for part in (f"v{FORMAT_VERSION}", str(image_size), interpolation):
        h.update(part.encode() + b"\0")
    h.update(list_bytes)
    return Path(cache_dir) / task / f"{split}-{image_size}px-{interpolation}-{h.hexdigest()[:16]}.npy"


def open_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """Memory-map a finished cache file, or None if absent or not the expected array.

    Copy-on-write mode: the array is writable (so torch.from_numpy does not warn) but
    writes stay in private pages and never reach the file.
    """
    if not path.is_file():
        return None
    try:
        arr = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    return arr if arr.dtype == np.uint8 and arr.shape == shape else None


@contextlib.contextmanager
def atomic_memmap(path: Path, shape: tuple[int, ...]):
    """Yield a writable uint8 memmap that appears at ``path`` only if the block completes.

    Written to a temp file next to ``path`` and moved in place with os.replace, so an
    interrupted decode never leaves a partial cache (the temp file is removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        yield arr
        arr.flush()
        del arr
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
