"""Unreadable image files: found from their headers (`idaa data list`) or by decoding them (`idaa data check`),
and left out under --bad-images skip, of training batches (`Screen`) and of evaluation sets (`readable`).

Which images are left out depends only on the files (a file decodes or it does not, whatever the worker count or
the timing), so a run resumed mid-epoch leaves out the same images as a straight one, and never trains on or
embeds a placeholder in their place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from idaa import distributed as dist
from idaa.data.crops import CropBatch
from idaa.data.decode import read_rgb
from idaa.errors import DataError, exception_text, warn

__all__ = ["Screen", "find_unreadable", "header_problems", "readable", "without_unreadable"]

CHECK_CACHE = ".idaa-decoded.json"  # beside the files: {relative path: [size, mtime_ns, reason ('' decodes)]}
CHECK_VERSION = 1


class Screen:
    """The unreadable images of a feed's batches: under --bad-images error they stop the epoch (`failure`, every
    rank at the same batch); under skip they are left out and counted (`left_out`, summed over ranks)."""

    def __init__(self, bad_images: str | None, device: torch.device) -> None:
        self.bad_images, self.device = bad_images, device
        self.failure: str | None = None
        self.left_out, self.example = 0, ""  # this epoch's, kept in a mid-epoch checkpoint (`bad_images`)

    def start(self, first: int) -> None:
        """A new pass: the count restarts with a new epoch, not when a resumed one continues at batch `first`."""
        self.failure = None
        if first == 0:
            self.left_out, self.example = 0, ""

    def keep(self, errors: Sequence[str]) -> torch.Tensor | None:
        """The rows of a batch to train on (a boolean mask), or None to stop the epoch (setting `failure`).

        Under skip every rank keeps as many rows, the fewest any rank has readable: the loss gathers equal shares.
        """
        bad = [e for e in errors if e]
        if self.bad_images != "skip":  # "error", or None: the default
            if dist.max_int(int(bool(bad)), self.device):
                self.failure = bad[0] if bad else "another process met an unreadable image"
                return None
            return torch.ones(len(errors), dtype=torch.bool)
        counts = [len(bad)]
        if dist.active():  # every rank learns every rank's count, so all of them take the same decision
            counts = dist.gather_no_grad(torch.tensor([len(bad)], device=self.device)).tolist()
        self.left_out += sum(counts)
        self.example = self.example or next(iter(bad), "")
        rows = len(errors) - max(counts)
        if rows < 1:
            self.failure = (f"every image of a batch is unreadable ({self.example or 'on another rank'}); remove "
                            "the unreadable files (`idaa data check FOLDER` names them)")
            return None
        readable_rows = torch.tensor([not e for e in errors])
        return readable_rows & (readable_rows.cumsum(0) <= rows)

    def report(self, write: Callable[[str], None] = print) -> dict[str, int]:
        """The epoch's count for metrics.jsonl ({} when none was left out), with a warning."""
        if not self.left_out:
            return {}
        example = f", e.g. {self.example}" if self.example else ""
        write(f"idaa: warning: skipped {self.left_out} unreadable image(s) this epoch{example}")
        return {"bad_images": self.left_out}


def without_unreadable(batch: CropBatch) -> CropBatch:
    """A decoded (crops, labels, indices, errors) batch without the rows whose file did not decode."""
    crops, labels, indices, errors = batch
    if not any(errors):
        return batch
    keep = torch.tensor([not e for e in errors])
    return crops[keep], labels[keep], indices[keep], [e for e in errors if not e]


def header_problems(files: Sequence[str | Path]) -> tuple[int, int]:
    """(zero-byte files, other files whose header is no image's) among `files`: what `idaa data list` reports."""
    empty = unreadable = 0
    for path in files:
        reason = _header_reason(path)
        empty += reason == _EMPTY
        unreadable += bool(reason) and reason != _EMPTY
    return empty, unreadable


_EMPTY = "empty file (0 bytes)"


def _header_reason(path: str | Path) -> str:
    """Why a file cannot be an image judging from its size and header alone ('' when it may be one)."""
    try:
        if os.stat(path).st_size == 0:
            return _EMPTY
        with Image.open(path) as img:
            img.size  # noqa: B018
    except Exception as exc:  # OSError, PIL's UnidentifiedImageError, SyntaxError, ValueError...
        return f"not a readable image file ({exception_text(exc)})"
    return ""


def _decode_reason(path: str) -> str:
    """Why a file does not decode in full ('' when it does)."""
    reason = _header_reason(path)
    if reason:
        return reason
    try:
        read_rgb(path)
    except DataError as exc:
        return str(exc).removeprefix(f"cannot read image '{path}': ")
    return ""


class _Decodes(torch.utils.data.Dataset):
    """Files -> the reason each does not decode ('' when it does), for DataLoader workers."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        return _decode_reason(self.files[index])


def find_unreadable(files: Sequence[str | Path], workers: int = 0, reuse: bool = True,
                    progress: bool = False) -> dict[str, str]:
    """{file: reason} of the files that do not decode in full, decoded in `workers` processes.

    Results are kept beside the files (CHECK_CACHE) by size and modification time; with `reuse` the files already
    decoded there are not decoded again (evaluation), without it every file is (`idaa data check`).
    """
    paths = [str(f) for f in files]
    if not paths:
        return {}
    root = Path(os.path.commonpath([os.path.dirname(p) or "." for p in paths]))
    cache_path = root / CHECK_CACHE
    cached = _read_cache(cache_path) if reuse else {}
    stamps = {p: _stamp(p) for p in paths}
    keys = {p: os.path.relpath(p, root) for p in paths}
    known = {p: cached[keys[p]][2] for p in paths if cached.get(keys[p], [None] * 3)[:2] == stamps[p]}
    todo = [p for p in paths if p not in known]
    loader = torch.utils.data.DataLoader(_Decodes(todo), batch_size=16, num_workers=min(workers, len(todo)),
                                         collate_fn=list)
    with tqdm(total=len(todo), desc="check", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start, reasons in zip(range(0, len(todo), 16), loader, strict=True):
            known.update(zip(todo[start:start + 16], reasons, strict=True))
            bar.update(len(reasons))
    if todo:
        entries = {**_read_cache(cache_path), **{keys[p]: [*stamps[p], known[p]] for p in paths}}
        _write_cache(cache_path, entries)
    return {p: known[p] for p in paths if known[p]}


def _stamp(path: str) -> list[int]:
    """[size, mtime_ns] of a file, or [-1, -1] when it cannot even be listed."""
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def _read_cache(path: Path) -> dict[str, list[Any]]:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(blob, dict) and blob.get("version") == CHECK_VERSION and isinstance(blob.get("files"), dict)
    return blob["files"] if ok else {}


def _write_cache(path: Path, entries: dict[str, list[Any]]) -> None:
    """Atomically replace the results file; a read-only data folder simply goes without one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"version": CHECK_VERSION, "files": entries}))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def readable(data: Any) -> Any:
    """Under --bad-images skip, a streamed split without the files that do not decode (their labels go with
    them), so evaluation never embeds a placeholder; anything else is returned as it is."""
    options = getattr(data, "options", None)
    if getattr(options, "bad_images", "error") != "skip" or not hasattr(data, "files") or not len(data):
        return data
    bad = find_unreadable(data.files, options.num_workers)
    if not bad:
        return data
    warn(f"left out {len(bad)} unreadable image(s) of {data.name}, e.g. {next(iter(bad))}: {next(iter(bad.values()))}")
    return data.subset([i for i, path in enumerate(data.files) if path not in bad])
