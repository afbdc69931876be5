"""Atomic file writes shared by every layer (training, evaluation, experiments): never a torn file on disk;
and the one-line report of a write the filesystem refused (disk full, quota, read-only, I/O error)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from idaa.errors import WriteFault

# errno values that mean "the filesystem refused the write", not "this program is wrong": exit 75, retry later
FAULT_REASONS = {errno.ENOSPC: "disk full (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)",
                 errno.EROFS: "read-only filesystem (EROFS)", errno.EIO: "I/O error (EIO)"}


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with _writable(fd, path) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """A text file written atomically (UTF-8)."""
    data = text.encode()
    atomic_write_bytes(Path(path), lambda handle: handle.write(data))


def copy_into(files: list[Path], folder: Path) -> None:
    """Copy files into `folder` (created), each atomically, skipping those already there byte for byte."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        data, target = path.read_bytes(), folder / path.name
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, lambda handle, data=data: handle.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save that never leaves a half-written file at `path`."""
    import torch  # lazily: the module stays importable without paying for torch

    def save(handle: IO[bytes]) -> None:
        try:
            torch.save(obj, handle)
        except RuntimeError as exc:  # torch reports a failed write as "unexpected pos": surface the OSError
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, OSError):
                raise cause from None
            raise

    atomic_write_bytes(Path(path), save)


def _writable(fd: int, path: Path) -> IO[bytes]:
    """The temporary file every atomic write goes through (one seam: tests make it fail to simulate a full disk)."""
    return os.fdopen(fd, "wb")


def write_fault(exc: BaseException, what: str | None, path: str | Path | None) -> WriteFault | None:
    """A one-line WriteFault for an OSError the filesystem raised (what, where, free space); None for others.

    `what` None: the operation is unknown (an EIO may come from a read), so the line names only the file.
    """
    if not isinstance(exc, OSError) or exc.errno not in FAULT_REASONS:
        return None
    where = path if path is not None else exc.filename
    if where is None:  # nothing names the file: the free space is the working folder's
        where = "."
    doing = f"while writing {what} '{where}'" if what is not None else f"on '{where}'"
    return WriteFault(f"{FAULT_REASONS[exc.errno]} {doing} ({free_space(where)})")


@contextmanager
def reporting_write_faults(what: str, path: str | Path | None) -> Iterator[None]:
    """Turn a disk-full, quota, read-only or I/O error inside the block into a one-line WriteFault (exit 75)."""
    try:
        yield
    except OSError as exc:
        fault = write_fault(exc, what, path)
        if fault is None:
            raise
        raise fault from None


def free_space(path: str | Path) -> str:
    """'12.0 MiB free there', measured on the filesystem holding `path` (or its nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{human_bytes(free)} free there"


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes: a checkpoint's or VAE's identity (a rewrite changes it, a copy does not)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
