"""WebDataset tar shards for clusters: `idaa data pack` writes them, training and evaluation stream them back.

A shard folder holds `<split>-NNNNNN.tar` files plus `index.json` (classes, normalisation, images per shard),
so a reader knows the epoch length and the classes without opening a tar. A sample is the image file's
original bytes (never re-encoded), its label (`.cls`) and its index in the split's listing (`.idx`); crops
are seeded by that index exactly as when streaming the folder itself, so packing changes no crop.

Reading: the shards of an epoch are shuffled with (seed, epoch), dealt to the ranks, then to each rank's
DataLoader workers, so no two readers share a shard; every rank yields the same number of batches (a rank
whose shards hold fewer images starts over on them), which keeps DDP in step.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from idaa.data.crops import CropBatch, center_crop, crop_views, stack_crops
from idaa.data.decode import read_rgb
from idaa.data.layouts import has_test_split, layout_name, read_layout
from idaa.data.listing import IMAGE_EXTENSIONS, Listing, image_stats
from idaa.data.options import StreamOptions
from idaa.data.unreadable import without_unreadable
from idaa.devices import release_free_memory
from idaa.errors import DataError, WriteFault, exception_text
from idaa.fileio import reporting_write_faults

__all__ = ["INDEX", "ShardSource", "is_shard_folder", "pack_shards"]

INDEX = "index.json"
FORMAT = "idaa-shards/1"
_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_SHUFFLE_BUFFER = 1000  # samples mixed across a worker's shards, so one batch is not one shard's run of images


def is_shard_folder(path: str | Path) -> bool:
    """True when `path` is a folder written by `idaa data pack` (it holds index.json)."""
    return (Path(path) / INDEX).is_file()


def pack_shards(layout: str, root: str | Path, out: str | Path, shard_size: int = 1000,
                test_fraction: float | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Pack a dataset folder (any layout of idaa.data.layouts) into WebDataset shards in `out`; returns the index.

    Everything is written to a hidden sibling folder first and renamed at the end, so a refusal or an
    interruption leaves `out` as it was.
    """
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    root, out = Path(root).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"'{out}' already exists and is not an empty folder; choose a new one")
    listings = _listings(layout, root, test_fraction, seed)
    staging = out.parent / f".{out.name}.packing"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with reporting_write_faults("the shards for", out):  # a full disk: one line, and the staging folder goes
            return _pack(listings, layout, root, out, staging, shard_size, progress)
    except WriteFault as fault:
        raise WriteFault(f"{fault}; nothing was kept and '{root}' is untouched: free space, then run the same "
                         "command again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pack(listings: dict[str, Listing], layout: str, root: Path, out: Path, staging: Path, shard_size: int,
          progress: bool) -> dict[str, Any]:
    """Write every split and the index into `staging`, then rename it to `out` (the one step others see)."""
    staging.mkdir(parents=True)
    total = sum(len(listing.files) for listing in listings.values())
    with tqdm(total=total, desc="pack", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        splits = {name: _write_split(staging, name, listing, shard_size, bar) for name, listing in listings.items()}
    mean, std = image_stats(root, listings["train"].files)  # the folder's own: a VAE trained on it fits the shards
    index = {"format": FORMAT, "layout": layout_name(layout), "source": str(root.resolve()),
             "classes": listings["train"].classes, "mean": list(mean), "std": list(std), "splits": splits}
    (staging / INDEX).write_text(json.dumps(index, indent=1))
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return index


def _listings(layout: str, root: Path, test_fraction: float | None, seed: int) -> dict[str, Listing]:
    """The splits to pack: train, and test where the layout has one (or --test-fraction makes one)."""
    splits = ("train", "test") if has_test_split(layout, root, test_fraction) else ("train",)
    return {split: read_layout(layout, root, split, test_fraction, seed) for split in splits}


def _write_split(folder: Path, split: str, listing: Listing, shard_size: int, bar: tqdm) -> dict[str, Any]:
    """Write one split's shards; returns its part of the index (file and image count of every shard)."""
    import webdataset as wds

    shards = []
    for number, start in enumerate(range(0, len(listing.files), shard_size)):
        name = f"{split}-{number:06d}.tar"
        stop = min(start + shard_size, len(listing.files))
        with wds.TarWriter(str(folder / name), mtime=0) as sink:  # fixed mtime: the same data gives the same tar
            for i in range(start, stop):
                sink.write(_sample(listing.files[i], listing.labels[i], i))
                bar.update()
        shards.append({"file": name, "images": stop - start})
    return {"images": len(listing.files), "shards": shards, "labels": list(listing.labels)}


def _sample(path: Path, label: int, index: int) -> dict[str, Any]:
    """One tar sample: the file's own bytes under its extension, its label and its index in the listing."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image '{path}': {exc.strerror or type(exc).__name__}") from None
    extension = path.suffix.lower().lstrip(".")
    try:  # the header only: a file that is no image is refused now, not found by a worker mid-epoch
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018
    except Exception:  # PIL raises OSError, SyntaxError, ValueError...
        raise DataError(f"cannot read image '{path}': not a readable image file") from None
    return {"__key__": f"{index:09d}", extension: data, "cls": str(label), "idx": str(index)}


class ShardSource:
    """One split of a shard folder: its shards, classes and normalisation, and loaders that stream it."""

    def __init__(self, folder: str | Path, split: str = "train", image_size: int = 224,
                 options: StreamOptions | None = None) -> None:
        self.folder = Path(folder).expanduser()
        index_path = self.folder / INDEX
        if not self.folder.is_dir():
            raise DataError(f"shard folder '{self.folder}' does not exist")
        if not index_path.is_file():
            raise DataError(f"'{self.folder}' holds no shards ({INDEX} is missing); make them with "
                            "`idaa data pack FOLDER --out SHARDS`")
        try:
            index = json.loads(index_path.read_text())
            assert index["format"] == FORMAT
        except (ValueError, KeyError, AssertionError, TypeError):
            raise DataError(f"'{index_path}' is not an index written by `idaa data pack`") from None
        split = {"val": "test"}.get(split, split)
        if split not in index["splits"]:
            raise DataError(f"'{self.folder}' has no {split} shards (packed: {', '.join(index['splits'])})")
        entries = index["splits"][split]["shards"]
        self.shards = [str(self.folder / e["file"]) for e in entries]
        self.counts = [int(e["images"]) for e in entries]
        missing = [s for s in self.shards if not Path(s).is_file()]
        if not self.shards or missing:
            raise DataError(f"'{self.folder}' lists {split} shards that are missing, e.g. '{(missing or ['?'])[0]}'")
        self.name, self.split, self.image_size, self.channels = index.get("layout") or "shards", split, image_size, 3
        self.classes: list[str] = list(index["classes"])
        self.labels = torch.tensor(index["splits"][split]["labels"], dtype=torch.int64)  # by index in the split
        self.mean, self.std = tuple(index["mean"]), tuple(index["std"])
        self.packed_splits: list[str] = list(index["splits"])  # every split of the folder, this one among them
        self.options = options or StreamOptions()  # workers, seed, bad images

    def __len__(self) -> int:
        return sum(self.counts)

    def take(self, n: int, seed: int = 0) -> ShardSource:
        """Shards stream whole: a subset would need every shard read to pick it (one-line refusal)."""
        if n >= len(self):
            return self
        raise DataError(f"--limit {n}: a shard folder streams whole; pack a subset with `idaa data pack` instead")

    def subset(self, indices: Any) -> ShardSource:
        """Refused for the same reason as `take`."""
        raise DataError("a shard folder streams whole and cannot be subset; pack the subset with `idaa data pack`")

    @property
    def images(self) -> Any:
        """Random access to the pixels, which offline evaluation needs and shards do not give (one-line refusal)."""
        raise DataError(f"'{self.folder}' is a shard folder, which training and its kNN monitor stream; evaluate "
                        "a checkpoint offline on the image folder the shards were packed from")

    def check_readers(self, world: int, workers: int) -> None:
        """Refuse more readers than shards: a reader without a shard would stall the epoch (one line)."""
        readers = world * max(workers, 1)
        if len(self.shards) < readers:
            raise DataError(f"'{self.folder}' has {len(self.shards)} {self.split} shards, fewer than the {world} "
                            f"rank(s) x {max(workers, 1)} worker(s) reading them; repack with a smaller "
                            "--shard-size or use fewer --workers")


    def train_loader(self, epoch: int, seed: int, local_batch: int, rank: int, world: int, workers: int,
                     scale: tuple[float, float] | None, views: int = 2, first: int = 0) -> ShardBatches:
        """This rank's batches of `epoch` (`len(self) // (local_batch * world)` of them), from batch `first` on.

        A batch is (crops B x views x 3 x S x S uint8, labels, indices, errors), as the folder stream gives
        (B x 3 x S x S centre crops when `scale` is None).
        """
        self.check_readers(world, workers)
        steps = len(self) // (local_batch * world)
        if steps < 1:
            raise DataError(f"'{self.folder}' holds {len(self)} {self.split} images, fewer than one global batch "
                            f"of {local_batch * world}")
        order = np.random.default_rng([seed % 2**63, epoch]).permutation(len(self.shards))
        mine = [(self.shards[i], self.counts[i]) for i in order[rank::world]]
        spec = {"mode": "train", "epoch": epoch, "seed": seed, "rank": rank, "batch": local_batch, "steps": steps,
                "first": first, "size": self.image_size, "scale": scale, "views": views}
        return ShardBatches(_ShardStream(mine, spec), workers, steps - first)

    def eval_batches(self, rank: int, world: int, batch_size: int = 256, workers: int = 0) -> Iterator[CropBatch]:
        """Centre crops of this rank's shards (every image once over all ranks; a rank may get none); under
        --bad-images skip without the images that do not decode."""
        mine = list(zip(self.shards, self.counts, strict=True))[rank::world]
        if not mine:
            return iter(())
        spec = {"mode": "eval", "batch": batch_size, "size": self.image_size}
        batches = iter(ShardBatches(_ShardStream(mine, spec), min(workers, len(mine)), None))
        if self.options.bad_images == "skip":  # left out with their labels, never zeros
            return map(without_unreadable, batches)
        return batches

    def labelled_share(self, rank: int, world: int, batch_size: int,
                       workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 centre crops, labels) of this rank's shards; an image that does not decode stops it (one line),
        except under --bad-images skip, which leaves it out."""
        for images, labels, _, errors in self.eval_batches(rank, world, batch_size, workers):
            bad = next((e for e in errors if e), None)
            if bad:
                raise DataError(bad)
            yield images, labels


def check_shards(folder: str | Path, workers: int = 0,
                 progress: bool = False) -> tuple[int, dict[str, str], dict[str, str]]:
    """(images, {shard:sample: reason}, {shard: reason}) over every split's shards: each image decoded in full, in
    `workers` processes (one shard each at a time), the way `idaa data check` decodes a folder's files. The last
    names the shards that could not be read to their end (a cut or foreign tar): not images, so counted apart."""
    shards = [s for split in ShardSource(folder).packed_splits for s in ShardSource(folder, split).shards]
    loader = torch.utils.data.DataLoader(_ShardCheck(shards), batch_size=None,
                                         num_workers=min(workers, len(shards)))
    images, bad, broken = 0, {}, {}
    with tqdm(total=len(shards), desc="check", unit="shard", disable=not progress, dynamic_ncols=True) as bar:
        for count, reasons, cut in loader:
            images += count
            bad.update(reasons)
            broken.update(cut)
            bar.update(1)
    return images, bad, broken


class _ShardCheck(torch.utils.data.Dataset):
    """Shard paths -> (images, {shard:sample: reason} of those that do not decode, {shard: why it stops early})."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> tuple[int, dict[str, str], dict[str, str]]:
        count, bad, broken = 0, {}, {}
        for row in _read([self.shards[index]]):
            if "error" in row:  # _read's stand-in for the unreadable rest of a shard, not a sample
                broken[row["__url__"]] = row["error"]
                continue
            name = f"{row.get('__url__')}:{row.get('__key__')}"
            image = next((row[e] for e in _EXTENSIONS if e in row), None)
            count += 1
            if image is None:
                bad[name] = "holds no image"
                continue
            encoded = io.BytesIO(image)
            encoded.name = name
            try:
                read_rgb(encoded)
            except DataError as exc:
                bad[name] = str(exc).removeprefix(f"cannot read image '{name}': ")
        return count, bad, broken


class ShardBatches:
    """The DataLoader over a shard stream. Workers yield whole batches in turn, so the order depends only on the
    worker count; a batch before the resume point arrives as None (never decoded) and is dropped here."""

    def __init__(self, stream: torch.utils.data.IterableDataset, workers: int, length: int | None) -> None:
        if workers > 0:
            release_free_memory()  # the forked workers would inherit the heap's free pages (see image_loader)
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                  generator=torch.Generator())
        self.length = length

    def __len__(self) -> int:
        return self.length or 0

    def __iter__(self) -> Iterator[CropBatch]:
        return (batch for batch in self.loader if batch is not None)


class _ShardStream(torch.utils.data.IterableDataset):
    """One rank's (shard, image count) pairs, dealt again to the DataLoader workers; yields decoded batches."""

    def __init__(self, shards: list[tuple[str, int]], spec: dict[str, Any]) -> None:
        super().__init__()
        self.shards, self.spec = shards, spec

    def __iter__(self) -> Iterator[CropBatch | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.shards[worker::workers]
        s = self.spec
        if s["mode"] == "eval":
            yield from _chunks(_read([path for path, _ in shards]), s["batch"], self._decode)
            return
        numbers = list(range(worker, s["steps"], workers))  # batch i of the epoch comes from worker i % workers
        if not numbers:
            return
        rng = np.random.default_rng([s["seed"] % 2**63, s["epoch"], s["rank"], worker])
        per_pass = sum(count for _, count in shards)

        def passes() -> Iterator[dict[str, Any]]:  # every image once per pass; a short share starts over
            while True:
                yield from _shuffled(_read([path for path, _ in shards]), rng, min(_SHUFFLE_BUFFER, per_pass))

        for number, rows in zip(numbers, _chunks(passes(), s["batch"], None), strict=False):
            yield self._decode(rows) if number >= s["first"] else None

    def _decode(self, rows: list[dict[str, Any]]) -> CropBatch:
        """Crops (train: seeded by the stored index) or centre crops (eval) of a list of raw samples."""
        s = self.spec
        centre = s["mode"] == "eval" or s["scale"] is None  # no crop policy (FixMatch views): centre crops
        crops, labels, indices, errors = [], [], [], []
        for row in rows:
            index, error = int(row.get("idx", b"-1")), row.get("error", "")
            image = next((row[e] for e in _EXTENSIONS if e in row), None)
            if not error and image is None:
                error = f"shard '{row.get('__url__')}' sample '{row.get('__key__')}' holds no image"
            crop = None
            if not error:
                encoded = io.BytesIO(image)
                encoded.name = f"{row.get('__url__')}:{row.get('__key__')}"  # DataError messages name the sample
                try:
                    crop = center_crop(encoded, s["size"]) if centre else crop_views(
                        encoded, index, s["epoch"], s["seed"], s["size"], s["scale"], s["views"])
                except DataError as exc:
                    error = str(exc)
            if crop is None:  # fills the row only: the caller stops or leaves it out, as with the folder stream
                shape = (3,) if centre else (s["views"], 3)
                crop = torch.zeros((*shape, s["size"], s["size"]), dtype=torch.uint8)
            crops.append(crop)
            labels.append(int(row.get("cls", b"-1")))
            indices.append(index)
            errors.append(error)
        return stack_crops(crops), torch.tensor(labels), torch.tensor(indices), errors


def _chunks(samples: Iterator[dict[str, Any]], size: int, decode: Any) -> Iterator[Any]:
    """Consecutive lists of `size` samples (the last one shorter), passed through `decode` when given."""
    rows: list[dict[str, Any]] = []
    for sample in samples:
        rows.append(sample)
        if len(rows) == size:
            yield decode(rows) if decode else rows
            rows = []
    if rows:
        yield decode(rows) if decode else rows


def _read(shards: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples of the shards in order; a broken tar becomes one error sample instead of a worker traceback."""
    import webdataset as wds

    for shard in shards:
        try:
            yield from wds.tarfile_samples([{"url": shard}])
        except Exception as exc:  # tarfile and webdataset raise many types for a truncated or foreign file
            yield {"__url__": shard, "__key__": "?", "error": f"cannot read shard '{shard}': {exception_text(exc)}"}


def _shuffled(samples: Iterator[dict[str, Any]], rng: np.random.Generator, size: int) -> Iterator[dict[str, Any]]:
    """A seeded shuffle buffer of `size` slots: each sample leaves from a random slot; the rest at the end."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(len(buffer)))
        buffer[slot], sample = sample, buffer[slot]
        yield sample
    rng.shuffle(buffer)
    yield from buffer
