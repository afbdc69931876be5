"""Evaluation result files (eval.json, eval_knn.json, eval_transfer_*.json): written atomically as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idaa.errors import IdaaError
from idaa.fileio import atomic_write_bytes


def write_result(path: str | Path, record: dict[str, Any]) -> Path:
    """Write `record` as indented JSON without ever leaving a torn file; an unwritable path is a one-line error."""
    path = Path(path)
    text = (json.dumps(record, indent=2, default=str) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, lambda handle: handle.write(text))
    except OSError as exc:
        raise IdaaError(f"cannot write '{path}' ({exc.strerror or type(exc).__name__})") from None
    return path
