"""Device selection shared by training, evaluation and the demo."""

from __future__ import annotations

import ctypes
import os
import sys

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


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc mallopt parameters (malloc.h)
_allocator_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep freed CPU memory in glibc's heap instead of handing it back to the kernel after every step.

    By default glibc serves every block over 32 MB (a ResNet-18 activation at batch 128 is 33.5 MB) with a fresh
    mmap, so each step page-faults its activations in again: at batch 128 that was 0.7 s of kernel time per plain
    SimCLR step and 1.4-2.7 s per IDAA step. With mmap off and trimming held back, a step reuses the memory the
    previous one freed. Linux/glibc only; `IDAA_MALLOC_TUNING=0` leaves the allocator alone. Returns whether it
    is in effect.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("IDAA_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    limit = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB free at the top of the heap
    _allocator_tuned = bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, limit)
                            and mallopt(_M_TOP_PAD, 64 * 2**20))
    return _allocator_tuned


def release_free_memory() -> bool:
    """Hand the free pages of glibc's heap back to the kernel (malloc_trim), e.g. before forking worker processes.

    With `tune_cpu_allocator` the heap keeps whatever was freed, such as the ~2 KB per file a cold listing of a
    folder leaves behind; forked workers would inherit those pages and, as they reuse them, copy them (a 100k-file
    folder: ~200 MB more across the run). Linux/glibc only; returns whether anything was released.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(trim(0))
