"""Fetch and unpack the official CIFAR-10/100 and STL-10 archives, verifying their md5 checksums."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from idaa.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """Where a dataset archive lives, its expected md5 and the folder it unpacks to."""

    url: str
    filename: str
    md5: str
    folder: str


ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
    "stl10": Archive(
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "stl10_binary.tar.gz",
        "91f7769df0f17e558f3565bffb0c7dfb",
        "stl10_binary",
    ),
}


def _fetch(url: str, dest: Path) -> str:
    """Stream url into dest and return its md5 hex digest; network failures become one-line DataErrors."""
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            while chunk := response.read(_CHUNK):
                md5.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise DataError(f"cannot download '{url}': HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"cannot download '{url}': {exc.reason}") from exc
    except (OSError, HTTPException, ValueError) as exc:
        raise DataError(f"cannot download '{url}': {exc or type(exc).__name__}") from exc
    return md5.hexdigest()


def _check_member(member: tarfile.TarInfo, archive: str) -> None:
    """Refuse members that could write outside the extraction folder (absolute, '..', links, devices)."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")) or ".." in path.parts:
        raise DataError(f"unsafe path '{member.name}' in archive '{archive}'")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        if target.is_absolute() or ".." in target.parts:
            raise DataError(f"unsafe link '{member.name}' -> '{member.linkname}' in archive '{archive}'")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise DataError(f"unsupported member '{member.name}' in archive '{archive}'")


def _extract(archive: Path, dest: Path, label: str) -> None:
    """Unpack a tar archive into dest after checking every member; corrupt archives become DataErrors."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, label)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(dest, members=members)
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"corrupt or truncated archive '{label}': {exc or type(exc).__name__}") from exc


def download_and_extract(
    name: str, data_dir: str | Path, url: str | None = None, md5: str | None = None
) -> Path:
    """Download (unless already present), verify and unpack a dataset archive; returns the unpacked folder."""
    if name not in ARCHIVES:
        raise DataError(f"no download for dataset '{name}'; available: {', '.join(ARCHIVES)}")
    spec = ARCHIVES[name]
    data_dir = Path(data_dir).expanduser()
    target = data_dir / spec.folder
    if target.is_dir():
        return target
    url = url or spec.url
    expected = (md5 or spec.md5).lower()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".idaa-download-{spec.filename}.", dir=data_dir)
        os.close(fd)
        work = Path(tempfile.mkdtemp(prefix=f".idaa-extract-{name}.", dir=data_dir))
    except OSError as exc:
        raise DataError(f"cannot write to data directory '{data_dir}': {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s to %s", url, data_dir)
        actual = _fetch(url, tmp)
        if actual != expected:
            raise DataError(f"checksum mismatch for '{url}': expected md5 {expected}, got {actual}")
        _extract(tmp, work, url)
        unpacked = work / spec.folder
        if not unpacked.is_dir():
            raise DataError(f"archive '{url}' does not contain the folder '{spec.folder}'")
        try:
            os.replace(unpacked, target)
        except OSError as exc:
            if not target.is_dir():  # a concurrent download may have won the race; that is fine
                raise DataError(f"cannot move '{unpacked}' to '{target}': {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return target
