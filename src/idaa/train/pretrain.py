"""The one training loop (`idaa pretrain`): every method, every adversary, kNN monitor, run folder.

`_pretrain` reads top to bottom: build everything (`_build`), continue a saved run (`_resume`), take the run
folder, then the epochs; `RunState` (train/run_state.py) owns the step, the position and the clocks and is the
one way a checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from idaa import distributed as dist
from idaa.adversaries import VAE_ADVERSARIES, Adversary, build_adversary
from idaa.analysis.embed import map_after_training
from idaa.checkpoints import CHECKPOINT_FORMAT, build_from_config, read_checkpoint
from idaa.data import Source, ViewPolicy, build_view_policy, make_feed, open_dataset, stopped_by_bad_image
from idaa.devices import hardware, native_bf16, tune_cpu_allocator, where_timed
from idaa.errors import IdaaError, warn
from idaa.fileio import file_digest
from idaa.methods import Method
from idaa.nets.vae import check_vae_fits, load_vae
from idaa.tracking import Trackers
from idaa.train.config import PretrainConfig
from idaa.train.monitor import KNNMonitor
from idaa.train.run_dir import LastCheckpoint, MetricsLog, RunLock
from idaa.train.run_state import EpochProgress, RunState, mean_over_ranks, on_rank0, open_run_folder
from idaa.train.state import GracefulStop, TrainingStopped, rng_state, seed_everything, set_rng_state
from idaa.train.step import apply_speedups, attack_at, forward_backward, to_memory_format


def build_optimizer(cfg: PretrainConfig, method: Method, steps_per_epoch: int) -> tuple[Any, Any]:
    """Adam or SGD plus a per-step schedule: linear warm-up, then cosine decay to zero (or constant)."""
    groups = method.parameter_groups()
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / max(total - warmup, 1)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _load_data(cfg: PretrainConfig) -> tuple[Source, Source | None]:
    train = open_dataset(cfg.dataset, cfg.data_dir, split="train", download=cfg.download, options=cfg.sources())
    if cfg.limit is not None:
        train = train.take(min(cfg.limit, len(train)), seed=cfg.seed)
    if cfg.batch_size > len(train):
        raise IdaaError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(train)} images)")
    try:
        test = open_dataset(cfg.dataset, cfg.data_dir, split="test", options=cfg.sources(), like=train)
    except IdaaError:
        test = None
    labelled = test is not None and bool((train.labels >= 0).all()) and bool((test.labels >= 0).all())
    return train, test if labelled else None


def pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Train `cfg.method` with `cfg.adversary`; returns the last metrics record ({} if nothing was left to do).

    `last.ckpt` (written atomically) holds everything a resumed run needs to continue bit-exactly, including
    the position inside an interrupted epoch. Raises TrainingStopped after a SIGTERM/SIGINT-triggered save and
    WriteFault when the disk refuses a write. Rank 0 holds the run folder's lock (RUN/.lock) until it returns.
    """
    cfg.validate()
    tune_cpu_allocator()
    created_group = not dist.active()
    device = dist.setup(cfg.device)
    created_group = created_group and dist.active()
    lock = RunLock(cfg.out)  # taken by rank 0 before it writes anything (prepare_run_dir)
    try:
        record = _pretrain(cfg, device, resume, overwrite, progress, lock)
        if cfg.embed_map and dist.is_main():  # reads last.ckpt like any analysis
            map_after_training(cfg.out, device, cfg.seed, progress)
        dist.barrier()  # every rank is done before any tears the group down
        return record
    finally:
        lock.release()
        if created_group:
            dist.teardown()


@dataclass
class _Run:
    """Everything a pretraining run trains with, built and checked before the run folder is touched."""

    train: Source
    test: Source | None
    method: Method  # the module whose weights are saved (SyncBN-converted under --sync-bn)
    model: torch.nn.Module  # what the step calls: the method, or its DistributedDataParallel wrapper
    feed: Any
    views: ViewPolicy
    adversary: Adversary | None
    vae: dict[str, str] | None  # the VAE's path and sha256, saved so that a resume refuses another one
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler
    knn: KNNMonitor | None
    steps_per_epoch: int
    total_steps: int  # of the whole schedule (all epochs), whatever --max-steps stops at
    autocast: AbstractContextManager
    params: list[torch.Tensor]  # every optimised parameter (their gradients are checked for NaN/inf)


def _pretrain(cfg: PretrainConfig, device: torch.device, resume: bool, overwrite: bool,
              progress: bool, lock: RunLock) -> dict[str, Any]:
    """Build, resume, take the run folder, then train epoch by epoch; each epoch ends by one checkpoint."""
    world = dist.world_size()
    if cfg.batch_size % world:
        raise IdaaError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {world} processes")
    last_path = Path(cfg.out) / "last.ckpt"
    if resume and not last_path.is_file():
        raise IdaaError(f"cannot resume: '{last_path}' does not exist")
    last = LastCheckpoint(last_path)
    if resume:
        last.read_for_resume()  # checked again once the folder's lock is held (open_run_folder)
    blob = read_checkpoint(last_path, map_location=device) if resume else None
    run = _build(cfg, device)
    data_meta = {"name": run.train.name, "image_size": run.train.image_size, "channels": run.train.channels,
                 "mean": list(run.train.mean), "std": list(run.train.std), "num_classes": len(run.train.classes)}
    state = RunState(last, {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "data": data_meta,
                            "world_size": world}, run.vae,
                     {"method": run.method, "optimizer": run.optimizer, "scheduler": run.scheduler,
                      "scaler": run.scaler}, run.feed)
    if blob is not None:
        _resume(cfg, run, state, blob)
    out, trackers = open_run_folder(cfg, cfg.out, {"command": "pretrain", **dataclasses.asdict(cfg)}, resume,
                                    overwrite, lock, state.last, state.step)
    log = MetricsLog(out / "metrics.jsonl")
    total = run.total_steps if cfg.max_steps is None else min(cfg.max_steps, run.total_steps)
    bar = tqdm(total=total, initial=min(state.step, total), desc=f"{cfg.method}+{cfg.adversary}", unit="step",
               disable=not (progress and dist.is_main()), dynamic_ncols=True)
    start_epoch = state.position["epoch"] if state.position else (blob["epoch"] + 1 if blob is not None else 1)
    state.started, record = time.perf_counter(), {}
    with GracefulStop() as stopper, state.last.on_write_fault():
        for epoch in range(start_epoch, cfg.epochs + 1):
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                break
            run.method.train()
            this_epoch = state.begin_epoch(epoch, len(run.train), device)
            stop = _train_epoch(cfg, run, state, this_epoch, bar, stopper)
            state.count_training(this_epoch)
            rng = rng_state()  # before any evaluation, so a resumed run draws what this one would have
            seconds = this_epoch.seconds()
            complete = this_epoch.done == run.steps_per_epoch
            where = None if complete else this_epoch.where(seconds)
            if not (run.feed.failure or stop == "signal"):  # the epoch's metrics line, then its checkpoint
                record = _epoch_record(cfg, run, state, this_epoch, seconds, stop, bar)
                on_rank0(_log_record, log, trackers, record, state.step)
            # an unreadable file under --bad-images error is resumable from this very batch
            state.checkpoint(last_path, epoch - 1 if run.feed.failure else epoch - (not complete), rng, where)
            if run.feed.failure:
                raise stopped_by_bad_image(run.feed.failure, str(last_path))
            if stop == "signal":
                raise TrainingStopped(stopper.signum, state.step, last_path)
            if complete and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
                state.checkpoint(out / f"epoch{epoch:04d}.ckpt", epoch, rng, None)
            if stop:
                break
    bar.close()
    trackers.close()
    return record


def _build(cfg: PretrainConfig, device: torch.device) -> _Run:
    """Data, method, feed, views, adversary, optimiser and monitor, in the order the seeded draws expect."""
    world, rank = dist.world_size(), dist.rank()
    train, test = _load_data(cfg)
    seed_everything(cfg.seed)
    method = build_from_config(dataclasses.asdict(cfg), train.channels).to(device)
    apply_speedups(method, cfg.channels_last, cfg.compile)
    if rank:  # identical initial weights (DDP broadcasts rank 0's), but each rank draws its own augmentations
        seed_everything(cfg.seed + 1_000_003 * rank)
    policy = cfg.policy or method.view_policy  # streamed crops are made in the workers: views add flip + colour
    feed = make_feed(train, device, cfg.batch_size, cfg.batch_size // world, rank, policy,
                     views=3 if cfg.adversary == "random-view" else 2)
    views = build_view_policy(policy, train.image_size, train.mean, train.std, crop=not feed.crops).to(device)
    adversary, vae = _build_adversary(cfg, train, views, device)
    method, model = _parallel(cfg, method, adversary, device)
    steps_per_epoch = len(train) // cfg.batch_size
    optimizer, scheduler = build_optimizer(cfg, method, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    knn = KNNMonitor(train, test, cfg, device) if test is not None and cfg.knn_every else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return _Run(train, test, method, model, feed, views, adversary, vae, optimizer, scheduler, scaler, knn,
                steps_per_epoch, steps_per_epoch * cfg.epochs, autocast, params)


def _build_adversary(cfg: PretrainConfig, train: Source, views: ViewPolicy,
                     device: torch.device) -> tuple[Adversary | None, dict[str, str] | None]:
    """The adversary, and for the VAE-based ones the VAE's path and sha256 (checked to fit the data)."""
    vae, vae_ref = None, None
    if cfg.adversary in VAE_ADVERSARIES:
        if cfg.vae is None:
            raise IdaaError(f"adversary '{cfg.adversary}' needs --vae VAE.pt (make one with 'idaa vae train')")
        vae = load_vae(cfg.vae, map_location=device, to_train_with=True).set_precision(cfg.vae_precision)
        if cfg.vae_precision == "bf16" and not native_bf16(device.type) and dist.is_main():
            warn(f"--vae-precision bf16 on {hardware(device.type)}: this CPU has no native bf16 (AVX512-BF16 or "
                 "AMX), so the VAE's passes are emulated, far slower than fp32 (about 20x on an AVX2 EPYC, "
                 "docs/results.md); use --vae-precision fp32 here")
        check_vae_fits(vae, train.name, train.image_size, train.mean, train.std)
        vae_ref = {"path": str(cfg.vae), "sha256": file_digest(cfg.vae)}
    adversary = build_adversary(cfg.adversary, vae=vae, eps=cfg.eps, steps=cfg.attack_steps,
                                step_size=cfg.attack_step_size, norm=cfg.attack_norm,
                                random_start=cfg.random_start, view_fn=views)
    return adversary, vae_ref


def _parallel(cfg: PretrainConfig, method: Method, adversary: Adversary | None,
              device: torch.device) -> tuple[Method, torch.nn.Module]:
    """Under torchrun: the method (SyncBN-converted under --sync-bn) and its DDP wrapper; else the method twice."""
    if not dist.active():
        return method, method
    if cfg.sync_bn:
        if device.type != "cuda":
            raise IdaaError("--sync-bn needs CUDA devices: torch's SyncBatchNorm has no CPU implementation")
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    # without an adversary the adversarial BN twins receive no gradient
    model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                    find_unused_parameters=adversary is None or cfg.attack_every > 1
                                    or cfg.attack_from_epoch > 1 or cfg.attack_graph == "shared")
    return method, model


def _resume(cfg: PretrainConfig, run: _Run, state: RunState, blob: dict[str, Any]) -> None:
    """Weights, optimiser, schedule, scaler, RNG streams, step and position of the saved run."""
    saved_vae = blob.get("vae")
    if saved_vae and run.vae and saved_vae["sha256"] != run.vae["sha256"]:
        raise IdaaError(f"cannot resume: the VAE '{cfg.vae}' differs from the one this run started with "
                        f"({saved_vae['path']}, sha256 {saved_vae['sha256'][:12]})")
    try:
        run.method.load_state_dict(blob["method"])
        run.optimizer.load_state_dict(blob["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise IdaaError(f"cannot resume: '{state.last.path}' does not match this configuration "
                        f"({str(exc).splitlines()[0][:120]})") from None
    run.scheduler.load_state_dict(blob["scheduler"])
    if "scaler" in blob:
        run.scaler.load_state_dict(blob["scaler"])
    state.resume_from(blob)
    state.last.step = state.step
    world, rank = dist.world_size(), dist.rank()
    ranks = blob.get("rng_ranks") or [blob["rng"]]
    if len(ranks) == world:
        set_rng_state(ranks[rank])
    else:  # another world size: rank 0 continues its stream, the others start fresh ones
        set_rng_state(blob["rng"])
        if rank:
            seed_everything(cfg.seed + 1_000_003 * rank + state.step)


def _train_epoch(cfg: PretrainConfig, run: _Run, state: RunState, progress: EpochProgress, bar: Any,
                 stopper: GracefulStop) -> str | None:
    """This rank's share of the epoch's batches from where it stands; returns why it stopped early, if it did."""
    world = dist.world_size()
    batches = run.feed.batches(progress.epoch, progress.order, progress.first)
    for i, batch in enumerate(batches, start=progress.first):
        losses = _train_step(cfg, run, state, progress, batch)
        progress.done = i + 1
        run.scheduler.step()
        bar.update()
        if state.step % 10 == 0:
            bar.set_postfix(epoch=progress.epoch, loss=f"{losses.total.item():.3f}")
        signum = dist.max_int(stopper.signum or 0, progress.sums.device) if world > 1 else stopper.signum
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            return "max_steps"
        if signum:
            stopper.signum = signum
            return "signal"
        if cfg.checkpoint_steps and state.step % cfg.checkpoint_steps == 0 and progress.done < run.steps_per_epoch:
            seconds = progress.seconds()
            state.count_training(progress)
            state.checkpoint(state.last.path, progress.epoch - 1, rng_state(), progress.where(seconds))
            progress.mark = time.perf_counter()
    return None


def _train_step(cfg: PretrainConfig, run: _Run, state: RunState, progress: EpochProgress, batch: Any) -> Any:
    """One optimisation step (or, under --skip-nonfinite, one skipped); returns its losses."""
    v1 = to_memory_format(run.views(batch.first), cfg.channels_last)
    v2 = to_memory_format(run.views(batch.second), cfg.channels_last)
    # a skipped step must not leave NaN in BN statistics either: keep the buffers to put back
    buffers = [b.clone() for b in run.method.buffers()] if cfg.skip_nonfinite > state.skipped else None
    attack = attack_at(run.adversary, cfg.attack_every, cfg.attack_from_epoch, progress.epoch, state.step)
    run.optimizer.zero_grad(set_to_none=True)
    losses = forward_backward(run.model, attack, v1, v2, source=batch.source, alpha=cfg.alpha,
                              autocast=run.autocast, scaler=run.scaler)
    problem = _nonfinite(losses, run.params, check_grads=not run.scaler.is_enabled(), agree=dist.world_size() > 1)
    state.step += 1
    if problem is None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.method.after_step(state.step / run.total_steps)
        adv = losses.adversarial.detach() if losses.adversarial is not None else progress.sums.new_zeros(())
        progress.sums += torch.stack([losses.total.detach(), losses.clean.detach(), adv]).float()
        progress.seen += 1
    elif buffers is not None:
        state.skipped += 1
        run.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, kept in zip(run.method.buffers(), buffers, strict=True):
                buffer.copy_(kept)
        tqdm.write(f"step {state.step}: non-finite {problem}; update skipped ({state.skipped}/{cfg.skip_nonfinite})")
    else:
        last = state.last.path
        kept = f"the last good checkpoint '{last}' is kept" if last.is_file() else "no checkpoint was written"
        raise IdaaError(f"non-finite {problem} at step {state.step} (epoch {progress.epoch}); {kept}; "
                        f"--skip-nonfinite K tolerates up to K such steps")
    return losses


def _epoch_record(cfg: PretrainConfig, run: _Run, state: RunState, progress: EpochProgress, seconds: float,
                  stop: str | None, bar: Any) -> dict[str, Any]:
    """The epoch's metrics line: mean losses over ranks, speed, the kNN monitor when due, the clocks."""
    loss, clean, adv_loss = (mean_over_ranks(progress.sums) / max(progress.seen, 1)).tolist()
    record = {"epoch": progress.epoch, "step": state.step, "loss": loss, "clean_loss": clean,
              "adversarial_loss": adv_loss if run.adversary is not None else None,
              "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": (progress.done - progress.first)
              * cfg.batch_size / max(time.perf_counter() - progress.started, 1e-9), "epoch_time": seconds,
              "time": state.elapsed()}
    if progress.done != run.steps_per_epoch:
        record["partial"] = True
    if state.skipped:
        record["skipped_steps"] = state.skipped
    record.update(run.feed.end_epoch(bar.write))
    finished = progress.epoch == cfg.epochs or stop is not None
    if run.knn is not None and (progress.epoch % cfg.knn_every == 0 or finished):
        monitor_start = time.perf_counter()
        record["knn_top1"] = run.knn(run.method)  # every rank embeds its share of the bank and the queries
        state.clock["monitor_time"] += time.perf_counter() - monitor_start
        if dist.is_main():
            bar.write(f"epoch {progress.epoch}: loss {loss:.4f}  kNN top-1 {record['knn_top1']:.2f}%")
    record.update(state.clock)
    # the clocks' machine, its kind and how busy it was: `idaa reproduce` converts a VAE's seconds beside it, and
    # flags runs timed on other hardware or that shared the CPUs with other work (their costs are then bent)
    record |= where_timed(progress.sums.device.type)
    return record


def _log_record(log: MetricsLog, trackers: Trackers, record: dict[str, Any], step: int) -> None:
    """The epoch's metrics line, then the trackers (rank 0's part of the epoch's end)."""
    log.write(record)
    trackers.log_metrics(record, step)


def _nonfinite(losses: Any, params: list[torch.Tensor], check_grads: bool = True, agree: bool = False) -> str | None:
    """None when the step is finite (one host sync), else the term that went bad: attack, losses or gradient.

    With `agree`, the flags are combined over ranks so that every rank skips or stops at the same step.
    """
    flags = [torch.isfinite(losses.clean)]
    flags.append(torch.isfinite(losses.adversarial) if losses.adversarial is not None else flags[0])
    flags.append(torch.isfinite(losses.x_adv).all() if losses.x_adv is not None else flags[0])
    grads = [p.grad for p in params if p.grad is not None]
    if check_grads and grads:
        flags.append(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    flags = torch.stack(flags)
    if agree:
        flags = dist.all_true(flags)
    if bool(flags.all()):
        return None
    clean_ok, adversarial_ok, attack_ok, *grad_ok = flags.tolist()
    if not attack_ok:
        return "attack output (the adversarial view x')"
    if not clean_ok:
        return f"clean loss ({losses.clean.item()})" if not agree else "clean loss"
    if not adversarial_ok:
        return f"adversarial loss ({losses.adversarial.item()})" if not agree else "adversarial loss"
    return "gradient"

