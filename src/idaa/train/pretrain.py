"""The one training loop (`idaa pretrain`): every method, every adversary, kNN monitor, run folder."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from idaa import distributed as dist
from idaa.adversaries import build_adversary
from idaa.checkpoints import CHECKPOINT_FORMAT, build_from_config, read_checkpoint
from idaa.data.feeds import make_feed, stopped_by_bad_image
from idaa.data.protocol import Source
from idaa.data.sources import open_dataset
from idaa.data.views import build_view_policy
from idaa.devices import tune_cpu_allocator
from idaa.errors import IdaaError, WriteFault
from idaa.fileio import reporting_write_faults
from idaa.methods import Method
from idaa.nets.vae import check_vae_fits, load_vae
from idaa.tracking import Trackers, plan_trackers
from idaa.train.config import PretrainConfig
from idaa.train.monitor import KNNMonitor
from idaa.train.run_dir import (
    LastCheckpoint,
    MetricsLog,
    RunLock,
    atomic_torch_save,
    prepare_run_dir,
    remove_stale_temporaries,
    write_config,
)
from idaa.train.state import GracefulStop, TrainingStopped, rng_state, seed_everything, set_rng_state
from idaa.train.step import apply_speedups, attack_at, forward_backward, to_memory_format

VAE_ADVERSARIES = ("idaa", "idaa-nodecomp", "latent-noise")


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


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        if cfg.embed_map and dist.is_main():
            from idaa.analysis.embed import map_after_training  # lazily: reads last.ckpt like any analysis

            map_after_training(cfg.out, device, cfg.seed, progress)
        dist.barrier()  # every rank is done before any tears the group down
        return record
    finally:
        lock.release()
        if created_group:
            dist.teardown()


def _pretrain(cfg: PretrainConfig, device: torch.device, resume: bool, overwrite: bool,
              progress: bool, lock: RunLock) -> dict[str, Any]:
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    if cfg.batch_size % world:
        raise IdaaError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {world} processes")
    local_batch = cfg.batch_size // world
    last_path = Path(cfg.out) / "last.ckpt"
    if resume and not last_path.is_file():
        raise IdaaError(f"cannot resume: '{last_path}' does not exist")
    blob = read_checkpoint(last_path, map_location=device) if resume else None
    train, test = _load_data(cfg)
    seed_everything(cfg.seed)
    method = build_from_config(dataclasses.asdict(cfg), train.channels).to(device)
    apply_speedups(method, cfg.channels_last, cfg.compile)
    if rank:  # identical initial weights (DDP broadcasts rank 0's), but each rank draws its own augmentations
        seed_everything(cfg.seed + 1_000_003 * rank)
    policy = cfg.policy or method.view_policy  # streamed crops are made in the workers: views add flip + colour
    feed = make_feed(train, device, cfg.batch_size, local_batch, rank, policy,
                     views=3 if cfg.adversary == "random-view" else 2)
    views = build_view_policy(policy, train.image_size, train.mean, train.std, crop=not feed.crops).to(device)
    vae, vae_ref = None, None
    if cfg.adversary in VAE_ADVERSARIES:
        if cfg.vae is None:
            raise IdaaError(f"adversary '{cfg.adversary}' needs --vae VAE.pt (make one with 'idaa vae train')")
        vae = load_vae(cfg.vae, map_location=device).set_precision(cfg.vae_precision)
        check_vae_fits(vae, train.name, train.image_size, train.mean, train.std)
        vae_ref = {"path": str(cfg.vae), "sha256": _file_sha256(cfg.vae)}
    adversary = build_adversary(cfg.adversary, vae=vae, eps=cfg.eps, steps=cfg.attack_steps,
                                step_size=cfg.attack_step_size, norm=cfg.attack_norm,
                                random_start=cfg.random_start, view_fn=views)
    steps_per_epoch = len(train) // cfg.batch_size
    model: torch.nn.Module = method
    if dist.active():
        from torch.nn.parallel import DistributedDataParallel

        if cfg.sync_bn:
            if device.type != "cuda":
                raise IdaaError("--sync-bn needs CUDA devices: torch's SyncBatchNorm has no CPU implementation")
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)

        # without an adversary the adversarial BN twins receive no gradient
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=adversary is None or cfg.attack_every > 1
                                        or cfg.attack_from_epoch > 1 or cfg.attack_graph == "shared")
    optimizer, scheduler = build_optimizer(cfg, method, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    knn = KNNMonitor(train, test, cfg, device) if test is not None and cfg.knn_every else None

    start_epoch, step, position = 1, 0, None
    if blob is not None:
        saved_vae = blob.get("vae")
        if saved_vae and vae_ref and saved_vae["sha256"] != vae_ref["sha256"]:
            raise IdaaError(f"cannot resume: the VAE '{cfg.vae}' differs from the one this run started with "
                            f"({saved_vae['path']}, sha256 {saved_vae['sha256'][:12]})")
        try:
            method.load_state_dict(blob["method"])
            optimizer.load_state_dict(blob["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise IdaaError(f"cannot resume: '{last_path}' does not match this configuration "
                            f"({str(exc).splitlines()[0][:120]})") from None
        scheduler.load_state_dict(blob["scheduler"])
        if "scaler" in blob:
            scaler.load_state_dict(blob["scaler"])
        step, position = blob["step"], blob.get("position")
        start_epoch = position["epoch"] if position else blob["epoch"] + 1
        ranks = blob.get("rng_ranks") or [blob["rng"]]
        if len(ranks) == world:
            set_rng_state(ranks[rank])
        else:  # another world size: rank 0 continues its stream, the others start fresh ones
            set_rng_state(blob["rng"])
            if rank:
                seed_everything(cfg.seed + 1_000_003 * rank + step)
    out, failure, trackers = Path(cfg.out), None, Trackers()  # only rank 0 logs to trackers
    checkpointed = LastCheckpoint(last_path, step if blob is not None else None)
    if main:  # only rank 0 touches the run folder; a refusal there stops every rank
        try:  # trackers are checked (extras, MLflow reachable) before the run folder is touched
            trackers = plan_trackers(cfg.logger, cfg.out, resume, mlflow_uri=cfg.mlflow_uri,
                                     wandb_project=cfg.wandb_project, wandb_entity=cfg.wandb_entity)
            out = prepare_run_dir(cfg.out, overwrite=overwrite, resume=resume, lock=lock)
            with checkpointed.on_write_fault():
                remove_stale_temporaries(out)
                config = {"command": "pretrain", **dataclasses.asdict(cfg)}
                write_config(out / "config.yaml", config)
                trackers.start(step if resume else None).log_config(config)
                if resume:
                    MetricsLog(out / "metrics.jsonl").truncate_after(step)
        except IdaaError as exc:
            failure = exc
    failure = dist.broadcast_object(failure)
    if failure:
        raise failure
    log = MetricsLog(out / "metrics.jsonl")
    data_meta = {"name": train.name, "image_size": train.image_size, "channels": train.channels,
                 "mean": list(train.mean), "std": list(train.std), "num_classes": len(train.classes)}
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def save(path: Path, epoch_done: int, rng: dict[str, Any], where: dict[str, Any] | None) -> None:
        """Every rank calls this (their RNG states are gathered); rank 0 writes."""
        rng_ranks = dist.gather_objects(rng)
        state = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "data": data_meta,
                 "world_size": world, "rng_ranks": rng_ranks if world > 1 else None, "vae": vae_ref,
                 "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch_done,
                 "step": step, "position": where and {**where, "bad_images": feed.screen.left_out}, "rng": rng,
                 "elapsed": elapsed_before + time.perf_counter() - start, **clock}
        _on_rank0(_save_checkpoint, state, path)  # a failed save stops the run: it never trains on unsaved
        if path == last_path:
            checkpointed.step = step

    total_steps = steps_per_epoch * cfg.epochs
    total = total_steps if cfg.max_steps is None else min(cfg.max_steps, total_steps)
    bar = tqdm(total=total, initial=min(step, total), desc=f"{cfg.method}+{cfg.adversary}", unit="step",
               disable=not (progress and main), dynamic_ncols=True)
    # wall time carries over a resume, so "time" in metrics.jsonl is the run's, not this process's
    elapsed_before = float(blob.get("elapsed", 0.0)) if blob is not None else 0.0
    # seconds in training steps alone and in the kNN monitor, kept apart (checkpoint writes in neither)
    clock = {"train_time": float(blob.get("train_time", elapsed_before)) if blob is not None else 0.0,
             "monitor_time": float(blob.get("monitor_time", 0.0)) if blob is not None else 0.0}
    start, record, skipped = time.perf_counter(), {}, 0
    with GracefulStop() as stopper, checkpointed.on_write_fault():
        for epoch in range(start_epoch, cfg.epochs + 1):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            method.train()
            if position is not None and position["epoch"] == epoch:  # continue inside an interrupted epoch
                order, first = position["order"].to(device), position["batch"]
                sums, seen, prior = position["sums"].to(device), position["seen"], position["seconds"]
                feed.screen.left_out = position.get("bad_images", 0)  # images left out before the interruption
            else:
                order, first = _shuffle(len(train), device), 0
                sums, seen, prior = torch.zeros(3, device=device), 0, 0.0
            position, done, stop = None, first, None
            epoch_start = mark = time.perf_counter()
            for i, batch in enumerate(feed.batches(epoch, order, first), start=first):  # this rank's share
                v1 = to_memory_format(views(batch.first), cfg.channels_last)
                v2 = to_memory_format(views(batch.second), cfg.channels_last)
                # a skipped step must not leave NaN in BN statistics either: keep the buffers to put back
                buffers = [b.clone() for b in method.buffers()] if cfg.skip_nonfinite > skipped else None
                attack = attack_at(adversary, cfg.attack_every, cfg.attack_from_epoch, epoch, step)
                optimizer.zero_grad(set_to_none=True)
                losses = forward_backward(model, attack, v1, v2, source=batch.source, alpha=cfg.alpha,
                                          autocast=autocast, scaler=scaler)
                problem = _nonfinite(losses, params, check_grads=not scaler.is_enabled(), agree=world > 1)
                step, done = step + 1, i + 1
                if problem is None:
                    scaler.step(optimizer)
                    scaler.update()
                    method.after_step(step / total_steps)
                    adv = losses.adversarial.detach() if losses.adversarial is not None else sums.new_zeros(())
                    sums += torch.stack([losses.total.detach(), losses.clean.detach(), adv]).float()
                    seen += 1
                elif buffers is not None:
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for buffer, kept in zip(method.buffers(), buffers, strict=True):
                            buffer.copy_(kept)
                    bar.write(f"step {step}: non-finite {problem}; update skipped ({skipped}/{cfg.skip_nonfinite})")
                else:
                    kept = f"the last good checkpoint '{last_path}' is kept" if last_path.is_file() else \
                        "no checkpoint was written"
                    raise IdaaError(f"non-finite {problem} at step {step} (epoch {epoch}); {kept}; "
                                    f"--skip-nonfinite K tolerates up to K such steps")
                scheduler.step()
                bar.update()
                if step % 10 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{losses.total.item():.3f}")
                signum = dist.max_int(stopper.signum or 0, device) if world > 1 else stopper.signum
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stop = "max_steps"
                elif signum:
                    stop, stopper.signum = "signal", signum
                if stop:
                    break
                if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 and done < steps_per_epoch:
                    seconds = prior + time.perf_counter() - epoch_start
                    clock["train_time"] += time.perf_counter() - mark
                    save(last_path, epoch - 1, rng_state(), _where(epoch, done, order, sums, seen, seconds))
                    mark = time.perf_counter()
            clock["train_time"] += time.perf_counter() - mark
            rng = rng_state()  # before any evaluation, so a resumed run draws what this one would have
            seconds = prior + time.perf_counter() - epoch_start
            complete = done == steps_per_epoch
            where = None if complete else _where(epoch, done, order, sums, seen, seconds)
            if feed.failure:  # an unreadable file under --bad-images error: resumable from this very batch
                save(last_path, epoch - 1, rng, where)
                raise stopped_by_bad_image(feed.failure, str(last_path))
            if stop == "signal":
                save(last_path, epoch - (not complete), rng, where)
                raise TrainingStopped(stopper.signum, step, last_path)
            loss, clean, adv_loss = (_mean_over_ranks(sums) / max(seen, 1)).tolist()
            record = {"epoch": epoch, "step": step, "loss": loss, "clean_loss": clean,
                      "adversarial_loss": adv_loss if adversary is not None else None,
                      "lr": optimizer.param_groups[0]["lr"], "images_per_s": (done - first) * cfg.batch_size
                      / max(time.perf_counter() - epoch_start, 1e-9), "epoch_time": seconds,
                      "time": elapsed_before + time.perf_counter() - start}
            if not complete:
                record["partial"] = True
            if skipped:
                record["skipped_steps"] = skipped
            record.update(feed.end_epoch(bar.write))
            finished = epoch == cfg.epochs or stop is not None
            if knn is not None and (epoch % cfg.knn_every == 0 or finished):
                monitor_start = time.perf_counter()
                record["knn_top1"] = knn(method)  # every rank embeds its share of the bank and the queries
                clock["monitor_time"] += time.perf_counter() - monitor_start
                if main:
                    bar.write(f"epoch {epoch}: loss {loss:.4f}  kNN top-1 {record['knn_top1']:.2f}%")
            record.update(clock)
            _on_rank0(_log_record, log, trackers, record, step)
            save(last_path, epoch - (not complete), rng, where)
            if complete and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
                save(out / f"epoch{epoch:04d}.ckpt", epoch, rng, None)
            if stop:
                break
    bar.close()
    trackers.close()
    return record


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically; a refused write is a one-line WriteFault naming it."""
    with reporting_write_faults("the checkpoint", path):
        atomic_torch_save(state, path)


def _log_record(log: MetricsLog, trackers: Trackers, record: dict[str, Any], step: int) -> None:
    """The epoch's metrics line, then the trackers (rank 0's part of the epoch's end)."""
    log.write(record)
    trackers.log_metrics(record, step)


def _on_rank0(write: Callable[..., object], *args: Any) -> None:
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


def _shuffle(n: int, device: torch.device) -> torch.Tensor:
    """The epoch's order of the training images: drawn by rank 0 from its stream, the same on every rank."""
    order = torch.randperm(n, device=device)
    if dist.active():
        torch.distributed.broadcast(order, src=0)
    return order


def _mean_over_ranks(sums: torch.Tensor) -> torch.Tensor:
    """Per-rank loss sums averaged over ranks (each rank's loss is the mean over its share of the batch)."""
    if not dist.active():
        return sums
    total = sums.clone()
    torch.distributed.all_reduce(total)
    return total / dist.world_size()


def _where(epoch: int, batch: int, order: torch.Tensor, sums: torch.Tensor, seen: int,
           seconds: float) -> dict[str, Any]:
    """The position inside an interrupted epoch: its shuffle, the next batch and the running loss sums."""
    return {"epoch": epoch, "batch": batch, "order": order.cpu(), "sums": _mean_over_ranks(sums).cpu(), "seen": seen,
            "seconds": seconds}


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

