"""Crops of decoded images, made in DataLoader workers: seeded random-resized crops and centre crops (uint8,
channels-last in memory), the batch sampler that carries the epoch, and the DataLoader that runs them.

A sample's random-resized crops are drawn from the full-resolution image (EXIF orientation applied) with
randomness derived from (seed, epoch, index, view) alone, so 0, 1 or N workers, and a run resumed mid-epoch,
see the same crops. A JPEG is decoded at the smallest scale that still gives every crop at least its output
resolution, and a baseline JPEG only down to the lowest crop's bottom row. Training crops use libjpeg-turbo's
fast IDCT and chroma upsampling (about a grey level off, 0-10% more crops/s measured); evaluation crops are
exact. The colour part of the views stays on the device (`views.py`).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from idaa.data.decode import ROW_MARGIN, EncodedImage, ImageFile, to_rgb
from idaa.devices import release_free_memory
from idaa.errors import DataError

__all__ = ["CropBatch", "CropDataset", "EpochBatches", "center_crop", "channels_first", "collate_crops",
           "crop_boxes", "crop_views", "image_loader", "stack_crops"]

_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's aspect-ratio range
# (uint8 crops channels-last in memory, labels, indices in the split, error per row: '' when the file decoded)
CropBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def crop_boxes(width: int, height: int, rng: random.Random,
               scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop box (x0, y0, w, h): 10 tries at area in `scale`, log-uniform aspect."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            return rng.randint(0, width - cw), rng.randint(0, height - ch), cw, ch
    cw, ch = width, height  # fallback: centre crop with the aspect clamped into range
    if width / height < _RATIO[0]:
        ch = round(width / _RATIO[0])
    elif width / height > _RATIO[1]:
        cw = round(height * _RATIO[1])
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def _crop_rng(seed: int, epoch: int, index: int, view: int) -> random.Random:
    """The generator of one crop, a function of (seed, epoch, index, view) alone; Python's Mersenne Twister seeded
    by an int is the same on every platform and version, and ten times cheaper to make than a numpy Generator."""
    return random.Random((((seed % 2**64) << 64 | epoch % 2**64) << 64 | index % 2**64) << 16 | view % 2**16)


def _resized(pixels: np.ndarray, box: Sequence[float], full: tuple[int, int], size: int,
             height: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The box (full-resolution coordinates) of possibly reduced pixels (H x W x 3), resized to 3 x size x size uint8;
    `height`: the whole reduced image's, when `pixels` are only its top rows. The result is channels-last in memory
    (a view of `out`, size x size x 3, when given): what the kernel writes fastest (see `stack_crops`).

    Antialiased bilinear, Pillow's filter (the same pixels up to rounding: < 0.1 grey level apart on average), by
    torch's uint8 kernel in about a third of Pillow's time; the box is rounded out to whole decoded pixels.
    """
    width, rows = pixels.shape[1], pixels.shape[0]
    fx, fy = width / full[0], (height or rows) / full[1]
    x0, y0, cw, ch = box
    left, top = min(int(x0 * fx), width - 1), min(int(y0 * fy), rows - 1)
    right = min(width, max(left + 1, math.ceil((x0 + cw) * fx - 1e-6)))
    bottom = min(rows, max(top + 1, math.ceil((y0 + ch) * fy - 1e-6)))
    region = pixels[top:bottom, left:right]
    if not (region.flags.c_contiguous and region.flags.writeable):
        region = region.copy()  # torch wants writable, contiguous h x w x 3 pixels (its fast uint8 kernel)
    if out is None:
        out = torch.empty((size, size, 3), dtype=torch.uint8)
    target = out.permute(2, 0, 1)[None]
    # Enlarging on both axes, the antialiased filter is plain bilinear (the same pixels, measured: none differ), and
    # torch's plain kernel is faster; about a third of 224 px crops of ~400 x 350 photos are enlarged.
    shrinks = region.shape[0] > size or region.shape[1] > size
    _RESIZE[shrinks](torch.from_numpy(region).permute(2, 0, 1)[None], [size, size], False, None, None, out=target)
    return target[0]


# F.interpolate's two kernels, called with a channels-last output: F.interpolate returns a single image channels
# first, which costs the uint8 kernel a last repacking pass (~30% of a 224 px resize, measured)
_RESIZE = {True: torch.ops.aten._upsample_bilinear2d_aa.out, False: torch.ops.aten.upsample_bilinear2d.out}


def stack_crops(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """Crops of one shape (... x 3 x S x S) stacked into a batch that is channels-last in memory, as `_resized`
    writes them, so stacking is a plain copy (torch's default collate, into shared memory in a worker); the
    training device puts channels first (`channels_first`)."""
    return torch.utils.data.default_collate([crop.movedim(-3, -1) for crop in crops]).movedim(-1, -3)


def channels_first(crops: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of crops on `device`, channels first in memory (contiguous) as the rest of training expects."""
    return crops.to(device, non_blocking=True).contiguous()


def collate_crops(samples: Sequence[tuple[torch.Tensor, int, int, str]]) -> CropBatch:
    """`CropDataset` samples into (crops, labels, indices, errors), the crops stacked by `stack_crops`."""
    crops, labels, indices, errors = zip(*samples, strict=True)
    return stack_crops(crops), torch.tensor(labels), torch.tensor(indices), list(errors)


def crop_views(image: Image.Image | ImageFile, index: int, epoch: int, seed: int, size: int,
               scale: tuple[float, float], views: int, fast_decode: bool = True) -> torch.Tensor:
    """`views` random-resized crops (views x 3 x size x size uint8, channels-last in memory) of one image, seeded by
    (seed, epoch, index, view).

    `image` is a decoded PIL image or a file (path or file object); a file is read once and decoded once, at the
    smallest JPEG scale at which every crop still has >= size pixels on each side. `fast_decode` (training crops'
    default) trades about one grey level of JPEG decoding accuracy for 0-10% more crops/s (`EncodedImage.pixels`).
    """
    if isinstance(image, Image.Image):
        encoded, pixels = None, np.asarray(to_rgb(image))
        full = (pixels.shape[1], pixels.shape[0])
    else:
        encoded = EncodedImage(image)
        full = encoded.size
    boxes = [crop_boxes(full[0], full[1], _crop_rng(seed, epoch, index, view), scale) for view in range(views)]
    height = None
    if encoded is not None:
        pixels, height = encoded.pixels(size / max(1, min(min(b[2], b[3]) for b in boxes)), fast=fast_decode,
                                        rows=max(b[1] + b[3] for b in boxes) + ROW_MARGIN)
    out = torch.empty((views, size, size, 3), dtype=torch.uint8)
    for view, box in enumerate(boxes):
        _resized(pixels, box, full, size, height, out[view])
    return out.permute(0, 3, 1, 2)


def center_crop(image: Image.Image | ImageFile, size: int) -> torch.Tensor:
    """Evaluation transform: shorter side resized to `size`, centre size x size crop (3 x size x size uint8,
    channels-last in memory)."""
    if isinstance(image, Image.Image):
        pixels = np.asarray(to_rgb(image))
        height = pixels.shape[0]
    else:
        encoded = EncodedImage(image)
        w, h = encoded.size
        pixels, height = encoded.pixels(size / max(1, min(w, h)), rows=(h + min(w, h)) // 2 + ROW_MARGIN)
    w, h = pixels.shape[1], height  # the (reduced) image's size; the square is taken in its pixels
    side = min(w, h)
    return _resized(pixels, ((w - side) // 2, (h - side) // 2, side, side), (w, h), size, h)


def image_loader(dataset: torch.utils.data.Dataset, batches: Any, workers: int, device: torch.device,
                 prefetch: int = 4) -> torch.utils.data.DataLoader:
    """A DataLoader for `dataset` over a batch sampler; pinned memory on CUDA, persistent prefetching workers.

    It has its own generator, so creating an iterator never draws from the global torch RNG (bit-exact resume);
    batches are (crops, labels, indices, errors), the crops channels-last in memory (`stack_crops`). With workers,
    the heap's free pages go back to the kernel first, so the forked workers do not inherit them.
    """
    extra = {"persistent_workers": True, "prefetch_factor": prefetch} if workers > 0 else {}
    if workers > 0:
        release_free_memory()
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_crops,
                                       pin_memory=device.type == "cuda", generator=torch.Generator(), **extra)


class CropDataset(torch.utils.data.Dataset):
    """Files -> uint8 crops: keys are (epoch, index) for `views` random crops, or an index for the centre crop.

    A sample is (crops, label, index, error): an unreadable file gives its error message (its validity flag) and
    blank pixels only to fill its row, which the caller never uses: it stops, or leaves the row out under
    --bad-images skip (`idaa.data.unreadable`), so there is no worker traceback and no zero image in training.
    """

    def __init__(self, files: Sequence[str | Path], labels: Sequence[int], size: int, seed: int = 0,
                 scale: tuple[float, float] | None = None, views: int = 1) -> None:
        # one byte buffer + offsets: worker processes read it without copy-on-write page duplication
        encoded = [os.fsencode(str(f)) for f in files]
        self._paths = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size, self.seed, self.scale, self.views = size, seed, scale, views

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        """The file of sample `index`."""
        start = int(self._ends[index - 1]) if index else 0
        return os.fsdecode(self._paths[start:int(self._ends[index])].tobytes())

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, str]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        shape = (self.views, 3, self.size, self.size) if self.scale else (3, self.size, self.size)
        try:
            if self.scale is None:
                crops = center_crop(self.path(index), self.size)
            else:
                crops = crop_views(self.path(index), index, epoch, self.seed, self.size, self.scale, self.views)
        except DataError as exc:
            return torch.zeros(shape, dtype=torch.uint8), int(self.labels[index]), index, str(exc)
        return crops, int(self.labels[index]), index, ""


class EpochBatches:
    """Batch sampler over an explicit list of index batches, set before each pass (keys carry the epoch)."""

    def __init__(self) -> None:
        self.epoch, self.rows = 0, []

    def set(self, epoch: int | None, rows: list[list[int]]) -> None:
        """The batches of the next pass; with an epoch, keys are (epoch, index) for seeded random crops."""
        self.epoch, self.rows = epoch, rows

    def __iter__(self) -> Iterator[list[Any]]:
        for row in self.rows:
            yield [(self.epoch, i) for i in row] if self.epoch is not None else list(row)

    def __len__(self) -> int:
        return len(self.rows)
