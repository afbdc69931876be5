"""One writer per run folder: an exclusive OS lock on `RUN/.lock` that the kernel drops when its process dies.

flock(2) locks belong to the open file, not to what the file holds: a `.lock` left by a killed process (kill -9,
a crashed node) blocks nobody, because the kernel released the lock with the process. The file's text (pid,
host, start time, command) only names the holder in the refusal. Evaluation never takes this lock (a live run's
checkpoint can be evaluated); its own writes wait for each other on `RUN/.eval.lock`. On network filesystems
flock may be ignored or only per node: docs/robustness.md says what to do there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from idaa.errors import IdaaError

LOCK_FILE = ".lock"
EVAL_LOCK_FILE = ".eval.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a filesystem that does not do flock

# descriptors of the locks this process holds; a forked child (a DataLoader worker) closes its copies, so a lock
# is never kept alive by a worker that outlives a killed trainer
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The write lock of one run folder: taken by `acquire()`, held until `release()` or the process ends."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def acquire(self) -> None:
        """Take the lock without waiting; a live holder is a one-line refusal naming its pid, host and start."""
        if self.fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise IdaaError(self.refusal()) from None
            if exc.errno not in _NO_LOCKS:
                raise
            print(f"idaa: warning: cannot lock '{self.path}' ({os.strerror(exc.errno)}): this filesystem has no "
                  "working locks; make sure only one process writes this run folder", file=sys.stderr)
            return
        self.fd = fd
        _HELD.add(fd)
        _write_holder(fd)

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would race with a process that just opened it)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.discard(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def refusal(self) -> str:
        """'run folder RUN is in use by pid 1234 on host h since 10:02; wait for it or stop it'."""
        return f"run folder {self.folder} is in use by {_holder_text(read_holder(self.path))}; wait for it or stop it"

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def writer_of(folder: str | Path) -> str | None:
    """Who else holds `folder`'s run lock now ('pid 1234 on host h since 10:02'), or None when nobody does."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no run ever wrote there
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with a writer's exclusive lock only
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = read_holder(Path(folder) / LOCK_FILE)
            return None if holder.get("pid") == os.getpid() else _holder_text(holder)
        return None  # a filesystem without locks: nothing to tell
    finally:
        os.close(fd)  # closing drops the probe's lock
    return None


def read_holder(path: str | Path) -> dict[str, Any]:
    """The pid, host, start time and command written into a lock file; {} when it is missing or unreadable."""
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextmanager
def eval_lock(folder: str | Path) -> Iterator[None]:
    """Wait for, then hold, `folder/.eval.lock`, so two evaluations never interleave their writes there."""
    try:
        fd: int | None = os.open(Path(folder) / EVAL_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only or missing folder: the write itself will say what is wrong
        fd = None
    try:
        if fd is not None:
            _HELD.add(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
        yield
    finally:
        if fd is not None:
            _HELD.discard(fd)
            os.close(fd)  # closing drops the lock


def _holder_text(holder: dict[str, Any]) -> str:
    """'pid 1234 on host h since 10:02' from a lock file's holder, or 'another process' when it names nobody."""
    if "pid" not in holder:
        return "another process"
    who = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if isinstance(holder.get("started"), int | float):
        who += f" since {_clock(holder['started'])}"
    return who


def _write_holder(fd: int) -> None:
    """Name this process in the lock file; best effort (on a full disk the run's first real write says so)."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
              "command": " ".join(sys.argv)}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    except OSError:
        pass


def _clock(seconds: float) -> str:
    """'10:02' today, '2024-05-03 10:02' on another day."""
    started = time.localtime(seconds)
    same_day = time.strftime("%Y-%m-%d", started) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", started)
