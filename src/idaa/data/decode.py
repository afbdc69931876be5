"""Image files to upright RGB pixels: JPEG (libjpeg-turbo, at a reduced scale when allowed), EXIF orientation, PNG
and every other Pillow format; nothing here crops or batches (`idaa.data.crops` does).

RGB and greyscale JPEGs go straight from libjpeg-turbo to a numpy array (simplejpeg: Pillow's pixels, without its
per-image overhead), everything else through Pillow. A JPEG may be decoded at the smallest scale (1/2, 1/4, 1/8, as
Pillow's draft) that a caller allows, and a baseline JPEG only down to the rows a caller needs.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from idaa.errors import DataError, exception_text

try:  # a core dependency; without its wheel (an unusual platform) every file goes through Pillow
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

__all__ = ["ROW_MARGIN", "EncodedImage", "ImageFile", "oriented_size", "read_rgb", "to_rgb"]

_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
# EXIF orientation -> the view of the stored H x W x C array that displays upright (ImageOps.exif_transpose's)
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1)}
ImageFile = str | Path | BinaryIO  # a path, or an open binary file (a shard's sample)
_SKIPPED_SCAN = re.compile(r"extraneous bytes before marker 0xd[0-79]\b")  # libjpeg's JWRN_EXTRANEOUS_DATA
ROW_MARGIN = 16  # rows asked beyond a box: at a JPEG scale of 1/k its reduced pixels reach up to 2k rows lower


def _name(image_file: ImageFile) -> str:
    return str(image_file) if isinstance(image_file, str | Path) else str(getattr(image_file, "name", "<file object>"))


def _unreadable(name: str, exc: BaseException) -> DataError:
    return DataError(f"cannot read image '{name}': {exception_text(exc)}")


def _lazy(image_file: ImageFile, name: str | None = None) -> Image.Image:
    """Open without decoding: size, mode and EXIF are read from the header only."""
    try:
        return Image.open(image_file)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise _unreadable(name or _name(image_file), exc) from None


class EncodedImage:
    """One image file read once into memory: its header parsed lazily, its bytes kept for libjpeg-turbo."""

    def __init__(self, image_file: ImageFile) -> None:
        self.name = _name(image_file)
        try:
            if isinstance(image_file, str | Path):
                with open(image_file, "rb", buffering=0) as file:  # unbuffered: one read, no pathlib parsing
                    self.data = file.readall()
            else:
                self.data = image_file.read()
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
    field, rows per MCU), which lets `EncodedImage._top_rows` stop decoding early; else None."""
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


def to_rgb(img: Image.Image) -> Image.Image:
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
        return to_rgb(img)
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


def read_rgb(image_file: ImageFile, min_side: int | None = None) -> np.ndarray:
    """Decode an image file (or file object) to upright RGB pixels (H x W x 3 uint8); raises DataError naming it.

    With `min_side`, a JPEG is decoded at the smallest scale whose shorter side is still >= min_side.
    """
    encoded = EncodedImage(image_file)
    return np.ascontiguousarray(encoded.pixels(1.0 if min_side is None else min_side / max(1, min(encoded.size)))[0])


