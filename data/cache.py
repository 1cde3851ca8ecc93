"""Decode-once cache: a split's images as one uint8 ``.npy`` array, memory-mapped on reuse.

The key hashes what determines the decoded pixels that can be seen cheaply: the resolved
task folder (another data root is another cache entry), the list file's bytes, every listed
image's size and modification time (one ``stat`` per file, no read: an image rebuilt or
touched in place invalidates its split), the image size, the interpolation and a format
version (bumped when the decode changes). A hit is one memory-map.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

FORMAT_VERSION = 3  # 3: 16-bit grey images scaled to 8 bit (data/folder.py to_rgb), not clipped


def file_stats(paths) -> bytes:
    """Size and modification time (ns) of every file, packed: what the key sees of the images."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(out).encode()


def cache_path(cache_dir, task: str, split: str, image_size: int, interpolation: str,
               list_bytes: bytes, source: str = "", stats: bytes = b"") -> Path:
    """``<cache_dir>/<task>/<split>-<S>px-<interpolation>-<hash16>.npy``.

    ``source``: the resolved task folder; ``stats``: :func:`file_stats` of the listed images."""
    h = hashlib.sha256()
    for part in (f"v{FORMAT_VERSION}", str(image_size), interpolation, source):
        h.update(part.encode() + b"\0")
    h.update(list_bytes + b"\0")
    h.update(stats)
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
