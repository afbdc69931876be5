"""Atomic file writes shared by every layer (training, evaluation, experiments): never a torn file on disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
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

    atomic_write_bytes(Path(path), lambda handle: torch.save(obj, handle))


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
