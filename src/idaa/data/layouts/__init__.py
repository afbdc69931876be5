"""Dataset folders in their published layouts, by name: each reader turns a folder into a `Listing` (paths,
labels, class names) without opening an image, so the in-memory and streamed sources, the shard packer and the
transfer evaluation share one definition of every layout. What a layout expects on disk is in its reader's
docstring and in docs/.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from idaa.data.layouts.folder import read_folder
from idaa.data.layouts.imagenet import imagenet100_classes, read_imagenet, read_imagenet100
from idaa.data.layouts.transfer import (
    read_aircraft,
    read_birdsnap,
    read_cub200,
    read_dtd,
    read_flowers102,
    read_pets,
)
from idaa.data.listing import Listing
from idaa.errors import DataError

__all__ = ["LAYOUTS", "Listing", "has_test_split", "imagenet100_classes", "layout_name", "read_layout",
           "split_listing"]

Reader = Callable[[Path, str], Listing]

# name -> reader(root, split) -> Listing; split is "train" or "test" (a layout's "val" counts as "test")
LAYOUTS: dict[str, Reader] = {
    "imagenet": read_imagenet,
    "imagenet100": read_imagenet100,
    "folder": read_folder,
    "aircraft": read_aircraft,
    "birdsnap": read_birdsnap,
    "cub200": read_cub200,
    "dtd": read_dtd,
    "flowers102": read_flowers102,
    "pets": read_pets,
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
