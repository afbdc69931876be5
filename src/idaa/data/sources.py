"""Opening a split of data by name and folder: decoded into memory when small and uniform, else streamed from its
files, or from WebDataset shards; every kind is a `Source` (`idaa.data.protocol`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from idaa.data.layouts import layout_name, read_layout
from idaa.data.listing import IMAGE_EXTENSIONS, describe_files, image_stats
from idaa.data.memory import ImageDataset, load_dataset
from idaa.data.options import StreamOptions
from idaa.data.protocol import Source
from idaa.data.shards import ShardSource, is_shard_folder
from idaa.data.streamed import StreamingDataset
from idaa.errors import DataError

__all__ = ["open_dataset"]

SMALL_SIDE = 128  # uniform images up to this side (and within MEMORY_BYTES) are decoded whole into memory
MEMORY_BYTES = 4 << 30
DEFAULT_STREAM_SIZE = 224


def open_dataset(name: str, data_dir: str | Path | None = None, split: str = "train", download: bool = False,
                 options: StreamOptions | None = None, default_size: int | None = None,
                 like: Source | None = None) -> Source:
    """A split in memory or streamed: streamed when asked, or when its images differ in size, are large or many.

    `default_size` is the crop size when streaming without --image-size (e.g. a checkpoint's); `like` (the train
    split) makes a test split follow it: streamed at the same size with the same statistics, or in memory.
    """
    options = (options or StreamOptions()).validate()
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
    kept, sizes, digest = describe_files(root, split, files, labels, options.bad_images)
    files, labels = [files[i] for i in kept], [labels[i] for i in kept]
    if like is None and name == "folder" and not _should_stream(options, sizes):  # only folders fit in memory
        return load_dataset(name, data_dir, split=split, download=download)
    size = like.image_size if like is not None else options.image_size or (
        int(sizes[0, 0]) if _uniform(sizes) else default_size or DEFAULT_STREAM_SIZE)
    if like is not None:
        mean, std = like.mean, like.std
    elif split == "train":
        mean, std = image_stats(root, files, options.num_workers)
    else:
        train = open_dataset(name, data_dir, "train", options=replace(options, stream=True), default_size=size)
        mean, std = train.mean, train.std
    return StreamingDataset(files, torch.tensor(labels, dtype=torch.int64), classes, name, mean, std, size,
                            options, digest)


def _open_shards(folder: str | Path, split: str, options: StreamOptions, size: int | None) -> ShardSource:
    """A split of a WebDataset shard folder (`idaa data pack`): always streamed, cropped to --image-size."""
    return ShardSource(folder, split, options.image_size or size or DEFAULT_STREAM_SIZE, options)


def _file_listing(name: str, data_dir: str | Path | None, split: str,
                  options: StreamOptions) -> tuple[Path, list[str], list[int], list[str]] | None:
    """(root, files, labels, classes) of a folder or registered layout; None for data kept in binary files."""
    if layout_name(name) is None:
        return None
    if data_dir is None:
        raise DataError(f"--dataset {name} needs --data-dir pointing at its image folder")
    listing = read_layout(name, data_dir, split, options.test_fraction, options.seed)
    return Path(data_dir).expanduser(), [str(f) for f in listing.files], list(listing.labels), list(listing.classes)


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


