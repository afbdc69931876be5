"""`idaa data`: the argument parser of the data tools (`pack`, `list`, `check`) and their handlers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idaa.data.layouts import LAYOUTS, has_test_split, read_layout
from idaa.data.options import default_workers
from idaa.data.shards import INDEX, ShardSource, check_shards, is_shard_folder, pack_shards
from idaa.data.unreadable import find_unreadable, header_problems
from idaa.errors import DataError


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `idaa data pack|list|check` on the top-level subcommand parser."""
    data = subparsers.add_parser("data", help="dataset tools: WebDataset shards, layout listings")
    group = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))
    layouts = ", ".join(LAYOUTS)
    pack = group.add_parser("pack", help="an image folder -> WebDataset tar shards + index.json (for clusters)")
    pack.add_argument("folder", help="dataset folder in one of the layouts (see --dataset)")
    pack.add_argument("--out", required=True, help="shard folder to create (new or empty)")
    pack.add_argument("--dataset", default="folder", help=f"layout of FOLDER: {layouts} (default: folder)")
    pack.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    pack.add_argument("--test-fraction", type=float, default=None,
                      help="hold out a seeded share of each class of a single labelled folder as the test split")
    pack.add_argument("--seed", type=int, default=0, help="seed of --test-fraction's split")
    pack.add_argument("--no-progress", action="store_true")
    show = group.add_parser("list", help="how a folder reads in a layout (or a shard folder): images and classes")
    show.add_argument("folder")
    show.add_argument("--dataset", default="folder", help=f"layout of FOLDER: {layouts}, or shards (default: folder)")
    show.add_argument("--test-fraction", type=float, default=None)
    show.add_argument("--seed", type=int, default=0)
    check = group.add_parser("check", help="decode every image of a folder or shard folder, name the ones that "
                             "do not decode (exit 2 when any)")
    check.add_argument("folder")
    check.add_argument("--dataset", default="folder",
                       help=f"layout of FOLDER: {layouts} (default: folder; a shard folder is recognised)")
    check.add_argument("--workers", type=int, default=None,
                       help="processes decoding the images (default: the cores less one)")
    check.add_argument("--no-progress", action="store_true")


def run_data(args: argparse.Namespace) -> None:
    """Handler of `idaa data`: pack shards or print a layout's listing summary."""
    if args.data_command == "pack":
        index = pack_shards(args.dataset, args.folder, args.out, args.shard_size, args.test_fraction, args.seed,
                            progress=not args.no_progress)
        parts = [f"{name} {s['images']} images in {len(s['shards'])} shards" for name, s in index["splits"].items()]
        print(f"pack: {', '.join(parts)}, {len(index['classes'])} classes -> {args.out}")
        return
    if args.data_command == "check":
        check_folder(args.dataset, args.folder, args.workers, progress=not args.no_progress)
        return
    if args.dataset == "shards":
        _list_shards(args.folder)
        return
    splits = ("train", "test") if has_test_split(args.dataset, args.folder, args.test_fraction) else ("train",)
    for split in splits:
        listing = read_layout(args.dataset, args.folder, split, args.test_fraction, args.seed)
        labelled = f"{len(listing.classes)} classes" if listing.classes else "unlabelled"
        empty, unreadable = header_problems(listing.files)
        problems = f", {empty} zero-byte and {unreadable} unreadable file(s) (`idaa data check` names them)" \
            if empty or unreadable else ""
        print(f"{split}: {len(listing.files)} images, {labelled}{problems}")


def check_folder(layout: str, folder: str, workers: int | None = None, progress: bool = False) -> None:
    """Decode every image file of a folder's splits; print each one that does not decode (path: reason), then
    a summary. Raises DataError (exit 2) when any does not, so a script can test the folder before training."""
    if workers is not None and workers < 0:
        raise DataError(f"--workers must be an integer >= 0, got {workers}")
    workers = default_workers() if workers is None else workers
    broken: dict[str, str] = {}
    if layout == "shards" or is_shard_folder(folder):
        count, bad, broken = check_shards(folder, workers, progress)
        what = "images in the shards of"
    else:
        splits = ("train", "test") if has_test_split(layout, folder, None) else ("train",)
        files = list(dict.fromkeys(str(f) for split in splits for f in read_layout(layout, folder, split).files))
        count, bad, what = len(files), find_unreadable(files, workers, reuse=False, progress=progress), "image files in"
    for path, reason in {**bad, **broken}.items():
        print(f"{path}: {reason}")
    if broken:
        raise DataError(f"{len(broken)} shard(s) of '{folder}' cannot be read to the end (listed above) and "
                        f"{len(bad)} of the {count} images read before do not decode; pack the folder again")
    if bad:
        raise DataError(f"{len(bad)} of {count} {what} '{folder}' do not decode (listed above); remove "
                        "or replace them, or train with --bad-images skip, which leaves them out")
    print(f"check: all {count} {what} '{folder}' decode")


def _list_shards(folder: str) -> None:
    """Summary of a shard folder's index: images and shards of each split, classes."""
    ShardSource(folder, "train")  # refuses a folder without an index or with missing shards
    index = json.loads((Path(folder) / INDEX).read_text())
    for split, part in index["splits"].items():
        print(f"{split}: {part['images']} images in {len(part['shards'])} shards, {len(index['classes'])} classes")
