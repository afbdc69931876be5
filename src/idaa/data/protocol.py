"""The `Source` protocol: what every split of data offers the loops (in memory, streamed from files, or from
shards), and the row helpers the sources share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from idaa.data.options import StreamOptions

__all__ = ["Source", "rank_share", "row_indices"]


class Source(Protocol):
    """One split of a dataset as training and evaluation see it: `ImageDataset` (decoded in memory),
    `StreamingDataset` (decoded from its files as used) or `ShardSource` (decoded from WebDataset shards)."""

    name: str
    classes: list[str]
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    options: StreamOptions

    @property
    def image_size(self) -> int:
        """Side of the square uint8 images (or crops) the split yields."""

    @property
    def channels(self) -> int:
        """Colour channels (always 3)."""

    @property
    def images(self) -> Any:
        """The uint8 N x 3 x S x S images, or a stand-in decoding them on demand (shards refuse)."""

    def __len__(self) -> int:
        """Number of samples."""

    def take(self, n: int, seed: int = 0) -> Source:
        """Seeded class-balanced subset of n samples."""

    def subset(self, indices: Any) -> Source:
        """Samples at the given indices (or boolean mask)."""

    def labelled_share(self, rank: int, world: int, batch_size: int,
                       workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) batches of this rank's disjoint share, every sample once over the ranks."""


def rank_share(n: int, rank: int, world: int) -> slice:
    """The contiguous block of n items that `rank` of `world` handles (sizes differ by at most one)."""
    return slice(rank * n // world, (rank + 1) * n // world)


def row_indices(indices: Any, n: int) -> np.ndarray:
    """Index rows (int64) from a tensor, array, list, slice or boolean mask."""
    if isinstance(indices, slice):
        return np.arange(n)[indices]
    rows = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if rows.dtype == bool:
        return np.nonzero(rows)[0]
    return rows.astype(np.int64).reshape(-1)
