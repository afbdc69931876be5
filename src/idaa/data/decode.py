"""Streaming image decoding: files decoded in DataLoader workers into fixed-size uint8 crops, never held whole.

A sample's random-resized crops are drawn from the full-resolution image (EXIF orientation applied) with
randomness derived from (seed, epoch, index, view) alone, so 0, 1 or N workers, and a run resumed mid-epoch,
see the same crops. JPEGs are decoded at the smallest scale (1/2, 1/4, 1/8, as Pillow's draft) that still gives
every crop at least its output resolution, and a baseline JPEG only down to the lowest crop's bottom row; RGB and
greyscale JPEGs go straight from libjpeg-turbo to a numpy array (simplejpeg: Pillow's pixels, without its
per-image overhead), everything else through Pillow. Training
crops use libjpeg-turbo's fast IDCT and chroma upsampling (about a grey level off, 0-10% more crops/s measured);
evaluation crops and `read_rgb` are exact. The colour part of the views stays on the device (`views.py`).
"""

from __future__ import annotations

import io
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from idaa.data.formats import DataError
from idaa.devices import release_free_memory

try:  # a core dependency; without its wheel (an unusual platform) every file goes through Pillow
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

__all__ = ["BAD_IMAGES", "CropDataset", "EpochBatches", "center_crop", "channels_first", "collate_crops",
           "crop_views", "default_workers", "image_loader", "open_rgb", "oriented_size", "read_rgb", "stack_crops"]

BAD_IMAGES = ("error", "skip")
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's aspect-ratio range
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
# EXIF orientation -> the view of the stored H x W x C array that displays upright (ImageOps.exif_transpose's)
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1)}
Source = str | Path | BinaryIO
_SKIPPED_SCAN = re.compile(r"extraneous bytes before marker 0xd[0-79]\b")  # libjpeg's JWRN_EXTRANEOUS_DATA
_MARGIN = 16  # rows asked beyond a box: at a JPEG scale of 1/k its reduced pixels reach up to 2k rows lower


def default_workers() -> int:
    """Decoding processes when --workers is not given: the cores this process may use, less one for training."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def _name(source: Source) -> str:
    return str(source) if isinstance(source, str | Path) else str(getattr(source, "name", "<file object>"))


def _unreadable(name: str, exc: BaseException) -> DataError:
    return DataError(f"cannot read image '{name}': {' '.join(str(exc).split()) or type(exc).__name__}")


def _lazy(source: Source, name: str | None = None) -> Image.Image:
    """Open without decoding: size, mode and EXIF are read from the header only."""
    try:
        return Image.open(source)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise _unreadable(name or _name(source), exc) from None


class _Encoded:
    """One image file read once into memory: its header parsed lazily, its bytes kept for libjpeg-turbo."""

    def __init__(self, source: Source) -> None:
        self.name = _name(source)
        try:
            if isinstance(source, str | Path):
                with open(source, "rb", buffering=0) as file:  # unbuffered: one read, no pathlib parsing
                    self.data = file.readall()
            else:
                self.data = source.read()
        except OSError as exc:
            raise _unreadable(self.name, exc) from None
        stored, orientation, self._frame = _jpeg_header(self.data)
        self._img: Image.Image | None = None
        if stored is None:  # anything but a plain RGB/grey JPEG: Pillow reads the header, orientation too
            self.stored, self.orientation = self.img.size, _orientation(self.img)
            self.turbo = simplejpeg is not None and self.img.format == "JPEG" and self.img.mode in ("RGB", "L")
        else:
            self.stored, self.orientation, self.turbo = stored, orientation, True
        self.size = _displayed(self.stored, self.orientation)

    @property
    def img(self) -> Image.Image:
        """The file opened lazily by Pillow (header only), for what libjpeg-turbo does not decode."""
        if self._img is None:
            self._img = _lazy(io.BytesIO(self.data), self.name)
        return self._img

    def pixels(self, factor: float = 1.0, fast: bool = False, rows: int | None = None) -> tuple[np.ndarray, int]:
        """Upright RGB pixels (H x W x 3 uint8, possibly a strided view) at the JPEG scale that `factor` allows, and
        the height the whole image has at that scale.

        `fast`: libjpeg-turbo's fast integer IDCT and chroma upsampling by replication (RGB/grey JPEGs only), up to
        10% more 224 px crops/s (benchmarks/bench_data.py, machine-dependent) at about 1 grey level off; training only.
        `rows`: only the top `rows` rows (full resolution) are wanted, so a baseline JPEG may stop decoding below
        them (`_top_rows`); the pixels then hold at least those rows, the same as a whole decode gives.
        """
        request = _request(self.stored, factor)
        if self.turbo:  # libjpeg-turbo decodes it
            w, h = self.stored
            k = _reduction(self.stored, request)
            height = math.ceil(h / k)
            array = self._top_rows(k, fast, rows) if rows is not None and self.orientation == 1 else None
            if array is not None:
                return array, height
            try:  # strict: whatever libjpeg only warns about goes to Pillow, which decides as it always has
                array = simplejpeg.decode_jpeg(self.data, colorspace="RGB", fastdct=fast, fastupsample=fast,
                                               min_width=math.ceil(w / k) if k > 1 else 0,
                                               min_height=height if k > 1 else 0)
                array = _UPRIGHT.get(self.orientation, lambda a: a)(array)
                return array, array.shape[0]
            except ValueError:
                pass
        array = np.asarray(_decode(self.img, self.name, request))
        return array, array.shape[0]

    def _top_rows(self, k: int, fast: bool, rows: int) -> np.ndarray | None:
        """Decode a baseline JPEG only down to `rows` (plus one MCU row, so chroma upsampling sees what it sees in a
        whole decode), by lowering the frame height its header declares; None when that does not apply or saves
        nothing, or when libjpeg finds anything amiss in the rows it decodes (the whole decode then decides).

        libjpeg stops after the declared rows and then skips the rest of the scan to the next marker with a warning
        ("extraneous bytes before marker 0xd9"), which strict decoding raises after the pixels are in the buffer. A
        file cut short warns "premature end of JPEG file" instead and goes to the whole decode, which names it.
        """
        if self._frame is None:
            return None
        offset, mcu = self._frame
        w, h = self.stored
        keep = min(h, (math.ceil(rows / mcu) + 1) * mcu)
        if keep >= h:
            return None
        data = b"".join((self.data[:offset], keep.to_bytes(2, "big"), self.data[offset + 2:]))
        out = np.empty((math.ceil(keep / k), math.ceil(w / k), 3), np.uint8)
        try:
            simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast, buffer=out,
                                   min_width=out.shape[1] if k > 1 else 0, min_height=out.shape[0] if k > 1 else 0)
        except ValueError as exc:  # the skipped rest of the scan ends at a restart or the end marker: D0-D7, D9
            if not _SKIPPED_SCAN.search(str(exc)):
                return None
        return out


def _jpeg_header(data: bytes) -> tuple[tuple[int, int] | None, int, tuple[int, int] | None]:
    """What libjpeg-turbo can decode without Pillow: (width, height) and EXIF orientation of an RGB or greyscale
    JPEG, by libjpeg-turbo's header parse and `_exif_orientation` (~8x faster than Pillow's open and EXIF read);
    (None, 1) for every other file, whose header Pillow reads (CMYK, an unusual EXIF or XMP block, bomb check,
    errors). Third, for any baseline JPEG whose first scan holds every component, (offset of the frame's height
    field, rows per MCU), which lets `_Encoded._top_rows` stop decoding early; else None."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None, 1, None
    orientation, frame = _header_segments(data)
    if orientation is None:
        return None, 1, frame
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None, 1, None
    if colorspace not in ("Gray", "RGB", "YCbCr") or width * height > (Image.MAX_IMAGE_PIXELS or 2**62):
        return None, 1, None
    return (width, height), orientation, frame


def _header_segments(data: bytes) -> tuple[int | None, tuple[int, int] | None]:
    """Walk a JPEG's header segments up to its first scan: its EXIF orientation (1 without EXIF; None where Pillow
    must read it: several EXIF blocks, which Pillow joins, an XMP block, which Pillow may take it from, or an
    unusual layout), and for a baseline frame scanned in one pass (offset of its height field, rows per MCU)."""
    pos, frame, orientation, blocks = 2, None, 1, 0
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # start of scan: the header segments are over
            components = data[pos + 4] if pos + 4 < len(data) else 0
            return orientation, (frame[0], frame[1]) if frame is not None and components == frame[2] else None
        if marker == 0xE1:
            segment = data[pos + 4:pos + 2 + length]
            if segment.startswith(b"Exif\x00\x00"):
                blocks += 1
                orientation = _exif_orientation(segment[6:]) if blocks == 1 and orientation == 1 else None
            elif segment.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
                orientation = None
        if marker in (0xC0, 0xC1) and pos + 10 < len(data):  # baseline / extended sequential, Huffman coded
            count = data[pos + 9]  # then per component: id, sampling factors (horizontal << 4 | vertical), table
            sampling = data[pos + 11:pos + 10 + 3 * count:3]
            if len(sampling) == count and int.from_bytes(data[pos + 5:pos + 7], "big"):  # 0: height in a DNL
                frame = (pos + 5, 8 * max(1, *(v & 0x0F for v in sampling)), count)
        pos += 2 + length
    return None, None  # an unusual layout: let Pillow read it


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag (0x0112) of an EXIF block's first directory, 1 when absent, as Pillow reads it; None for
    anything out of the ordinary (a bad header or offset, another type or count), which Pillow then reads."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8 or int.from_bytes(tiff[2:4], order) != 42:
        return None
    first = int.from_bytes(tiff[4:8], order)
    if first + 2 > len(tiff):
        return None
    end = first + 2 + 12 * int.from_bytes(tiff[first:first + 2], order)
    if end > len(tiff):
        return None
    for entry in range(first + 2, end, 12):  # tag, type, count, value (a SHORT sits in its first two bytes)
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            if tiff[entry + 2:entry + 8] != (3).to_bytes(2, order) + (1).to_bytes(4, order):  # one SHORT
                return None
            return int.from_bytes(tiff[entry + 8:entry + 10], order) or 1  # 0 displays as stored, as in Pillow
    return 1


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        return 1


def _displayed(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """A stored (width, height) as displayed after the EXIF orientation."""
    return (size[1], size[0]) if orientation in _SWAPS_AXES else size


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation, from the header of a lazily opened image."""
    return _displayed(img.size, _orientation(img))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to RGB: EXIF transpose, 16-bit and float scaled to 8 bits, palette/alpha/CMYK converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit PNG/TIFF: keep the top 8 bits, not a clip
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")  # alpha dropped, as torchvision's loader does


def _decode(img: Image.Image, name: str, request: tuple[int, int] | None) -> Image.Image:
    """Decode a lazily opened image to RGB; `request` (stored orientation) lets a JPEG decode at a reduced scale."""
    try:
        if request is not None:
            img.draft(img.mode, request)  # a no-op except for JPEG
        img.load()
        return _to_rgb(img)
    except Exception as exc:  # truncated data, bad chunks, decoder errors...
        raise _unreadable(name, exc) from None


def _request(stored: tuple[int, int], factor: float) -> tuple[int, int] | None:
    """Draft size (stored orientation) for decoding at `factor` of the full resolution (None: full)."""
    if factor >= 1:
        return None
    w, h = stored
    return max(1, math.ceil(w * factor)), max(1, math.ceil(h * factor))


def _reduction(size: tuple[int, int], request: tuple[int, int] | None) -> int:
    """The JPEG scale divisor Pillow's draft picks for `request`: the largest of 1, 2, 4, 8 that still covers it."""
    if request is None:
        return 1
    fits = min(size[0] // request[0], size[1] // request[1])
    return next(k for k in (8, 4, 2, 1) if k <= max(1, fits))


def read_rgb(source: Source, min_side: int | None = None) -> np.ndarray:
    """Decode an image file (or file object) to upright RGB pixels (H x W x 3 uint8); raises DataError naming it.

    With `min_side`, a JPEG is decoded at the smallest scale whose shorter side is still >= min_side.
    """
    encoded = _Encoded(source)
    return np.ascontiguousarray(encoded.pixels(1.0 if min_side is None else min_side / max(1, min(encoded.size)))[0])


def open_rgb(source: Source, min_side: int | None = None) -> Image.Image:
    """`read_rgb` as a PIL image."""
    return Image.fromarray(read_rgb(source, min_side))


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


def collate_crops(samples: Sequence[tuple[torch.Tensor, int, int, str]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor, list[str]]:
    """`CropDataset` samples into (crops, labels, indices, errors), the crops stacked by `stack_crops`."""
    crops, labels, indices, errors = zip(*samples, strict=True)
    return stack_crops(crops), torch.tensor(labels), torch.tensor(indices), list(errors)


def crop_views(image: Image.Image | Source, index: int, epoch: int, seed: int, size: int,
               scale: tuple[float, float], views: int, fast_decode: bool = True) -> torch.Tensor:
    """`views` random-resized crops (views x 3 x size x size uint8, channels-last in memory) of one image, seeded by
    (seed, epoch, index, view).

    `image` is a decoded PIL image or a file (path or file object); a file is read once and decoded once, at the
    smallest JPEG scale at which every crop still has >= size pixels on each side. `fast_decode` (training crops'
    default) trades about one grey level of JPEG decoding accuracy for 0-10% more crops/s (`_Encoded.pixels`).
    """
    if isinstance(image, Image.Image):
        encoded, pixels = None, np.asarray(_to_rgb(image))
        full = (pixels.shape[1], pixels.shape[0])
    else:
        encoded = _Encoded(image)
        full = encoded.size
    boxes = [crop_boxes(full[0], full[1], _crop_rng(seed, epoch, index, view), scale) for view in range(views)]
    height = None
    if encoded is not None:
        pixels, height = encoded.pixels(size / max(1, min(min(b[2], b[3]) for b in boxes)), fast=fast_decode,
                                        rows=max(b[1] + b[3] for b in boxes) + _MARGIN)
    out = torch.empty((views, size, size, 3), dtype=torch.uint8)
    for view, box in enumerate(boxes):
        _resized(pixels, box, full, size, height, out[view])
    return out.permute(0, 3, 1, 2)


def center_crop(image: Image.Image | Source, size: int) -> torch.Tensor:
    """Evaluation transform: shorter side resized to `size`, centre size x size crop (3 x size x size uint8,
    channels-last in memory)."""
    if isinstance(image, Image.Image):
        pixels = np.asarray(_to_rgb(image))
        height = pixels.shape[0]
    else:
        encoded = _Encoded(image)
        w, h = encoded.size
        pixels, height = encoded.pixels(size / max(1, min(w, h)), rows=(h + min(w, h)) // 2 + _MARGIN)
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
