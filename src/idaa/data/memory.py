"""The in-memory source: datasets decoded once into uint8 tensors with labels and class names (CIFAR, STL-10,
Tiny ImageNet, image folders, digits)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from idaa.data.download import ARCHIVES, download_and_extract
from idaa.data.folder_cache import load_image_files
from idaa.data.layouts.folder import read_folder
from idaa.data.listing import channel_stats, image_stats, list_images
from idaa.data.options import StreamOptions
from idaa.data.pickles import as_text, pickle_field, read_pickle
from idaa.data.protocol import rank_share
from idaa.errors import DataError

__all__ = ["DATASETS", "ImageDataset", "STATS", "balanced_indices", "load_dataset"]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "stl10", "tinyimagenet", "folder", "digits")

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]
STATS: dict[str, Stats] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}

_SPLITS = {name: ("train", "test") for name in DATASETS} | {"stl10": ("train", "test", "unlabeled")}
_SPLIT_ALIASES = {"unlabelled": "unlabeled", "val": "test"}
_STL_SIDE = 96
_STL_BYTES = 3 * _STL_SIDE * _STL_SIDE


@dataclass(repr=False, eq=False)
class ImageDataset:
    """A whole dataset held in memory as uint8 N x 3 x H x W images plus int64 labels (-1 = unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    options: StreamOptions = field(default_factory=StreamOptions)  # decoded already: only the seed and workers count

    def __post_init__(self) -> None:
        """Check the tensor layout once so every consumer can rely on it."""
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            shape = tuple(self.images.shape)
            raise DataError(f"images must be uint8 N x 3 x H x W, got {self.images.dtype} {shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}")
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64)
        self.classes = list(self.classes)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        """Short summary (the default dataclass repr would print every pixel)."""
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
            f"classes={len(self.classes)})"
        )

    @property
    def image_size(self) -> int:
        """Image height (images are expected square, so also the width)."""
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        """Number of colour channels (always 3)."""
        return int(self.images.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """Samples at the given indices (or boolean mask), keeping name, classes and normalisation."""
        idx = torch.as_tensor(indices)
        if idx.dtype != torch.bool:
            idx = idx.to(torch.int64).reshape(-1)
        return ImageDataset(
            images=self.images[idx].contiguous(),
            labels=self.labels[idx].clone(),
            classes=list(self.classes),
            name=self.name,
            mean=self.mean,
            std=self.std,
            options=self.options,
        )

    def take(self, n: int, seed: int = 0) -> ImageDataset:
        """Seeded random subset of n samples, spread evenly over labels so small subsets stay balanced."""
        if not 0 <= n <= len(self):
            raise DataError(f"cannot take {n} samples from {self.name} with {len(self)} samples")
        return self.subset(balanced_indices(self.labels, n, seed))

    def labelled_share(self, rank: int, world: int, batch_size: int,
                       workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) batches of this rank's block of rows, in order."""
        rows = rank_share(len(self), rank, world)
        return zip(self.images[rows].split(batch_size), self.labels[rows].split(batch_size), strict=True)


def balanced_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded random subset of n samples, spread evenly over labels (see ImageDataset.take)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)
    groups, group_of = torch.unique(labels, return_inverse=True)
    group_order = torch.randperm(len(groups), generator=gen)
    shuffled_groups = group_of[perm]
    # rank of each shuffled sample within its own group: 0 for the first one met, 1 for the next, ...
    order = torch.argsort(shuffled_groups, stable=True)
    rank = torch.empty_like(order)
    counts = torch.bincount(shuffled_groups, minlength=len(groups))
    starts = torch.cumsum(counts, 0) - counts
    rank[order] = torch.arange(len(order)) - starts[shuffled_groups[order]]
    key = rank * len(groups) + group_order[shuffled_groups]
    return torch.sort(perm[torch.argsort(key)[:n]]).values


def _default_data_dir() -> Path:
    """Data root used when none is given: $IDAA_DATA_DIR or ./data."""
    return Path(os.environ.get("IDAA_DATA_DIR", "data"))


def _normalise_name(name: str) -> str:
    """Accept spellings such as 'CIFAR-10' or 'tiny_imagenet' for the canonical dataset names."""
    key = re.sub(r"[-_ ]", "", str(name).strip().lower())
    if key not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    return key


def _normalise_split(name: str, split: str) -> str:
    """Validate split for a dataset ('val' and 'unlabelled' are accepted aliases)."""
    key = _SPLIT_ALIASES.get(str(split).strip().lower(), str(split).strip().lower())
    if key not in _SPLITS[name]:
        raise DataError(f"unknown split '{split}' for {name}; choose one of {', '.join(_SPLITS[name])}")
    return key


def _cifar_pickle_root(root: Path, name: str) -> Path | None:
    """Folder holding the CIFAR pickles: root/<archive folder> or root itself."""
    folder = ARCHIVES[name].folder
    marker = "batches.meta" if name == "cifar10" else "meta"
    if (root / folder).is_dir():
        return root / folder
    return root if root.is_dir() and ((root / marker).is_file() or root.name == folder) else None


def _jpg_root(root: Path, name: str) -> Path | None:
    """Folder with train/<class>/ and test/<class>/ image folders: root or root/<name>_jpg."""
    for base in (root, root / f"{name}_jpg"):
        if (base / "train").is_dir() and (base / "test").is_dir():
            return base
    return None


def _decode_folder(base: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a split of an image folder as the folder layout reads it (`read_folder`), cached beside the data."""
    listing = read_folder(base, split)
    return load_image_files(listing.files, listing.labels, listing.classes, base / f".idaa-cache-{split}.pt")


def _load_cifar(root: Path, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read CIFAR-10/100 python pickles, or fall back to a train/test JPEG folder copy."""
    folder = _cifar_pickle_root(root, name)
    if folder is None:
        base = _jpg_root(root, name)
        if base is not None:
            return _decode_folder(base, split)
        raise DataError(
            f"no {name} data in '{root}': expected '{ARCHIVES[name].folder}/' python pickles, "
            f"train/<class>/*.jpg + test/<class>/*.jpg or {name}_jpg/train/... (or pass download=True)"
        )
    if name == "cifar10":
        meta, names_key, labels_key = folder / "batches.meta", "label_names", "labels"
        if split == "train":
            batches = sorted(folder.glob("data_batch_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        else:
            batches = [folder / "test_batch"]
    else:
        meta, names_key, labels_key = folder / "meta", "fine_label_names", "fine_labels"
        batches = [folder / split]
    if not batches or not all(b.is_file() for b in batches):
        missing = batches[0] if batches else folder / "data_batch_1"
        raise DataError(f"missing file '{missing}' in {name} folder '{folder}'")
    classes = [as_text(c) for c in pickle_field(read_pickle(meta), names_key, meta)]
    images, labels = [], []
    for path in batches:
        batch = read_pickle(path)
        data = np.asarray(pickle_field(batch, "data", path))
        targets = np.asarray(pickle_field(batch, labels_key, path), dtype=np.int64).reshape(-1)
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DataError(f"corrupt file '{path}': data is {data.dtype} {data.shape}, not uint8 N x 3072")
        if len(targets) != len(data):
            raise DataError(f"corrupt file '{path}': {len(targets)} labels for {len(data)} images")
        if len(targets) and (targets.min() < 0 or targets.max() >= len(classes)):
            raise DataError(f"corrupt file '{path}': labels outside 0..{len(classes) - 1}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(targets))
    return torch.cat(images), torch.cat(labels), classes


def _read_stl_images(path: Path) -> torch.Tensor:
    """Read an STL-10 X file (column-major 3 x 96 x 96 per image) into N x 3 x 96 x 96 uint8."""
    if not path.is_file():
        raise DataError(f"missing file '{path}'")
    size = path.stat().st_size
    if size == 0 or size % _STL_BYTES:
        raise DataError(f"truncated file '{path}': {size} bytes is not a positive multiple of {_STL_BYTES}")
    n = size // _STL_BYTES
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 3, _STL_SIDE, _STL_SIDE))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read file '{path}': {exc}") from exc
    out = torch.empty((n, 3, _STL_SIDE, _STL_SIDE), dtype=torch.uint8)
    view = out.numpy()
    for lo in range(0, n, 4096):  # chunked copy keeps peak memory near the output size
        view[lo : lo + 4096] = raw[lo : lo + 4096].transpose(0, 1, 3, 2)
    del raw
    return out


def _load_stl10(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read the STL-10 binary release (labels 1..10 become 0..9; the unlabeled split gets -1)."""
    folder = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    if not (folder / f"{split}_X.bin").is_file() and not (folder / "class_names.txt").is_file():
        raise DataError(f"no stl10 data in '{root}': expected stl10_binary/{split}_X.bin (or download=True)")
    images = _read_stl_images(folder / f"{split}_X.bin")
    if split == "unlabeled":
        return images, torch.full((len(images),), -1, dtype=torch.int64), []
    names_file, y_file = folder / "class_names.txt", folder / f"{split}_y.bin"
    for path in (names_file, y_file):
        if not path.is_file():
            raise DataError(f"missing file '{path}'")
    classes = [line.strip() for line in names_file.read_text(errors="replace").splitlines() if line.strip()]
    labels = np.fromfile(y_file, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != len(images):
        raise DataError(f"truncated file '{y_file}': {len(labels)} labels for {len(images)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"corrupt file '{y_file}': labels outside 1..{len(classes)}")
    return images, torch.from_numpy(labels), classes


def _load_tinyimagenet(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read Tiny ImageNet (train/<wnid>/images, val/images + val_annotations.txt); 'test' is the val set."""
    folder = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"no tinyimagenet data in '{root}': expected tiny-imagenet-200/wnids.txt")
    wnids = sorted({w.strip() for w in wnids_file.read_text(errors="replace").split() if w.strip()})
    if not wnids:
        raise DataError(f"file '{wnids_file}' lists no classes")
    index = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if (folder / "words.txt").is_file():
        for line in (folder / "words.txt").read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    classes = [words.get(w) or w for w in wnids]
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for wnid in wnids:
            class_dir = folder / "train" / wnid / "images"
            if not class_dir.is_dir():
                raise DataError(f"data directory '{class_dir}' does not exist")
            images = list_images(class_dir, recursive=False)
            if not images:
                raise DataError(f"folder '{class_dir}' contains no images")
            files.extend(images)
            labels.extend([index[wnid]] * len(images))
    else:
        notes = folder / "val" / "val_annotations.txt"
        if not notes.is_file():
            raise DataError(f"missing file '{notes}'")
        for lineno, line in enumerate(notes.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1].strip() not in index:
                raise DataError(f"bad line {lineno} in '{notes}': expected '<file>\\t<wnid>' with known wnid")
            path = folder / "val" / "images" / parts[0].strip()
            if not path.is_file():
                raise DataError(f"missing image '{path}' listed in '{notes}'")
            files.append(path)
            labels.append(index[parts[1].strip()])
        if not files:
            raise DataError(f"file '{notes}' lists no images")
    return load_image_files(files, labels, classes, folder / f".idaa-cache-{split}.pt")


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """scikit-learn's 8x8 digits as 0..255 32x32 RGB with a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8))
    big = torch.nn.functional.interpolate(
        small[:, None].float(), size=(32, 32), mode="bilinear", align_corners=False
    )
    images = big.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).contiguous()
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    gen = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        test_mask[members[: round(0.2 * len(members))]] = True
    keep = test_mask if split == "test" else ~test_mask
    return images[keep].contiguous(), labels[keep], [str(c) for c in range(10)]


def _load_raw(name: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Dispatch to the reader for one dataset and split."""
    if name in ("cifar10", "cifar100"):
        return _load_cifar(root, name, split)
    if name == "stl10":
        return _load_stl10(root, split)
    if name == "tinyimagenet":
        return _load_tinyimagenet(root, split)
    return _decode_folder(root, split)  # a plain folder: its layout's one reader


def load_dataset(
    name: str, data_dir: str | Path | None = None, split: str = "train", download: bool = False
) -> ImageDataset:
    """Load a dataset split fully into memory as an ImageDataset (decoding images once, cached on disk)."""
    name = _normalise_name(name)
    split = _normalise_split(name, split)
    if name == "digits":
        images, labels, classes = _load_digits(split)
        stats = channel_stats(images if split == "train" else _load_digits("train")[0])
        return ImageDataset(images, labels, classes, name, *stats)
    if data_dir is None:
        if name == "folder":
            raise DataError("load_dataset('folder') needs data_dir pointing at an image folder")
        data_dir = _default_data_dir()
    root = Path(data_dir).expanduser()
    if download:
        if name not in ARCHIVES:
            raise DataError(f"download=True is not supported for {name}; only for {', '.join(ARCHIVES)}")
        if name == "stl10":
            has_local = (root / "stl10_binary").is_dir() or (root / "train_X.bin").is_file()
        else:
            has_local = _cifar_pickle_root(root, name) is not None or _jpg_root(root, name) is not None
        if not has_local:
            download_and_extract(name, root)
    if not root.exists():
        raise DataError(f"data directory '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"data directory '{root}' is not a directory")
    images, labels, classes = _load_raw(name, root, split)
    if len(images) == 0:
        raise DataError(f"{name} {split} split in '{root}' has no images")
    # a folder has the normalisation of its files, the same when streamed or packed into shards
    stats = image_stats(root, read_folder(root, "train").files) if name == "folder" else STATS[name]
    return ImageDataset(images, labels, classes, name, *stats)
