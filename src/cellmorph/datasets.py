"""From a tile cache to model-ready batches.

Batches are gathered straight from the memory-mapped plate arrays of a
:class:`~cellmorph.cache.TileCache` as uint8 (n, C, h, w). Everything after that
runs on whole batches on the training device, in :class:`InputPipeline`:

uint8 → float in [0, 1] → resize to the model's input size (only if the cache's
tiles differ; antialiased bilinear) → augmentation (training only) → normalise
with the model's mean/std.

Shuffling uses a seeded :class:`numpy.random.Generator`, so the batch order
depends only on the seed, never on worker timing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cellmorph.augment import Augmenter


def batch_order(
    n: int, batch_size: int, rng: np.random.Generator | None = None, min_last: int = 1
) -> list[np.ndarray]:
    """Positions 0..n-1 split into batches, shuffled when ``rng`` is given.

    A final batch smaller than ``min_last`` is dropped (training uses 2, because
    BatchNorm cannot normalise a batch of one).
    """
    order = rng.permutation(n) if rng is not None else np.arange(n)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < min_last and len(batches) > 1:
        batches.pop()
    return batches


class TileBatches(Dataset):
    """Item ``i`` is batch ``i``: uint8 tiles (torch) and the batch's positions in ``rows``."""

    def __init__(self, cache, rows: np.ndarray, batches: Sequence[np.ndarray]) -> None:
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.batches[i]
        tiles = self.cache.tiles(self.rows[positions])
        return torch.from_numpy(tiles), torch.from_numpy(np.asarray(positions, dtype=np.int64))


def iterate_batches(
    cache,
    rows: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None = None,
    num_workers: int = 0,
    min_last: int = 1,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 tiles, positions into ``rows``) in a seeded order.

    With ``num_workers`` > 0 batches are read by worker processes; the order is
    still fixed up front, so results do not depend on the number of workers.
    """
    batches = batch_order(len(rows), batch_size, rng, min_last)
    dataset = TileBatches(cache, rows, batches)
    if num_workers <= 0:
        for i in range(len(dataset)):
            tiles, positions = dataset[i]
            # Page-locked host memory lets the CUDA copy run asynchronously (non_blocking=True).
            yield (tiles.pin_memory() if pin_memory else tiles), positions
        return
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2,
    )
    yield from loader


def _size_tuple(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return size[-2:] if len(size) >= 2 else (size[0], size[0])


class InputPipeline(nn.Module):
    """uint8 batch → resized, (augmented,) normalised float batch."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int | Sequence[int],
        augmenter: Augmenter | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.input_size = _size_tuple(input_size)
        self.augmenter = augmenter

    @classmethod
    def from_spec(cls, spec, augmenter: Augmenter | None = None) -> "InputPipeline":
        """The pipeline a network's :class:`~cellmorph.models.InputSpec` asks for."""
        return cls(spec.mean, spec.std, spec.size, augmenter)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.to(self.mean.device, non_blocking=True).float().div_(255.0)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp_(0.0, 1.0)
        if self.augmenter is not None and self.training:
            x = self.augmenter(x)
        return (x - self.mean) / self.std
