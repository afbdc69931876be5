"""CIFAR-style python pickles read safely: only numpy arrays and plain containers are rebuilt, never code."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from idaa.errors import DataError, exception_text

__all__ = ["as_text", "pickle_field", "read_pickle"]

# Globals a CIFAR pickle may reference; anything else is refused so a hostile pickle cannot run code.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers (what CIFAR pickles hold)."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the numpy globals CIFAR pickles need; refuse everything else."""
        canonical = module.replace("numpy._core", "numpy.core")
        if (canonical, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if canonical.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            canonical = canonical.replace("numpy.core", "numpy._core")
        return getattr(importlib.import_module(canonical), name)


def read_pickle(path: Path) -> dict:
    """Load a CIFAR-style pickle (bytes keys) safely, turning any parse failure into a DataError."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing file '{path}'") from None
    except OSError as exc:
        raise DataError(f"cannot read file '{path}': {exception_text(exc)}") from exc
    except Exception as exc:  # pickle raises many types (EOFError, UnpicklingError, ValueError, ...)
        raise DataError(f"corrupt or truncated file '{path}': {exception_text(exc)}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"corrupt file '{path}': expected a pickled dict, got {type(obj).__name__}")
    return obj


def pickle_field(obj: dict, key: str, path: Path) -> Any:
    """Fetch a field stored under a bytes or str key, naming the file when it is absent."""
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise DataError(f"corrupt file '{path}': no '{key}' entry")


def as_text(value: Any) -> str:
    """Decode a bytes class name from a python-2 pickle into str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


