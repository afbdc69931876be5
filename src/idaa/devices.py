"""Device selection shared by training, evaluation and the demo."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import socket
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


@functools.cache
def machine_id() -> str:
    """This machine since its last boot (Linux's boot id, else the host name): which runs were timed side by side."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return socket.gethostname()


def native_bf16(device_type: str) -> bool:
    """Whether bf16 runs natively on this device (CUDA, or a CPU with AVX512-BF16 or AMX); elsewhere it is emulated."""
    if device_type == "cuda":
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


@functools.cache
def hardware(device_type: str) -> str:
    """What a run's clocks ran on ('AMD EPYC (AVX2)', 'NVIDIA H200'): costs compare only on one kind of hardware."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    bf16 = ", native bf16" if native_bf16("cpu") else ""
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}{bf16})"


def machine_load() -> float | None:
    """The 1-minute load average over the CPUs this process may use (above 1: more runnable work than cores)."""
    try:
        return os.getloadavg()[0] / max(len(os.sched_getaffinity(0)), 1)
    except (OSError, AttributeError):  # no load average on this platform
        return None


def where_timed(device_type: str) -> dict[str, str | float | None]:
    """The fields an epoch record keeps beside its clocks: which machine, what kind of hardware, how busy."""
    return {"machine": machine_id(), "hardware": hardware(device_type), "load": machine_load()}


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
    libc = _glibc()
    if os.environ.get("IDAA_MALLOC_TUNING", "1") == "0" or libc is None:
        return False
    limit = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB free at the top of the heap
    _allocator_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, limit)
                            and libc.mallopt(_M_TOP_PAD, 64 * 2**20))
    return _allocator_tuned


def release_free_memory() -> bool:
    """Hand the free pages of glibc's heap back to the kernel (malloc_trim), e.g. before forking worker processes.

    glibc gives back only the top of its heap (with `tune_cpu_allocator`, not even that), so the ~2 KB per file a
    cold listing of a folder frees stays resident; forked workers would inherit those pages and, as they reuse them,
    copy them (a 100k-file folder: ~200 MB more across the run). Linux/glibc only; returns whether any was released.
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt and malloc_trim), else None (macOS, Windows, musl...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
