"""Training batches from any `Source`, so the training loops stay one loop: `make_feed(...).batches(epoch, order)`.

In memory, a batch is a slice of the device tensor and the view policy crops it on the device. Streamed, each
sample's random-resized crops (one per view) are made in DataLoader workers from the full-resolution file and
the view policy only adds flip and colour (`crop=False`); a batch's rows are `order[lo:lo + local]` for this rank,
so data-parallel ranks read disjoint shares of the epoch and a resume continues at any batch. From shards, the
shards decide the order (`order` only sets the epoch length).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from idaa import distributed as dist
from idaa.data.crops import EpochBatches, channels_first, image_loader
from idaa.data.memory import ImageDataset
from idaa.data.protocol import Source
from idaa.data.shards import ShardSource
from idaa.data.streamed import StreamingDataset
from idaa.data.unreadable import Screen
from idaa.data.views import crop_scale
from idaa.errors import DataError

__all__ = ["ShardFeed", "StreamFeed", "TensorFeed", "ViewBatch", "make_feed"]


class ViewBatch(NamedTuple):
    """uint8 images for the first view, the second view and the source of extra views (random-view), + indices."""

    first: torch.Tensor
    second: torch.Tensor
    source: torch.Tensor
    index: torch.Tensor


class TensorFeed:
    """Batches sliced from the whole dataset held on the device; the view policy does all of the cropping
    (`policy` and `views` are the streaming feeds' and unused here)."""

    crops = False  # batches are whole images: views crop them

    def __init__(self, data: ImageDataset, device: torch.device, batch_size: int, local_batch: int,
                 rank: int = 0, policy: str = "simclr", views: int = 2) -> None:
        self.images = data.images.to(device)
        self.batch_size, self.local_batch, self.rank = batch_size, local_batch, rank
        self.screen = Screen("error", device)  # decoded already: nothing is ever left out
        self.failure: str | None = None

    def batches(self, epoch: int, order: torch.Tensor, first: int = 0) -> Iterator[ViewBatch]:
        """The epoch's batches for this rank from batch `first` on."""
        for i in range(first, len(order) // self.batch_size):
            lo = i * self.batch_size + self.rank * self.local_batch
            rows = order[lo:lo + self.local_batch]
            batch = self.images[rows]
            yield ViewBatch(batch, batch, batch, rows)

    def end_epoch(self, write: Callable[[str], None] = print) -> dict[str, int]:
        """Nothing to report for data in memory."""
        return {}


class StreamFeed:
    """Batches of crops decoded from files in DataLoader workers, seeded by (seed, epoch, index, view)."""

    def __init__(self, data: StreamingDataset, device: torch.device, batch_size: int, local_batch: int,
                 rank: int = 0, policy: str = "simclr", views: int = 2) -> None:
        self.scale = crop_scale(policy)
        self.crops = self.scale is not None  # without a crop policy (FixMatch views) the worker centre-crops
        self.views = views if self.crops else 1
        self.data, self.device = data, device
        self.batch_size, self.local_batch, self.rank = batch_size, local_batch, rank
        self.sampler = EpochBatches()
        self.dataset = data.crop_dataset(self.scale, self.views)
        self.loader = image_loader(self.dataset, self.sampler, data.options.num_workers, device)
        self.screen = Screen(data.options.bad_images, device)

    @property
    def failure(self) -> str | None:
        """Why the last pass stopped early (an unreadable image under --bad-images error), or None."""
        return self.screen.failure

    def batches(self, epoch: int, order: torch.Tensor, first: int = 0) -> Iterator[ViewBatch]:
        """The epoch's batches for this rank from batch `first` on; stops early (setting `failure`) on a bad file."""
        order = order.cpu()
        rows = [order[i * self.batch_size + self.rank * self.local_batch:][:self.local_batch].tolist()
                for i in range(first, len(order) // self.batch_size)]
        self.sampler.set(epoch if self.crops else None, rows)
        yield from screened_batches(self, self.loader, self.views, first)

    def end_epoch(self, write: Callable[[str], None] = print) -> dict[str, int]:
        """The images left out this epoch under --bad-images skip ({} when none), with a warning."""
        return self.screen.report(write)


def screened_batches(feed: Any, loader: Any, views: int, first: int = 0) -> Iterator[ViewBatch]:
    """Device batches from a loader's (crops, labels, indices, errors) through `feed.screen`: stop on an unreadable
    image (every rank at the same step) or, under --bad-images skip, leave it out: the batch is shorter."""
    feed.screen.start(first)
    for crops, _, index, errors in loader:
        keep = feed.screen.keep(errors)
        if keep is None:
            return
        if not bool(keep.all()):
            crops, index = crops[keep], index[keep]
        crops = channels_first(crops, feed.device)
        if not feed.crops:
            yield ViewBatch(crops, crops, crops, index)
        else:
            yield ViewBatch(crops[:, 0], crops[:, 1 % views], crops[:, -1], index)


class ShardFeed:
    """Training batches streamed from shards, seeded like the folder stream; `order` only sets the epoch length,
    the shards decide the order."""

    def __init__(self, data: ShardSource, device: torch.device, batch_size: int, local_batch: int, rank: int = 0,
                 policy: str = "simclr", views: int = 2) -> None:
        options = data.options
        self.data, self.device, self.local_batch, self.rank, self.world = data, device, local_batch, rank, \
            dist.world_size()
        self.scale, self.views, self.workers, self.seed = crop_scale(policy), views, options.num_workers, options.seed
        self.crops = self.scale is not None
        self.screen = Screen(options.bad_images, device)
        data.check_readers(self.world, self.workers)

    @property
    def failure(self) -> str | None:
        """Why the last pass stopped early (an unreadable image under --bad-images error), or None."""
        return self.screen.failure

    def batches(self, epoch: int, order: torch.Tensor, first: int = 0) -> Iterator[ViewBatch]:
        """This rank's batches of `epoch` from batch `first` on; stops early (setting `failure`) on a bad image."""
        views = self.views if self.crops else 1
        loader = self.data.train_loader(epoch, self.seed, self.local_batch, self.rank, self.world, self.workers,
                                        self.scale, views, first)
        yield from screened_batches(self, loader, views, first)

    def end_epoch(self, write: Callable[[str], None] = print) -> dict[str, int]:
        """The images left out this epoch under --bad-images skip ({} when none), with a warning."""
        return self.screen.report(write)


Feed = TensorFeed | StreamFeed | ShardFeed
_FEEDS: dict[type, type[Feed]] = {ImageDataset: TensorFeed, StreamingDataset: StreamFeed, ShardSource: ShardFeed}


def make_feed(data: Source, device: torch.device, batch_size: int, local_batch: int | None = None,
              rank: int = 0, policy: str = "simclr", views: int = 2) -> Feed:
    """The feed of `data`'s kind (in memory, streamed, shards); `views` crops per sample when streaming (3 for
    random-view)."""
    return _FEEDS[type(data)](data, device, batch_size, local_batch or batch_size, rank, policy, views)


def stopped_by_bad_image(failure: str, checkpoint: str) -> DataError:
    """The one-line error of a run stopped by an unreadable file, saying how to continue."""
    return DataError(f"{failure}; saved {checkpoint}: replace the file, or pass --bad-images skip, then --resume")
