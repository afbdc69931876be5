"""Low-level readers shared by the dataset loaders: safe pickles, image decoding and the decode cache."""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idaa.errors import IdaaError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_VERSION = 2  # 2: EXIF orientation applied

# Globals a CIFAR pickle may reference; anything else is refused so a hostile pickle cannot run code.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class DataError(IdaaError, ValueError):
    """Bad or missing data; the message is one line that names the file or folder at fault."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: object) -> str:
    """Collapse any message to a single line so errors stay readable in logs and CLIs."""
    return " ".join(str(text).split())


def _reason(exc: BaseException) -> str:
    """Describe an exception in one line, falling back to its type when it has no message."""
    return one_line(exc) or type(exc).__name__


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers (what CIFAR pickles hold)."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the numpy globals CIFAR pickles need; refuse everything else."""
        canonical = module.replace("numpy._core", "numpy.core")
        if (canonical, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if canonical.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            canonical = canonical.replace("numpy.core", "numpy._core")
        return getattr(importlib.import_module(canonical), name)


def read_pickle(path: Path) -> dict:
    """Load a CIFAR-style pickle (bytes keys) safely, turning any parse failure into a DataError."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing file '{path}'") from None
    except OSError as exc:
        raise DataError(f"cannot read file '{path}': {_reason(exc)}") from exc
    except Exception as exc:  # pickle raises many types (EOFError, UnpicklingError, ValueError, ...)
        raise DataError(f"corrupt or truncated file '{path}': {_reason(exc)}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"corrupt file '{path}': expected a pickled dict, got {type(obj).__name__}")
    return obj


def pickle_field(obj: dict, key: str, path: Path) -> Any:
    """Fetch a field stored under a bytes or str key, naming the file when it is absent."""
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise DataError(f"corrupt file '{path}': no '{key}' entry")


def as_text(value: Any) -> str:
    """Decode a bytes class name from a python-2 pickle into str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def list_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Sorted image files under folder (hidden entries skipped), searched recursively by default."""
    found: list[str] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            raise DataError(f"cannot list folder '{current}': {_reason(exc)}") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if recursive:
                    stack.append(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(entry.path)
    return [Path(p) for p in sorted(found)]


def subfolders(folder: Path) -> list[Path]:
    """Sorted visible subdirectories of folder."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_labelled(
    root: Path, classes: Sequence[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """Collect root/<class>/** images with labels; classes default to the sorted subfolder names."""
    folders = subfolders(root)
    if classes is None:
        classes = [p.name for p in folders]
    index = {name: i for i, name in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        if folder.name not in index:
            raise DataError(f"class folder '{folder}' is not one of the {len(index)} training classes")
        images = list_images(folder)
        if not images:
            raise DataError(f"class folder '{folder}' contains no images ({'/'.join(IMAGE_EXTENSIONS)})")
        files.extend(images)
        labels.extend([index[folder.name]] * len(images))
    return files, labels, list(classes)


def _open_rgb(path: Path) -> np.ndarray:
    """Decode one image file to an H x W x 3 uint8 array (EXIF-oriented, any mode to RGB), naming it if unreadable."""
    from idaa.data.streaming import read_rgb  # the one decoder of both paths (lazy: streaming imports this module)

    return read_rgb(path)


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
    first = _open_rgb(files[0])
    shape = first.shape
    out = np.empty((len(files), 3, shape[0], shape[1]), dtype=np.uint8)
    out[0] = first.transpose(2, 0, 1)

    def fill(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            arr = _open_rgb(files[i])
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


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std in [0, 1] units, accumulated in float64 chunks to bound memory."""
    n = images.shape[0]
    if n == 0:
        raise DataError("cannot compute mean/std of an empty dataset")
    per_image = max(1, images[0].numel())
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(max(1, 2**22 // per_image)):
        x = chunk.to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    m, s = (mean / 255).tolist(), (std / 255).tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])
