"""Run folders: refuse to clobber an existing run, write files atomically, append metrics as JSON lines."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from idaa.errors import IdaaError
from idaa.fileio import atomic_torch_save, atomic_write_bytes

# the atomic writers live in idaa.fileio (evaluation uses them too); re-exported for the training code
__all__ = ["MetricsLog", "atomic_torch_save", "atomic_write_bytes", "prepare_run_dir", "remove_stale_temporaries",
           "write_config"]


def prepare_run_dir(out: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create `out`, or accept it when resuming; an existing non-empty run needs --resume or --overwrite."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise IdaaError(f"output path '{path}' exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise IdaaError(f"run folder '{path}' already exists; pass --resume to continue it or --overwrite to "
                        "replace it")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-")
        probe.close()
    except OSError as exc:
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
        atomic_write_bytes(self.path, lambda handle: handle.write(text))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # an unreadable line (a torn write) is dropped
