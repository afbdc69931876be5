"""Where a training run stands (step, position inside the epoch, clocks) and the one way it is saved.

`RunState.checkpoint()` is the only writer of pretraining checkpoints. `open_run_folder` and `save_checkpoint`
are the run-folder setup and the checkpoint write that `idaa pretrain` and `idaa semi` share: rank 0 writes,
and a refusal there stops every rank at the same point.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from idaa import distributed as dist
from idaa.errors import IdaaError, WriteFault
from idaa.fileio import reporting_write_faults
from idaa.tracking import Trackers, plan_trackers
from idaa.train.run_dir import (
    LastCheckpoint,
    MetricsLog,
    RunLock,
    atomic_torch_save,
    prepare_run_dir,
    remove_stale_temporaries,
    write_config,
)
from idaa.train.settings import RunSettings

__all__ = ["EpochProgress", "RunState", "on_rank0", "open_run_folder", "save_checkpoint"]


def on_rank0(write: Callable[..., object], *args: Any) -> None:
    """`write(*args)` on rank 0; a write fault there stops every rank at the same point (else they would hang)."""
    fault = None
    if dist.is_main():
        try:
            write(*args)
        except WriteFault as exc:
            fault = str(exc)
    fault = dist.broadcast_object(fault)
    if fault:
        raise WriteFault(fault)


def _write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically; a refused write is a one-line WriteFault naming it."""
    with reporting_write_faults("the checkpoint", path):
        atomic_torch_save(state, path)


def save_checkpoint(state: dict[str, Any], path: Path, checkpointed: LastCheckpoint) -> None:
    """Every rank calls it, rank 0 writes: a failed save stops the run, which never trains on unsaved."""
    on_rank0(_write_checkpoint, state, path)
    if path == checkpointed.path:
        checkpointed.step = state["step"]


def open_run_folder(settings: RunSettings, out: str | Path, config: dict[str, Any], resume: bool, overwrite: bool,
                    lock: RunLock, checkpointed: LastCheckpoint, step: int) -> tuple[Path, Trackers]:
    """Rank 0 checks the trackers, takes the folder (its lock first) and writes config.yaml; a refusal stops all.

    On resume the metrics logged after the checkpoint's `step` are dropped (they will be logged again).
    """
    folder, failure, trackers = Path(out), None, Trackers()  # only rank 0 touches the folder and the trackers
    if dist.is_main():
        try:  # trackers are checked (extras, MLflow reachable) before the run folder is touched
            trackers = plan_trackers(settings.logger, out, resume, mlflow_uri=settings.mlflow_uri,
                                     wandb_project=settings.wandb_project, wandb_entity=settings.wandb_entity)
            folder = prepare_run_dir(out, overwrite=overwrite, resume=resume, lock=lock)
            checkpointed.check_unchanged()  # the checkpoint read before the lock is still the one on disk
            with checkpointed.on_write_fault():
                remove_stale_temporaries(folder)
                write_config(folder / "config.yaml", config)
                trackers.start(step if resume else None).log_config(config)
                if resume:
                    MetricsLog(folder / "metrics.jsonl").truncate_after(step)
        except IdaaError as exc:
            failure = exc
    failure = dist.broadcast_object(failure)
    if failure:
        raise failure
    return folder, trackers


def shuffle(n: int, device: torch.device) -> torch.Tensor:
    """The epoch's order of the training images: drawn by rank 0 from its stream, the same on every rank."""
    order = torch.randperm(n, device=device)
    if dist.active():
        torch.distributed.broadcast(order, src=0)
    return order


def mean_over_ranks(sums: torch.Tensor) -> torch.Tensor:
    """Per-rank loss sums averaged over ranks (each rank's loss is the mean over its share of the batch)."""
    if not dist.active():
        return sums
    total = sums.clone()
    torch.distributed.all_reduce(total)
    return total / dist.world_size()


@dataclass
class EpochProgress:
    """The epoch in progress: its shuffle, the batches done, the running loss sums and its seconds."""

    epoch: int
    order: torch.Tensor
    first: int  # the batch this process began at: 0, or where a resumed run continues
    sums: torch.Tensor  # (total, clean, adversarial) loss summed over the steps taken
    seen: int  # steps whose losses are in `sums` (skipped ones are not)
    prior: float  # seconds spent in this epoch before a resume
    done: int = -1  # batches done so far (the next batch's index)
    started: float = field(default_factory=time.perf_counter)
    mark: float = field(default_factory=time.perf_counter)  # since when training time is being counted

    def __post_init__(self) -> None:
        self.done = self.first if self.done < 0 else self.done

    def seconds(self) -> float:
        """Seconds in this epoch, those before a resume included."""
        return self.prior + time.perf_counter() - self.started

    def where(self, seconds: float) -> dict[str, Any]:
        """The position to save inside an interrupted epoch (every rank calls it: the sums are averaged)."""
        return {"epoch": self.epoch, "batch": self.done, "order": self.order.cpu(),
                "sums": mean_over_ranks(self.sums).cpu(), "seen": self.seen, "seconds": seconds}


@dataclass
class RunState:
    """A pretraining run's step, resume position and clocks, and `checkpoint()`, the one way it is saved."""

    last: LastCheckpoint  # RUN/last.ckpt and the step it holds
    header: dict[str, Any]  # format, config, data, world_size: the same in every checkpoint of the run
    vae: dict[str, str] | None  # the VAE's path and sha256 (a resume refuses another one)
    parts: dict[str, Any]  # method, optimizer, scheduler, scaler: saved by their state_dict()
    feed: Any  # the feed; its screen counts the images left out under --bad-images skip
    step: int = 0
    position: dict[str, Any] | None = None  # where a resumed run continues inside an interrupted epoch
    skipped: int = 0  # non-finite steps skipped under --skip-nonfinite
    elapsed_before: float = 0.0  # wall time carries over a resume: "time" in metrics.jsonl is the run's
    # seconds in training steps alone and in the kNN monitor, kept apart (checkpoint writes in neither)
    clock: dict[str, float] = field(default_factory=lambda: {"train_time": 0.0, "monitor_time": 0.0})
    started: float = field(default_factory=time.perf_counter)

    def resume_from(self, blob: dict[str, Any]) -> None:
        """Take the step, the position and the clocks of a saved checkpoint."""
        self.step, self.position = blob["step"], blob.get("position")
        self.elapsed_before = float(blob.get("elapsed", 0.0))
        self.clock = {"train_time": float(blob.get("train_time", self.elapsed_before)),
                      "monitor_time": float(blob.get("monitor_time", 0.0))}

    def elapsed(self) -> float:
        """The run's wall time so far, earlier invocations included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def begin_epoch(self, epoch: int, n: int, device: torch.device) -> EpochProgress:
        """A fresh shuffle, or the interrupted epoch's saved order, sums and images left out."""
        saved, self.position = self.position, None
        if saved is not None and saved["epoch"] == epoch:  # continue inside an interrupted epoch
            self.feed.screen.left_out = saved.get("bad_images", 0)  # images left out before the interruption
            return EpochProgress(epoch, saved["order"].to(device), saved["batch"], saved["sums"].to(device),
                                 saved["seen"], saved["seconds"])
        return EpochProgress(epoch, shuffle(n, device), 0, torch.zeros(3, device=device), 0, 0.0)

    def count_training(self, progress: EpochProgress) -> None:
        """Add the seconds since `progress.mark` to the training clock (the caller restarts the mark after a save)."""
        self.clock["train_time"] += time.perf_counter() - progress.mark

    def checkpoint(self, path: Path, epoch_done: int, rng: dict[str, Any], where: dict[str, Any] | None) -> None:
        """Save the run to `path` (last.ckpt or epochNNNN.ckpt); every rank calls it (their RNG states are
        gathered), rank 0 writes."""
        rng_ranks = dist.gather_objects(rng)
        state = {**self.header, "rng_ranks": rng_ranks if self.header["world_size"] > 1 else None, "vae": self.vae,
                 **{name: part.state_dict() for name, part in self.parts.items()}, "epoch": epoch_done,
                 "step": self.step, "position": where and {**where, "bad_images": self.feed.screen.left_out},
                 "rng": rng, "elapsed": self.elapsed(), **self.clock}
        save_checkpoint(state, path, self.last)
