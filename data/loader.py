"""Mini-batches straight from a memory-mapped split: no DataLoader, no augmentation
(VTAB-1k protocols train without it, vtab.md section 5). Normalize on the device."""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from data.folder import SplitData


class Batches:
    """Iterable of (images uint8 (B, 3, S, S), labels int64 (B,)) with a len().

    The order is a deterministic function of (seed, epoch) when shuffling.
    """

    def __init__(self, data: SplitData, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 epoch: int = 0, progress_desc: str | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.seed, self.epoch, self.progress_desc = seed, epoch, progress_desc

    def __len__(self) -> int:
        n = len(self.data.labels) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def order(self) -> torch.Tensor:
        n = len(self.data.labels)
        if not self.shuffle:
            return torch.arange(n)
        # SeedSequence mixes (seed, epoch) into one well-spread 63-bit seed.
        mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(mixed >> 1))
        return torch.randperm(n, generator=g)

    def __iter__(self):
        order, b = self.order(), self.batch_size
        it = (order[i * b:(i + 1) * b] for i in range(len(self)))
        if self.progress_desc is not None:
            it = tqdm(it, total=len(self), desc=self.progress_desc, unit="batch", leave=False)
        for idx in it:
            yield self.data.images[idx], self.data.labels[idx]


def batches(data: SplitData, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
            epoch: int = 0, progress_desc: str | None = None) -> Batches:
    """One epoch of mini-batches; see Batches."""
    return Batches(data, batch_size, shuffle, drop_last, seed, epoch, progress_desc)
