"""Evaluation result files (eval.json, eval_knn.json, eval_transfer_*.json): written atomically as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idaa.errors import IdaaError, WriteFault
from idaa.fileio import atomic_write_bytes, write_fault
from idaa.runlock import eval_lock


def write_result(path: str | Path, record: dict[str, Any]) -> Path:
    """Write `record` as indented JSON without ever leaving a torn file; an unwritable path is a one-line error.

    Two evaluations writing into one folder take turns (its .eval.lock); the training lock is never taken.
    """
    path = Path(path)
    text = (json.dumps(record, indent=2, default=str) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with eval_lock(path.parent):
            atomic_write_bytes(path, lambda handle: handle.write(text))
    except OSError as exc:
        fault = write_fault(exc, "the evaluation result", path)
        if fault is not None:
            raise WriteFault(f"{fault}; the checkpoint and earlier results are intact: evaluate again "
                             "(cached features are reused)") from None
        raise IdaaError(f"cannot write '{path}' ({exc.strerror or type(exc).__name__})") from None
    return path
