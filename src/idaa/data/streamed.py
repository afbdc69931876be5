"""A split streamed from its files: a listing of path, label and crop size, never the pixels.

A `StreamingDataset`'s `images` is a `StreamedImages`, which supports what evaluation does with a tensor (len, shape,
split into uint8 batches in order, indexing, `.to(device)`), decoding centre crops in DataLoader workers. Training
batches come from `idaa.data.feeds`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from idaa.data.crops import CropDataset, EpochBatches, image_loader
from idaa.data.memory import balanced_indices
from idaa.data.options import StreamOptions
from idaa.data.protocol import rank_share, row_indices
from idaa.data.unreadable import without_unreadable
from idaa.errors import DataError

__all__ = ["StreamedImages", "StreamingDataset"]


@dataclass(eq=False, repr=False)
class StreamingDataset:
    """A split read from its files as it is used: paths, labels, classes and the crop size, never pixels."""

    files: list[str]
    labels: torch.Tensor
    classes: list[str]
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    options: StreamOptions
    digest: str
    channels: int = field(default=3, init=False)

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.files)

    def __repr__(self) -> str:
        return (f"StreamingDataset(name={self.name!r}, n={len(self)}, crops={self.image_size}, "
                f"classes={len(self.classes)})")

    @property
    def images(self) -> StreamedImages:
        """Centre crops of every sample, decoded on demand (what evaluation uses in place of a tensor)."""
        return StreamedImages(self, np.arange(len(self)))

    def subset(self, indices: Any) -> StreamingDataset:
        """Samples at the given indices (or boolean mask)."""
        rows = row_indices(indices, len(self))
        digest = hashlib.sha1(f"{self.digest}|{rows.tobytes().hex()}".encode()).hexdigest()
        return replace(self, files=[self.files[i] for i in rows], labels=self.labels[torch.from_numpy(rows)],
                       digest=digest)

    def take(self, n: int, seed: int = 0) -> StreamingDataset:
        """Seeded class-balanced subset of n samples (the same choice as ImageDataset.take)."""
        if not 0 <= n <= len(self):
            raise DataError(f"cannot take {n} samples from {self.name} with {len(self)} samples")
        return self.subset(balanced_indices(self.labels, n, seed))

    def crop_dataset(self, scale: tuple[float, float] | None = None, views: int = 1) -> CropDataset:
        """The map-style dataset of this split: random crops (`scale`) or centre crops, at image_size."""
        return CropDataset(self.files, self.labels.tolist(), self.image_size, self.options.seed, scale, views)

    def labelled_share(self, rank: int, world: int, batch_size: int,
                       workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 centre crops, labels) of this rank's block; under --bad-images skip an image that does not decode
        is left out with its label (see `StreamedImages.labelled_split`)."""
        return self.images[rank_share(len(self), rank, world)].labelled_split(batch_size)


class StreamedImages:
    """Centre crops of some samples of a StreamingDataset, standing in for a uint8 N x 3 x S x S tensor."""

    dtype = torch.uint8

    def __init__(self, data: StreamingDataset, rows: np.ndarray) -> None:
        self.data, self.rows = data, rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 3, self.data.image_size, self.data.image_size))

    def __getitem__(self, index: Any) -> StreamedImages | torch.Tensor:
        if isinstance(index, int | np.integer):
            return next(StreamedImages(self.data, self.rows[[int(index)]]).split(1))[0]
        return StreamedImages(self.data, self.rows[row_indices(index, len(self.rows))])

    def split(self, batch_size: int, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """uint8 batches in order, decoded by DataLoader workers; a file that does not decode stops it (one line)."""
        for crops, _, _, errors in self._loader(batch_size, device):
            bad = next((e for e in errors if e), None)
            if bad:  # under skip, `unreadable.readable` left such files out first: this one changed since
                hint = "it changed after it was checked" if self.data.options.bad_images == "skip" else \
                    "--bad-images skip leaves it out"
                raise DataError(f"{bad} ({hint}; `idaa data check FOLDER` names every such file)")
            yield crops.contiguous()  # channels first, as the in-memory images are

    def labelled_split(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) batches in order; under --bad-images skip an image that does not decode is left
        out with its label (the kNN monitor's bank and queries), else it stops them as in `split`."""
        if self.data.options.bad_images != "skip":
            labels = self.data.labels[torch.from_numpy(self.rows)]
            yield from zip(self.split(batch_size), labels.split(batch_size), strict=True)
            return
        for crops, labels, _, _ in map(without_unreadable, self._loader(batch_size, None)):
            yield crops.contiguous(), labels

    def _loader(self, batch_size: int, device: torch.device | None) -> torch.utils.data.DataLoader:
        """(centre crops, labels, indices, errors) batches in order; a file that does not decode has an error."""
        batches = EpochBatches()
        batches.set(None, [self.rows[i:i + batch_size].tolist() for i in range(0, len(self.rows), batch_size)])
        workers = min(self.data.options.num_workers, max(len(batches) - 1, 0))
        return image_loader(self.data.crop_dataset(), batches, workers, device or torch.device("cpu"))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """Decode all of them into one tensor on `device` (for the few places that keep a set on the device)."""
        device = torch.device(device)
        parts = [chunk.to(device, non_blocking=non_blocking) for chunk in self.split(256, device)]
        if not parts:
            return torch.empty(self.shape, dtype=torch.uint8, device=device)
        return torch.cat(parts)

    def digest(self) -> str:
        """Identity of these crops for the feature cache: the listing, the rows and the crop size."""
        text = f"{self.data.digest}|{self.data.image_size}|{self.rows.tobytes().hex()}"
        return hashlib.sha1(text.encode()).hexdigest()
