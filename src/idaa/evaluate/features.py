"""Frozen-backbone features, extracted once per (checkpoint, data, split, source, view) and cached in the run folder.

Linear evaluation, transfer and kNN all start from the same features of a frozen network, so they are written
to `<checkpoint folder>/feature-cache/` the first time and read back afterwards. The cache file stores the full
key it was made with (checkpoint content hash, dataset name and folder, a digest of the very images and
labels, split, feature source, view) and is only reused when every field matches, so a retrained checkpoint, a
different subset or another view can never be served stale features; a mismatching file is recomputed and
replaced.
"""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from idaa.data.memory import ImageDataset
from idaa.errors import WriteFault
from idaa.fileio import atomic_torch_save, file_digest, write_fault
from idaa.runlock import eval_lock

CACHE_FOLDER = "feature-cache"
CACHE_VERSION = 1
# a checkpoint on a read-only folder or filesystem is evaluated without a cache; a full disk (ENOSPC, EDQUOT)
# or an I/O error ends the evaluation as a WriteFault (exit 75)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)

Embed = Callable[[torch.Tensor], torch.Tensor]


def dataset_digest(data: ImageDataset) -> str:
    """sha1 of the images and labels themselves, so a subset, a reordering or changed files is a different key."""
    digest = hashlib.sha1()
    digest.update(str(tuple(data.images.shape)).encode())
    images = data.images
    # streamed images: the listing (paths, sizes, mtimes), the rows and the crop size stand for the pixels
    digest.update(images.digest().encode() if hasattr(images, "digest") else images.numpy().tobytes())
    digest.update(data.labels.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def extract_features(embed: Embed, images: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor],
                     device: torch.device, batch_size: int = 512, desc: str = "features",
                     progress: bool = False) -> torch.Tensor:
    """Features of every image (uint8, any device) through `view` then `embed`, on `device`, in order."""
    chunks = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        for chunk in images.split(batch_size):
            chunks.append(embed(view(chunk.to(device, non_blocking=True))).float())
            bar.update(len(chunk))
    return torch.cat(chunks)


@dataclass
class CachedFeatures:
    """Features of one split plus how they were obtained (`hit` = read from the cache, `seconds` = cost now)."""

    features: torch.Tensor
    hit: bool
    seconds: float
    path: Path | None


class FeatureCache:
    """The feature cache of one checkpoint; `get(...)` returns cached features or extracts and stores them."""

    def __init__(self, checkpoint: str | Path, enabled: bool = True) -> None:
        self.checkpoint = Path(checkpoint)
        self.folder = self.checkpoint.parent / CACHE_FOLDER
        self.checkpoint_sha256 = file_digest(self.checkpoint)
        self.enabled = enabled

    def key(self, data: ImageDataset, split: str, source: str, view: dict[str, Any],
            data_dir: str | None) -> dict[str, Any]:
        """Everything the features depend on; the cache file is reused only when all of it matches."""
        return {"version": CACHE_VERSION, "checkpoint_sha256": self.checkpoint_sha256, "dataset": data.name,
                "data_dir": str(Path(data_dir).resolve()) if data_dir else None, "split": split,
                "images": len(data), "data_sha1": dataset_digest(data), "features": source, "view": view}

    def path_for(self, data: ImageDataset, split: str, source: str, tag: str | None = None) -> Path:
        """One file per (checkpoint, dataset, split, size, source): a stale one is overwritten, not piled up.

        The image count keeps kNN's training-subset bank and the linear probe's full split in separate files.
        """
        name = f"{self.checkpoint.stem}.{tag or data.name}.{split}{len(data)}.{source}.pt"
        return self.folder / name

    def get(self, embed: Embed, data: ImageDataset, split: str, source: str, view_fn: Callable[[torch.Tensor],
            torch.Tensor], view: dict[str, Any], device: torch.device, data_dir: str | None = None,
            tag: str | None = None, batch_size: int = 512, progress: bool = False) -> CachedFeatures:
        """Features of `data` (in order), from the cache when its key matches, else extracted and cached."""
        key = self.key(data, split, source, view, data_dir)
        path = self.path_for(data, split, source, tag)
        start = time.perf_counter()
        if self.enabled and path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a torn or foreign file is simply recomputed
                blob = None
            if isinstance(blob, dict) and blob.get("key") == key and len(blob.get("features", ())) == len(data):
                return CachedFeatures(blob["features"], True, time.perf_counter() - start, path)
        features = extract_features(embed, data.images, view_fn, device, batch_size, f"{split} features",
                                    progress).cpu()
        seconds = time.perf_counter() - start
        if not self.enabled:
            return CachedFeatures(features, False, seconds, None)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with eval_lock(self.checkpoint.parent):  # evaluations take turns; training's RUN/.lock is not theirs
                atomic_torch_save({"key": key, "features": features}, path)
        except OSError as exc:
            fault = None if exc.errno in _READ_ONLY else write_fault(exc, "the feature cache", path)
            if fault is None:  # a read-only run folder still gets its evaluation, just without a cache
                return CachedFeatures(features, False, seconds, None)
            raise WriteFault(f"{fault}; the checkpoint and earlier caches are intact: evaluate again") from None
        return CachedFeatures(features, False, seconds, path)
