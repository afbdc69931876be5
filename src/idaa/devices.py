"""Device selection shared by training, evaluation and the demo."""

from __future__ import annotations

import torch

from idaa.errors import IdaaError


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable device is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise IdaaError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IdaaError(f"device {device!r} requested but CUDA is not available")
    return dev
