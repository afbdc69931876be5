"""Data-parallel training on torch.distributed (launched by `torchrun`): process group, gathers, agreement.

One code path: without a process group (a plain `idaa pretrain`) every helper here is the identity, so the
losses, the loop and the tests are the same on one CPU, one GPU and many. Launch several processes with
`torchrun --nproc-per-node N -m idaa pretrain ...` (docs/distributed.md has the SLURM recipe).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from idaa.errors import IdaaError


def active() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Only rank 0 writes the run folder, logs and checkpoints."""
    return rank() == 0


def setup(device: str) -> torch.device:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU); pick the device.

    Without torchrun's variables (WORLD_SIZE unset or 1) this only resolves the device.
    """
    from idaa.devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world <= 1:
        return resolved
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda":
        if local >= torch.cuda.device_count():
            raise IdaaError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        resolved = torch.device("cuda", local)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return resolved


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(all ranks' rows concatenated in rank order, offset of this rank's rows), differentiable.

    The gather's backward sums every rank's gradient for this rank's rows, so with DDP's averaging the
    parameter gradient equals that of one process holding the whole batch (not scaled by the world size).
    Every rank must pass the same number of rows.
    """
    if not active():
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous()) if x.requires_grad else _gather_no_grad(x)
    return torch.cat(list(parts)), rank() * len(x)


def _gather_no_grad(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of a constant (keys for a queue, features for evaluation)."""
    return torch.cat(_gather_no_grad(x)) if active() else x


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of a constant in rank order when ranks hold different numbers of rows (evaluation shares).

    Rows are padded to the longest share for the collective and trimmed after; with nccl, `x` must be on CUDA.
    """
    if not active():
        return x
    sizes = _gather_no_grad(torch.tensor([len(x)], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[:len(x)] = x
    return torch.cat([part[:int(n.item())] for part, n in zip(_gather_no_grad(padded), sizes, strict=True)])


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (e.g. correct and total counts of each rank's share of an evaluation)."""
    if not active():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def all_true(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise AND of boolean flags over ranks (so every rank takes the same decision)."""
    if not active():
        return flags
    values = flags.to(torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.bool()


def max_int(value: int, device: torch.device) -> int:
    """The largest of an integer over ranks (e.g. a signal number one rank received)."""
    if not active():
        return value
    t = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of a picklable object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's value of a picklable object, in rank order (e.g. RNG states for a checkpoint)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
