"""An image folder decoded once into one uint8 N x 3 x H x W tensor, cached beside the data under a fingerprint of
its listing (what the in-memory datasets load)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from idaa.data.decode import read_rgb
from idaa.errors import DataError

__all__ = ["CACHE_VERSION", "decode_images", "fingerprint", "load_image_files"]

CACHE_VERSION = 2  # 2: EXIF orientation applied


def _size_error(first: Path, first_shape: tuple, other: Path, other_shape: tuple) -> DataError:
    """Build the mixed-size error naming two files and their W x H sizes."""
    return DataError(
        f"images differ in size: '{first}' is {first_shape[1]}x{first_shape[0]} but '{other}' is "
        f"{other_shape[1]}x{other_shape[0]} (WxH); resize all images to one size before loading"
    )


def decode_images(files: Sequence[Path], workers: int | None = None) -> torch.Tensor:
    """Decode image files into one contiguous uint8 N x 3 x H x W tensor (all must share one size)."""
    if not files:
        raise DataError("no image files to decode")
    first = read_rgb(files[0])
    shape = first.shape
    out = np.empty((len(files), 3, shape[0], shape[1]), dtype=np.uint8)
    out[0] = first.transpose(2, 0, 1)

    def fill(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            arr = read_rgb(files[i])
            if arr.shape != shape:
                raise _size_error(files[0], shape, files[i], arr.shape)
            out[i] = arr.transpose(2, 0, 1)

    n = len(files)
    if workers is None:  # per-file Python overhead dominates small images, where threads only add contention
        workers = 1 if shape[0] * shape[1] < 64 * 64 else min(8, os.cpu_count() or 1)
    if workers <= 1 or n <= workers:
        fill(1, n)
    else:
        bounds = np.linspace(1, n, workers * 4 + 1).astype(int)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(fill, bounds[:-1], bounds[1:]):  # re-raises the earliest failing chunk
                pass
    return torch.from_numpy(out)


def fingerprint(files: Sequence[Path], labels: Sequence[int], classes: Sequence[str], base: Path) -> str:
    """Cheap key for a file listing: names, labels, count, total size and newest mtime."""
    digest = hashlib.sha1(f"v{CACHE_VERSION}|{len(files)}|{'/'.join(classes)}".encode())
    total, newest = 0, 0
    prefix = str(base) + os.sep
    for path, label in zip(files, labels, strict=True):
        name = str(path)
        st = os.stat(name)
        total += st.st_size
        newest = max(newest, st.st_mtime_ns)
        digest.update(f"{name.removeprefix(prefix)}\0{label}\n".encode())
    digest.update(f"|{total}|{newest}".encode())
    return digest.hexdigest()


def _read_cache(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """Return the cached decode if the file exists and matches key; any problem means a miss."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("fingerprint") != key:
            return None
        images, labels, classes = blob["images"], blob["labels"], list(blob["classes"])
    except Exception:  # stale, partial or foreign file: fall back to decoding
        return None
    if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        return None
    return images.contiguous(), labels.to(torch.int64), classes


def _write_cache(
    path: Path, key: str, images: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> None:
    """Atomically save a decode next to the data; silently skip when the folder is not writable."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"fingerprint": key, "images": images, "labels": labels, "classes": classes}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError):
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_image_files(
    files: Sequence[Path], labels: Sequence[int], classes: list[str], cache: Path | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode files (or reuse the cache file when its fingerprint matches) into images/labels/classes."""
    key = fingerprint(files, labels, classes, cache.parent) if cache is not None else ""
    if cache is not None:
        hit = _read_cache(cache, key)
        if hit is not None:
            return hit
    images = decode_images(files)
    label_tensor = torch.tensor(list(labels), dtype=torch.int64)
    if cache is not None:
        _write_cache(cache, key, images, label_tensor, classes)
    return images, label_tensor, classes


