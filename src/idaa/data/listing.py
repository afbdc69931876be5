"""Listings of image files, never their pixels: folder scanning, the `Listing` of a split, the header cache of a
listing (sizes, readability, digest), and the one normalisation statistic of a set of image files.

The statistic is the same function for a folder read in memory, a streamed folder and the shards packed from it,
so the same images always get the same mean and std.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from idaa.data.crops import CropDataset, EpochBatches, image_loader
from idaa.data.decode import oriented_size
from idaa.errors import DataError, exception_text, warn

__all__ = ["IMAGE_EXTENSIONS", "Listing", "channel_stats", "describe_files", "image_stats", "list_images",
           "scan_labelled", "subfolders"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LISTING_VERSION = 1
STATS_IMAGES, STATS_SIDE = 2000, 64
Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass
class Listing:
    """One split of a collection: image paths, integer labels (-1 = unlabelled) and class names, never pixels."""

    files: list[Path]
    labels: list[int]
    classes: list[str] = field(default_factory=list)


def list_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Sorted image files under folder (hidden entries skipped), searched recursively by default."""
    found: list[str] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            raise DataError(f"cannot list folder '{current}': {exception_text(exc)}") from exc
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


def describe_files(root: Path, split: str, files: list[str], labels: list[int],
                   bad_images: str | None) -> tuple[list[int], np.ndarray, str]:
    """Readable rows, their (width, height) from the headers and a digest, with the headers cached by file."""
    cache_path = root / f".idaa-listing-{split}.json"
    cached = _read_json(cache_path).get("files", {})
    entries: dict[str, list[int]] = {}
    kept, sizes, bad = [], [], []
    digest = hashlib.sha1(f"v{LISTING_VERSION}|{len(files)}".encode())
    prefix = str(root) + os.sep
    for i, (path, label) in enumerate(zip(files, labels, strict=True)):
        rel = path.removeprefix(prefix)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read image '{path}': {exc.strerror}") from None
        entry = cached.get(rel)
        if entry is None or entry[:2] != [st.st_size, st.st_mtime_ns]:
            entry = [st.st_size, st.st_mtime_ns, *_header_size(path)]
        if entry[2] <= 0 and bad_images != "skip":
            raise DataError(f"cannot read image '{path}': not a readable image file (--bad-images skip leaves it out)")
        entries[rel] = entry
        digest.update(f"{rel}\0{label}\0{entry[0]}\0{entry[1]}\n".encode())
        if entry[2] <= 0:
            bad.append(path)
            continue
        kept.append(i)
        sizes.append(entry[2:])
    if entries != cached:
        _write_json(cache_path, {"files": entries})
    if bad:
        warn(f"skipped {len(bad)} unreadable file(s) in '{root}', e.g. '{bad[0]}'")
    if not kept:
        raise DataError(f"folder '{root}' contains no readable images")
    return kept, np.asarray(sizes, dtype=np.int64).reshape(-1, 2), digest.hexdigest()


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed, from the header alone; (0, 0) for a file that is no readable image."""
    try:
        with Image.open(path) as img:
            return oriented_size(img)
    except Exception:  # not an image, or an unreadable header
        return 0, 0


def image_stats(root: Path, files: Sequence[str | Path], workers: int = 0) -> Stats:
    """Per-channel mean/std of centre crops of a seeded sample of image files, cached beside them: THE normalisation
    of a folder, whether it is read in memory, streamed or packed into shards (so a VAE trained on one fits all).

    The crops are STATS_SIDE px, or the smallest sampled side when smaller, so small images are measured at their
    own resolution, not upsampled. The cache is a file of its own: the listing of a 100k-image folder is ~100 MB of
    Python objects once parsed, and re-reading it here would grow the main process (and its workers) by as much.
    """
    rows = np.sort(np.random.default_rng(0).permutation(len(files))[:STATS_IMAGES])
    picked = [str(files[i]) for i in rows]
    digest = _sample_digest(root, picked, len(files))
    cache_path = root / ".idaa-stats-train.json"
    saved = _read_json(cache_path).get("stats", {})
    if saved.get("digest") == digest:
        return tuple(saved["mean"]), tuple(saved["std"])
    sides = [min(size) for size in map(_header_size, picked) if min(size) > 0]
    side = min([STATS_SIDE, *sides])
    data = CropDataset(picked, [0] * len(picked), side)
    batches = EpochBatches()
    batches.set(None, [list(range(i, min(i + 100, len(picked)))) for i in range(0, len(picked), 100)])
    total, total_sq, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for crops, _, _, errors in image_loader(data, batches, min(workers, len(batches) - 1), torch.device("cpu")):
        x = crops[torch.tensor([not e for e in errors])].to(torch.float64) / 255
        total, total_sq, count = total + x.sum((0, 2, 3)), total_sq + (x * x).sum((0, 2, 3)), count + x[:, 0].numel()
    if count == 0:
        raise DataError(f"folder '{root}' contains no readable images")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    stats = {"digest": digest, "mean": mean.tolist(), "std": std.tolist()}
    _write_json(cache_path, {"stats": stats})
    return tuple(stats["mean"]), tuple(stats["std"])  # type: ignore[return-value]


def _sample_digest(root: Path, picked: list[str], total: int) -> str:
    """What the statistic depends on: the sampled files (relative names, sizes, times) and the listing's length."""
    digest = hashlib.sha1(f"v{LISTING_VERSION}|{total}".encode())
    prefix = str(root) + os.sep
    for path in picked:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read image '{path}': {exc.strerror}") from None
        digest.update(f"{path.removeprefix(prefix)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    digest.update(f"|side {STATS_SIDE}".encode())
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return blob if isinstance(blob, dict) and blob.get("version") == LISTING_VERSION else {}


def _write_json(path: Path, blob: dict[str, Any]) -> None:
    """Atomically write a listing cache; a read-only data folder simply goes uncached."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({**blob, "version": LISTING_VERSION}))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
