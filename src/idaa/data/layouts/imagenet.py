"""ImageNet and ImageNet-100 in the layouts they are published in (class folders, Kaggle's, a flat val/ folder
labelled by a file), read into a `Listing` without opening an image."""

from __future__ import annotations

import csv
import re
from importlib import resources
from pathlib import Path

from idaa.data.listing import Listing, list_images, subfolders
from idaa.errors import DataError

__all__ = ["imagenet100_classes", "read_imagenet", "read_imagenet100"]


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


def read_imagenet(root: Path, split: str, wanted: list[str] | None = None) -> Listing:
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


def read_imagenet100(root: Path, split: str) -> Listing:
    """ImageNet-100: a full ImageNet folder (or a copy holding only these classes), restricted to CMC's 100."""
    return read_imagenet(root, split, sorted(imagenet100_classes()))


