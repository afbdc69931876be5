"""Image sources: small uniform data decoded once into memory, anything else streamed from its files.

`open_dataset` returns an `ImageDataset` (uint8 tensor in RAM) or a `StreamingDataset` (a cached listing of
path, label and size, never the pixels). Both expose name, classes, labels, mean, std, image_size, channels,
take/subset and `images`; a streaming set's `images` is a `StreamedImages`, which supports what evaluation
does with a tensor (len, shape, split into uint8 batches in order, indexing, `.to(device)`), decoding centre
crops in DataLoader workers. Training batches come from `idaa.data.feeds`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idaa.data.datasets import ImageDataset, balanced_indices, load_dataset
from idaa.data.formats import IMAGE_EXTENSIONS, DataError
from idaa.data.streaming import BAD_IMAGES, CropDataset, EpochBatches, default_workers, image_loader
from idaa.data.unreadable import warn, without_unreadable

__all__ = ["StreamOptions", "StreamedImages", "StreamingDataset", "labelled_batches", "open_dataset"]

LISTING_VERSION = 1
SMALL_SIDE = 128  # uniform images up to this side (and within MEMORY_BYTES) are decoded whole into memory
MEMORY_BYTES = 4 << 30
DEFAULT_STREAM_SIZE = 224
STATS_IMAGES, STATS_SIDE = 2000, 64


@dataclass
class StreamOptions:
    """How images are read: --stream, --image-size, --workers, --bad-images (None = automatic/default)."""

    stream: bool | None = None
    image_size: int | None = None
    workers: int | None = None
    bad_images: str = "error"
    seed: int = 0
    test_fraction: float | None = None  # a single labelled folder: hold out this seeded share of each class

    def validate(self) -> StreamOptions:
        """One-line errors for impossible values before anything is read."""
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise DataError(f"--workers must be an integer >= 0, got {self.workers!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise DataError(f"--image-size must be an integer >= 8, got {self.image_size!r}")
        if self.test_fraction is not None and not (isinstance(self.test_fraction, int | float)
                                                   and 0 < self.test_fraction < 1):
            raise DataError(f"--test-fraction must be a number in (0, 1), got {self.test_fraction!r}")
        if self.bad_images not in BAD_IMAGES:
            raise DataError(f"--bad-images must be one of {', '.join(BAD_IMAGES)}, got {self.bad_images!r}")
        return self

    @property
    def num_workers(self) -> int:
        """Decoding processes: --workers, or a default from the cores."""
        return default_workers() if self.workers is None else self.workers


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
        rows = _rows(indices, len(self))
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
        return StreamedImages(self.data, self.rows[_rows(index, len(self.rows))])

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


Dataset = ImageDataset | StreamingDataset


def labelled_batches(data: Dataset, rows: slice, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) batches of `data[rows]` in order; a streamed image that does not decode is left out
    with its label under --bad-images skip (see `StreamedImages.labelled_split`)."""
    if isinstance(data, StreamingDataset):
        return data.images[rows].labelled_split(batch_size)
    return zip(data.images[rows].split(batch_size), data.labels[rows].split(batch_size), strict=True)


def open_dataset(name: str, data_dir: str | Path | None = None, split: str = "train", download: bool = False,
                 options: StreamOptions | None = None, default_size: int | None = None,
                 like: Dataset | None = None) -> Dataset:
    """A split in memory or streamed: streamed when asked, or when its images differ in size, are large or many.

    `default_size` is the crop size when streaming without --image-size (e.g. a checkpoint's); `like` (the train
    split) makes a test split follow it: streamed at the same size with the same statistics, or in memory.
    """
    options = (options or StreamOptions()).validate()
    from idaa.data.shards import is_shard_folder  # lazy: webdataset is only needed for shard folders

    if data_dir is not None and is_shard_folder(data_dir):
        return _open_shards(data_dir, split, options, like.image_size if like is not None else default_size)
    if isinstance(like, ImageDataset):
        return load_dataset(name, data_dir, split=split, download=download)
    listing = _file_listing(name, data_dir, split, options)
    if listing is None:  # data kept in one binary file (CIFAR pickles, STL-10, digits)
        data = load_dataset(name, data_dir, split=split, download=download)
        if options.stream:
            raise DataError(f"--stream needs image files; {data.name} is read from its binary release "
                            "(stream a copy with --dataset folder --data-dir DIR)")
        if options.image_size not in (None, data.image_size):
            raise DataError(f"--image-size {options.image_size}: {data.name} images are {data.image_size} px; "
                            "only streamed image folders are cropped to another size")
        return data
    root, files, labels, classes = listing
    if not files:
        raise DataError(f"folder '{root}' contains no images ({'/'.join(IMAGE_EXTENSIONS)})")
    kept, sizes, digest = _describe(root, split, files, labels, options.bad_images)
    files, labels = [files[i] for i in kept], [labels[i] for i in kept]
    if like is None and name == "folder" and not _should_stream(options, sizes):  # only folders fit in memory
        return load_dataset(name, data_dir, split=split, download=download)
    size = like.image_size if like is not None else options.image_size or (
        int(sizes[0, 0]) if _uniform(sizes) else default_size or DEFAULT_STREAM_SIZE)
    if like is not None:
        mean, std = like.mean, like.std
    elif split == "train":
        mean, std = _stats(root, files, digest, options)
    else:
        train = open_dataset(name, data_dir, "train", options=replace(options, stream=True), default_size=size)
        mean, std = train.mean, train.std
    return StreamingDataset(files, torch.tensor(labels, dtype=torch.int64), classes, name, mean, std, size,
                            options, digest)


def _open_shards(folder: str | Path, split: str, options: StreamOptions, size: int | None) -> Any:
    """A split of a WebDataset shard folder (`idaa data pack`): always streamed, cropped to --image-size."""
    from idaa.data.shards import ShardSource

    source = ShardSource(folder, split, image_size=options.image_size or size or DEFAULT_STREAM_SIZE)
    source.options = options
    return source


# ---------------------------------------------------------------- listing


def _file_listing(name: str, data_dir: str | Path | None, split: str,
                  options: StreamOptions) -> tuple[Path, list[str], list[int], list[str]] | None:
    """(root, files, labels, classes) of a folder or registered layout; None for data kept in binary files."""
    from idaa.data.layouts import layout_name, read_layout  # lazy: the layouts register many readers

    if layout_name(name) is None:
        return None
    if data_dir is None:
        raise DataError(f"--dataset {name} needs --data-dir pointing at its image folder")
    listing = read_layout(name, data_dir, split, options.test_fraction, options.seed)
    return Path(data_dir).expanduser(), [str(f) for f in listing.files], list(listing.labels), list(listing.classes)


def _describe(root: Path, split: str, files: list[str], labels: list[int],
              bad_images: str) -> tuple[list[int], np.ndarray, str]:
    """Readable rows, their (width, height) from the headers and a digest, with the headers cached by file."""
    from PIL import Image

    from idaa.data.streaming import oriented_size

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
            try:
                with Image.open(path) as img:
                    entry = [st.st_size, st.st_mtime_ns, *oriented_size(img)]
            except Exception:  # not an image, or an unreadable header
                entry = [st.st_size, st.st_mtime_ns, 0, 0]
        if entry[2] <= 0 and bad_images == "error":
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


def _uniform(sizes: np.ndarray) -> bool:
    return bool((sizes == sizes[0]).all()) and sizes[0, 0] == sizes[0, 1]


def _should_stream(options: StreamOptions, sizes: np.ndarray) -> bool:
    """Stream when asked, when sizes differ, when images are large or many, or for another crop size."""
    if options.stream is not None:
        return options.stream
    if options.test_fraction is not None:  # the held-out split is a listing: the in-memory cache knows no splits
        return True
    if options.bad_images == "skip" or not _uniform(sizes):
        return True
    side = int(sizes[0, 0])
    return side > SMALL_SIDE or len(sizes) * 3 * side * side > MEMORY_BYTES or options.image_size not in (None, side)


def _stats(root: Path, files: list[str], digest: str, options: StreamOptions) -> tuple[tuple, tuple]:
    """Per-channel mean/std of centre crops of a seeded sample of the listing, cached beside the listing.

    A file of its own: the listing of a 100k-image folder is ~100 MB of Python objects once parsed, and re-reading it
    here would grow the main process (and every worker forked from it) by as much.
    """
    cache_path = root / ".idaa-stats-train.json"
    saved = _read_json(cache_path).get("stats", {})
    if saved.get("digest") == digest:
        return tuple(saved["mean"]), tuple(saved["std"])
    rows = np.sort(np.random.default_rng(0).permutation(len(files))[:STATS_IMAGES])
    data = CropDataset([files[i] for i in rows], [0] * len(rows), STATS_SIDE)
    batches = EpochBatches()
    batches.set(None, [list(range(i, min(i + 100, len(rows)))) for i in range(0, len(rows), 100)])
    total, total_sq, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for crops, _, _, errors in image_loader(data, batches, min(options.num_workers, len(batches) - 1),
                                            torch.device("cpu")):
        x = crops[torch.tensor([not e for e in errors])].to(torch.float64) / 255
        total, total_sq, count = total + x.sum((0, 2, 3)), total_sq + (x * x).sum((0, 2, 3)), count + x[:, 0].numel()
    if count == 0:
        raise DataError(f"folder '{root}' contains no readable images")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    stats = {"digest": digest, "mean": mean.tolist(), "std": std.tolist()}
    _write_json(cache_path, {"stats": stats})
    return tuple(stats["mean"]), tuple(stats["std"])


def _rows(indices: Any, n: int) -> np.ndarray:
    """Index rows (int64) from a tensor, array, list, slice or boolean mask."""
    if isinstance(indices, slice):
        return np.arange(n)[indices]
    rows = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if rows.dtype == bool:
        return np.nonzero(rows)[0]
    return rows.astype(np.int64).reshape(-1)


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


def add_stream_arguments(parser: Any, image_size: bool = True) -> None:
    """The --stream/--image-size/--workers/--bad-images flags of every command that reads images."""
    parser.add_argument("--stream", action="store_true", default=None,
                        help="decode images from their files in worker processes (automatic for mixed or large)")
    if image_size:
        parser.add_argument("--image-size", type=int, default=None,
                            help="crop size of streamed images (default: their size if uniform, else 224)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes decoding streamed images (default: the cores less one)")
    parser.add_argument("--bad-images", default="error", choices=BAD_IMAGES,
                        help="error (default: stop, naming the file) or skip unreadable images")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="a single labelled folder: hold out this seeded share of every class as the test split")


def options_from(args: Any, seed: int = 0) -> StreamOptions:
    """StreamOptions from parsed --stream/--image-size/--workers/--bad-images flags."""
    return StreamOptions(args.stream, getattr(args, "image_size", None), args.workers, args.bad_images, seed,
                         getattr(args, "test_fraction", None)).validate()


def checkpoint_options(cfg: dict[str, Any], same_data: bool, given: StreamOptions | None = None) -> StreamOptions:
    """How evaluation reads data again: on the run's own data, its streaming choice and crop size by default."""
    given = given or StreamOptions()
    if not same_data:
        return given.validate()
    stream = given.stream if given.stream is not None else cfg.get("stream")
    test_fraction = given.test_fraction if given.test_fraction is not None else cfg.get("test_fraction")
    return replace(given, stream=stream, image_size=given.image_size or cfg.get("image_size"),
                   seed=cfg.get("seed", 0), test_fraction=test_fraction).validate()
