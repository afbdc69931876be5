"""Run folders: one writer each, never clobbered, files written atomically, metrics appended as JSON lines."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from idaa.errors import IdaaError, WriteFault
from idaa.fileio import atomic_torch_save, atomic_write_bytes, reporting_write_faults, write_fault
from idaa.runlock import LOCK_FILE, RunLock

# the atomic writers live in idaa.fileio (evaluation uses them too); re-exported for the training code
__all__ = ["LastCheckpoint", "MetricsLog", "RunLock", "atomic_torch_save", "atomic_write_bytes", "prepare_run_dir",
           "remove_stale_temporaries", "write_config"]


def prepare_run_dir(out: str | Path, overwrite: bool = False, resume: bool = False,
                    lock: RunLock | None = None) -> Path:
    """Create `out`, or accept it when resuming; an existing non-empty run needs --resume or --overwrite.

    `lock` (the run's RunLock) is taken before anything in the folder is written or deleted, so a second
    writer is refused with the folder exactly as it was.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise IdaaError(f"output path '{path}' exists and is not a folder")
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()) and not (overwrite or resume):
        raise IdaaError(f"run folder '{path}' already exists; pass --resume to continue it or --overwrite to "
                        "replace it")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if lock is not None:
            lock.acquire()
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        fault = write_fault(exc, "the run folder", path)
        if fault is not None:
            raise WriteFault(f"{fault}; nothing in it was changed") from None
        raise IdaaError(f"cannot write to output folder '{path}' ({exc.strerror or type(exc).__name__})") from None
    if overwrite and not resume:
        for name in ("metrics.jsonl",):
            (path / name).unlink(missing_ok=True)
    return path


def remove_stale_temporaries(folder: Path) -> None:
    """Delete half-written temporaries a killed process left behind (`.last.ckpt.xyz`); finished files stay."""
    for tmp in folder.glob(".*.ckpt.*"):
        tmp.unlink(missing_ok=True)


def write_config(path: str | Path, config: dict[str, Any]) -> None:
    """The fully resolved config as YAML (what a rerun needs)."""
    text = yaml.safe_dump(config, sort_keys=False).encode()
    with reporting_write_faults("the run's config", path):
        atomic_write_bytes(Path(path), lambda handle: handle.write(text))


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Drop records newer than `step` (logged after the checkpoint a resumed run restarts from)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and _record_step(line) <= step]
        text = "".join(line + "\n" for line in keep).encode()
        with reporting_write_faults("the metrics log", self.path):
            atomic_write_bytes(self.path, lambda handle: handle.write(text))

    def write(self, record: dict[str, Any]) -> None:
        """Append one line, whole or not at all: a failed append is cut back, so no torn line is ever left."""
        data = (json.dumps(record) + "\n").encode()
        with reporting_write_faults("a metrics line to", self.path):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:  # os.write may take only part of the line (a disk filling up): go on or fail
                        view = view[os.write(fd, view):]
                except OSError:
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)


@dataclass
class LastCheckpoint:
    """Which checkpoint is safely on disk, so a write fault can say what is intact and how to go on."""

    path: Path
    step: int | None = None  # None: none written yet
    unit: str = "step"
    resume: str = "resume with --resume"
    read_as: tuple[int, int, int] | None = None  # (inode, size, mtime) of the file a resume read, before the lock

    def read_for_resume(self) -> None:
        """Note which file a resume reads. It is read before the folder's lock is taken (every rank reads it),
        so `check_unchanged` tells, once the lock is held, whether another writer replaced it meanwhile."""
        self.read_as = _file_stamp(self.path)

    def check_unchanged(self) -> None:
        """Refuse to resume from a checkpoint that another process replaced after this one read it."""
        if self.read_as is not None and _file_stamp(self.path) != self.read_as:
            raise IdaaError(f"'{self.path}' was rewritten while this run was starting (another process trained in "
                            "this folder); nothing was changed: run the command again to resume from the new one")

    def intact(self) -> str:
        """'last.ckpt at step 40 is intact: resume with --resume' (the fault's own words say what to fix first)."""
        if self.step is None:
            return "no checkpoint was written yet: start again with --overwrite"
        return f"{self.path.name} at {self.unit} {self.step} is intact: {self.resume}"

    @contextmanager
    def on_write_fault(self) -> Iterator[None]:
        """Any write fault in the block (reported or a bare OSError) ends as one line saying what is intact."""
        try:
            yield
        except WriteFault as fault:
            raise WriteFault(f"{fault}; {self.intact()}") from None
        except OSError as exc:
            fault = write_fault(exc, None, exc.filename or self.path.parent)
            if fault is None:
                raise
            raise WriteFault(f"{fault}; {self.intact()}") from None


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # an unreadable line (a torn write) is dropped
