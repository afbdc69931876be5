"""The plain image folder, the one reader of its layout for every path (in memory, streamed, packed):
root/{train,test}/<class>/*, a single labelled root/<class>/* or a flat unlabelled root/*."""

from __future__ import annotations

from pathlib import Path

from idaa.data.listing import Listing, list_images, scan_labelled, subfolders
from idaa.errors import DataError

__all__ = ["read_folder"]


def read_folder(root: Path, split: str) -> Listing:
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


