"""File listings of image collections in their published layouts (ImageNet, ImageNet-100, the transfer sets).

A reader turns a dataset folder into a `Listing` (paths, labels, class names) without opening an image, so the
streaming source, the shard packer and the transfer evaluation share one definition of every layout. What each
layout expects on disk is written in the reader's docstring and in the README's data section.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from idaa.data.formats import DataError, list_images, scan_labelled, subfolders

__all__ = ["LAYOUTS", "Listing", "has_test_split", "imagenet100_classes", "layout_name", "read_layout", "split_listing"]


@dataclass
class Listing:
    """One split of a collection: image paths, integer labels (-1 = unlabelled) and class names, never pixels."""

    files: list[Path]
    labels: list[int]
    classes: list[str] = field(default_factory=list)


Reader = Callable[[Path, str], Listing]
_WNID = re.compile(r"n\d{8}")
# where a flat ImageNet val/ folder's labels may be, in the order they are tried (relative to the dataset root)
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val.txt", "val_labels.txt", "ILSVRC2012_validation_ground_truth.txt",
                   "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")


def imagenet100_classes() -> list[str]:
    """The 100 WordNet ids of ImageNet-100 (CMC's subset, used by CLAE and IDAA), shipped with the package."""
    text = resources.files("idaa.data").joinpath("imagenet100.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _imagenet_base(root: Path) -> Path:
    """The folder holding train/: the root itself or Kaggle's ILSVRC/Data/CLS-LOC."""
    for base in (root, root / "ILSVRC" / "Data" / "CLS-LOC", root / "imagenet"):
        if (base / "train").is_dir():
            return base
    raise DataError(f"no ImageNet data in '{root}': expected train/<wnid>/*.JPEG (and val/)")


def _read_imagenet(root: Path, split: str, wanted: list[str] | None = None) -> Listing:
    """ImageNet: train/<wnid>/*.JPEG; val/ as <wnid>/ folders, or flat with a labels file (VAL_LABEL_FILES).

    `wanted` restricts the classes (ImageNet-100 read from a full ImageNet folder); labels index `wanted`.
    """
    base = _imagenet_base(root)
    present = [p.name for p in subfolders(base / "train")]
    if not present:
        raise DataError(f"folder '{base / 'train'}' has no <wnid>/ class folders")
    classes = present if wanted is None else wanted
    if wanted is not None:
        missing = sorted(set(wanted) - set(present))
        if missing:
            raise DataError(f"folder '{base / 'train'}' lacks {len(missing)} of the {len(wanted)} classes, "
                            f"e.g. '{missing[0]}'")
    if split == "train":
        return _class_folders(base / "train", classes)
    val = base / "val"
    if not val.is_dir():
        raise DataError(f"no ImageNet validation folder '{val}'")
    if subfolders(val):
        known = set(classes) if wanted is None else set(present)
        unknown = [p.name for p in subfolders(val) if p.name not in known]
        if unknown:
            raise DataError(f"class folder '{val / unknown[0]}' is not one of the classes in '{base / 'train'}'")
        return _class_folders(val, [c for c in classes if (val / c).is_dir()], classes)
    return _flat_val(root, base, val, classes, present, restricted=wanted is not None)


def _class_folders(folder: Path, names: list[str], classes: list[str] | None = None) -> Listing:
    """Images of folder/<name>/ for each name, labelled by position in `classes` (default: names)."""
    classes = classes if classes is not None else names
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for name in names:
        images = list_images(folder / name)
        if not images:
            raise DataError(f"class folder '{folder / name}' contains no images")
        files += images
        labels += [index[name]] * len(images)
    return Listing(files, labels, list(classes))


def _flat_val(root: Path, base: Path, val: Path, classes: list[str], present: list[str],
              restricted: bool) -> Listing:
    """A flat val/ folder labelled by the first labels file found.

    Images of classes outside `classes` are dropped when `restricted` (ImageNet-100) and an error otherwise.
    """
    images = list_images(val, recursive=False)
    if not images:
        raise DataError(f"ImageNet validation folder '{val}' contains no images")
    labels_file = next((d / n for d in dict.fromkeys((root, base, val)) for n in VAL_LABEL_FILES
                        if (d / n).is_file()), None)
    if labels_file is None:
        raise DataError(f"flat ImageNet validation folder '{val}' needs a labels file in '{root}': one of "
                        f"{', '.join(VAL_LABEL_FILES)} (or put val images in <wnid>/ folders)")
    by_name = _val_labels(labels_file, present)
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for path in images:
        wnid = by_name.get(path.stem)
        if wnid is None:
            raise DataError(f"image '{path}' has no label in '{labels_file}'")
        if wnid in index:
            files.append(path)
            labels.append(index[wnid])
        elif not restricted:
            raise DataError(f"labels file '{labels_file}' names class '{wnid}' for '{path.name}', which has no "
                            f"folder in '{base / 'train'}'")
    return Listing(files, labels, list(classes))


def _val_labels(path: Path, present: list[str]) -> dict[str, str]:
    """Image stem -> wnid from LOC_val_solution.csv, '<file> <wnid|index>' lines or the devkit's ground truth."""
    text = path.read_text(errors="replace")
    if path.suffix == ".csv":  # Kaggle: ImageId,PredictionString with the wnid first in the prediction string
        rows = list(csv.reader(text.splitlines()))[1:]
        pairs = [(r[0].strip(), r[1].split()[0]) for r in rows if len(r) >= 2 and r[1].split()]
        if len(pairs) != len([r for r in rows if r]):
            raise DataError(f"labels file '{path}' is not ImageId,PredictionString rows")
        return dict(pairs)
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if path.name == "ILSVRC2012_validation_ground_truth.txt":
        ids = _devkit_wnids(path)
        try:
            return {f"ILSVRC2012_val_{i:08d}": ids[int(row[0])] for i, row in enumerate(lines, 1)}
        except (KeyError, ValueError):
            raise DataError(f"labels file '{path}' holds an id that meta.mat does not define") from None
    out: dict[str, str] = {}
    for lineno, row in enumerate(lines, 1):
        if len(row) < 2:
            raise DataError(f"bad line {lineno} in '{path}': expected '<file> <wnid>'")
        label = row[1]
        if label.isdigit():  # Caffe's val.txt: an index into the sorted 1000 wnids
            if len(present) != 1000 or int(label) >= 1000:
                raise DataError(f"'{path}' gives numeric labels, which index the sorted 1000 ImageNet classes; "
                                f"'train/' has {len(present)} class folders")
            label = present[int(label)]
        elif not _WNID.fullmatch(label):
            raise DataError(f"bad line {lineno} in '{path}': '{label}' is not a WordNet id like n01440764")
        out[Path(row[0]).stem] = label
    return out


def _devkit_wnids(ground_truth: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1000 leaf classes, read from the devkit's meta.mat beside the ground truth."""
    meta = ground_truth.parent / "meta.mat"
    if not meta.is_file():
        raise DataError(f"'{ground_truth}' holds devkit class ids; it needs the devkit's '{meta.name}' beside it")
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        rows = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), int(s["num_children"])) for s in synsets]
    except Exception as exc:  # scipy raises many types for a foreign or truncated file
        raise DataError(f"cannot read '{meta}': {exc}") from None
    return {i: wnid for i, wnid, children in rows if children == 0}


def _read_imagenet100(root: Path, split: str) -> Listing:
    """ImageNet-100: a full ImageNet folder (or a copy holding only these classes), restricted to CMC's 100."""
    return _read_imagenet(root, split, sorted(imagenet100_classes()))


def _read_folder(root: Path, split: str) -> Listing:
    """root/{train,test}/<class>/*, a single labelled root/<class>/* (train only) or a flat unlabelled root/*."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [p.name for p in subfolders(root / "train")]
        if not classes:
            raise DataError(f"folder '{root / 'train'}' has no class subfolders (expected train/<class>/*.jpg)")
        files, labels, classes = scan_labelled(root / split, classes)
        if not files:
            raise DataError(f"folder '{root / split}' contains no images")
        return Listing(files, labels, classes)
    if split != "train":
        raise DataError(f"folder '{root}' has no train/ and test/ subfolders; hold out a seeded part of it "
                        "with --test-fraction F")
    if subfolders(root):
        return Listing(*scan_labelled(root))
    files = list_images(root, recursive=False)
    if not files:
        raise DataError(f"folder '{root}' is empty: expected <class>/*.jpg subfolders or .jpg/.png/... files")
    return Listing(files, [-1] * len(files), [])


def split_listing(listing: Listing, test_fraction: float, seed: int = 0) -> tuple[Listing, Listing]:
    """(train, test) parts of one listing: a seeded share of every class is held out (of all images if unlabelled).

    The draw depends on the seed and the sorted file list only, so every process and every rerun agrees.
    """
    if not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    labels = torch.tensor(listing.labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        count = min(round(test_fraction * len(members)), len(members) - 1)  # every class keeps a training image
        held[members[:count]] = True
    if not held.any():
        raise DataError(f"--test-fraction {test_fraction} holds out no image of the {len(labels)}")

    def part(mask: torch.Tensor) -> Listing:
        keep = torch.nonzero(mask).flatten().tolist()
        return Listing([listing.files[i] for i in keep], [listing.labels[i] for i in keep], list(listing.classes))

    return part(~held), part(held)


def _transfer(name: str) -> Reader:
    """A reader from layouts_transfer, imported on first use (it imports Listing from here)."""

    def read(root: Path, split: str) -> Listing:
        from idaa.data import layouts_transfer

        return getattr(layouts_transfer, name)(root, split)

    read.__doc__ = f"See idaa.data.layouts_transfer.{name}."
    return read


# name -> reader(root, split) -> Listing; split is "train" or "test" (a layout's "val" counts as "test")
LAYOUTS: dict[str, Reader] = {
    "imagenet": _read_imagenet,
    "imagenet100": _read_imagenet100,
    "folder": _read_folder,
    "aircraft": _transfer("read_aircraft"),
    "birdsnap": _transfer("read_birdsnap"),
    "cub200": _transfer("read_cub200"),
    "dtd": _transfer("read_dtd"),
    "flowers102": _transfer("read_flowers102"),
    "pets": _transfer("read_pets"),
}
ALIASES = {"imagenet1k": "imagenet", "ilsvrc2012": "imagenet", "fgvcaircraft": "aircraft", "cub": "cub200",
           "cub2002011": "cub200", "oxfordpets": "pets", "oxfordiiitpet": "pets", "flowers": "flowers102",
           "oxfordflowers102": "flowers102"}


def layout_name(name: str) -> str | None:
    """The canonical layout for a spelling such as 'ImageNet-100' or 'fgvc_aircraft', or None if there is none."""
    key = re.sub(r"[-_ ]", "", str(name).strip().lower())
    key = ALIASES.get(key, key)
    return key if key in LAYOUTS else None


def has_test_split(name: str, root: str | Path, test_fraction: float | None = None) -> bool:
    """Whether a test split exists: every published layout has one; a folder needs train/ + test/ or a fraction."""
    root = Path(root).expanduser()
    if layout_name(name) != "folder" or test_fraction is not None:
        return True
    return (root / "train").is_dir() and (root / "test").is_dir()


def read_layout(name: str, root: str | Path, split: str = "train", test_fraction: float | None = None,
                seed: int = 0) -> Listing:
    """The listing of one split of a dataset folder; `test_fraction` holds out a seeded part of a single folder."""
    layout = layout_name(name)
    if layout is None:
        raise DataError(f"unknown dataset layout '{name}'; choose one of {', '.join(LAYOUTS)}")
    split = {"val": "test"}.get(split, split)
    if split not in ("train", "test"):
        raise DataError(f"unknown split '{split}' for {layout}; choose train or test")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory '{root}' does not exist" if not root.exists() else
                        f"data directory '{root}' is not a directory")
    if test_fraction is None:
        listing = LAYOUTS[layout](root, split)
    elif layout != "folder" or ((root / "train").is_dir() and (root / "test").is_dir()):
        raise DataError(f"--test-fraction applies to a single folder of images; '{root}' ({layout}) has its "
                        "own test split")
    else:
        listing = split_listing(LAYOUTS[layout](root, "train"), test_fraction, seed)[split == "test"]
    if not listing.files:
        raise DataError(f"the {layout} {split} split in '{root}' has no images")
    return listing
