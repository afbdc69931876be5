"""The one training loop (`idaa pretrain`): every method, every adversary, kNN monitor, run folder."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from idaa.adversaries import build_adversary
from idaa.checkpoints import CHECKPOINT_FORMAT, build_from_config, read_checkpoint
from idaa.data.datasets import ImageDataset, load_dataset
from idaa.data.views import build_view_policy
from idaa.devices import resolve_device
from idaa.errors import IdaaError
from idaa.evaluate.knn import extract_features, knn_accuracy
from idaa.methods import Method
from idaa.nets.vae import check_vae_fits, load_vae
from idaa.train.config import PretrainConfig
from idaa.train.run_dir import MetricsLog, atomic_torch_save, prepare_run_dir, write_config
from idaa.train.step import compute_losses

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


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class KNNMonitor:
    """Online kNN accuracy: training images (eval view) as the bank, the test split as queries."""

    def __init__(self, train: ImageDataset, test: ImageDataset, cfg: PretrainConfig, device: torch.device) -> None:
        self.train, self.test, self.cfg, self.device = train, test, cfg, device
        self.view = build_view_policy("eval", train.image_size, train.mean, train.std).to(device)
        self.num_classes = max(len(train.classes), int(train.labels.max()) + 1)

    def __call__(self, method: Method) -> float:
        was_training = method.training
        method.eval()
        bank = extract_features(method.embed_for_eval, self.train.images, self.view, self.device)
        queries = extract_features(method.embed_for_eval, self.test.images, self.view, self.device)
        method.train(was_training)
        return knn_accuracy(bank, self.train.labels.to(self.device), queries, self.test.labels, self.num_classes,
                            self.cfg.knn_k, self.cfg.knn_temperature)


def _load_data(cfg: PretrainConfig) -> tuple[ImageDataset, ImageDataset | None]:
    train = load_dataset(cfg.dataset, cfg.data_dir, split="train", download=cfg.download)
    if cfg.limit is not None:
        train = train.take(min(cfg.limit, len(train)), seed=cfg.seed)
    if cfg.batch_size > len(train):
        raise IdaaError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(train)} images)")
    try:
        test = load_dataset(cfg.dataset, cfg.data_dir, split="test")
    except IdaaError:
        test = None
    labelled = test is not None and bool((train.labels >= 0).all()) and bool((test.labels >= 0).all())
    return train, test if labelled else None


def pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Train `cfg.method` with `cfg.adversary`; returns the last epoch's metrics record."""
    cfg.validate()
    device = resolve_device(cfg.device)
    last_path = Path(cfg.out) / "last.ckpt"
    if resume and not last_path.is_file():
        raise IdaaError(f"cannot resume: '{last_path}' does not exist")
    train, test = _load_data(cfg)
    _seed_everything(cfg.seed)
    method = build_from_config(dataclasses.asdict(cfg), train.channels).to(device)
    views = build_view_policy(cfg.policy or method.view_policy, train.image_size, train.mean, train.std).to(device)
    vae = None
    if cfg.adversary in VAE_ADVERSARIES:
        if cfg.vae is None:
            raise IdaaError(f"adversary '{cfg.adversary}' needs --vae VAE.pt (make one with 'idaa vae train')")
        vae = load_vae(cfg.vae, map_location=device)
        check_vae_fits(vae, train.name, train.image_size, train.mean, train.std)
    adversary = build_adversary(cfg.adversary, vae=vae, eps=cfg.eps, steps=cfg.attack_steps,
                                step_size=cfg.attack_step_size, norm=cfg.attack_norm,
                                random_start=cfg.random_start, view_fn=views)
    steps_per_epoch = len(train) // cfg.batch_size
    optimizer, scheduler = build_optimizer(cfg, method, steps_per_epoch)
    knn = KNNMonitor(train, test, cfg, device) if test is not None and cfg.knn_every else None

    start_epoch, step = 1, 0
    if resume:
        blob = read_checkpoint(last_path, map_location=device)
        method.load_state_dict(blob["method"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        start_epoch, step = blob["epoch"] + 1, blob["step"]
        _set_rng_state(blob["rng"])
    out = prepare_run_dir(cfg.out, overwrite=overwrite, resume=resume)
    write_config(out / "config.yaml", {"command": "pretrain", **dataclasses.asdict(cfg)})
    log, writer = MetricsLog(out / "metrics.jsonl"), _tensorboard(out)
    data_meta = {"name": train.name, "image_size": train.image_size, "channels": train.channels,
                 "mean": list(train.mean), "std": list(train.std), "num_classes": len(train.classes)}
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())

    images = train.images.to(device)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    bar = tqdm(total=total, initial=min(step, total), desc=f"{cfg.method}+{cfg.adversary}", unit="step",
               disable=not progress, dynamic_ncols=True)
    start, record = time.perf_counter(), {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        method.train()
        order = torch.randperm(len(train), device=device)
        sums, seen, epoch_start = torch.zeros(3, device=device), 0, time.perf_counter()
        for i in range(steps_per_epoch):
            batch = images[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
            v1, v2 = views(batch), views(batch)
            with autocast:
                losses = compute_losses(method, adversary, v1, v2, source=batch, alpha=cfg.alpha)
            _check_finite(losses, step + 1)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            scheduler.step()
            step, seen = step + 1, seen + 1
            method.after_step(step / (steps_per_epoch * cfg.epochs))
            adv = losses.adversarial.detach() if losses.adversarial is not None else torch.zeros((), device=device)
            sums += torch.stack([losses.total.detach(), losses.clean.detach(), adv]).float()
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{losses.total.item():.3f}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        seconds = time.perf_counter() - epoch_start
        loss, clean, adv_loss = (sums / max(seen, 1)).tolist()
        record = {"epoch": epoch, "step": step, "loss": loss, "clean_loss": clean,
                  "adversarial_loss": adv_loss if adversary is not None else None,
                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen * cfg.batch_size / seconds,
                  "epoch_time": seconds, "time": time.perf_counter() - start}
        finished = epoch == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        if knn is not None and (epoch % cfg.knn_every == 0 or finished):
            record["knn_top1"] = knn(method)
            bar.write(f"epoch {epoch}: loss {loss:.4f}  kNN top-1 {record['knn_top1']:.2f}%")
        log.write(record)
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    writer.add_scalar(key, value, step)
        blob = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "data": data_meta,
                "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "rng": _rng_state()}
        atomic_torch_save(blob, out / "last.ckpt")
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
            atomic_torch_save(blob, out / f"epoch{epoch:04d}.ckpt")
    bar.close()
    if writer is not None:
        writer.close()
    return record


def _check_finite(losses: Any, step: int) -> None:
    """Stop with the step and the term that went bad rather than training on NaNs."""
    if torch.isfinite(losses.total):  # the common case costs a single host sync
        return
    for name, value in (("clean loss", losses.clean), ("adversarial loss", losses.adversarial)):
        if value is not None and not torch.isfinite(value):
            raise IdaaError(f"non-finite {name} ({value.item()}) at step {step}; the last good checkpoint is kept")


def _tensorboard(out: Path) -> Any:
    """A SummaryWriter when the tensorboard extra is installed, else None (metrics.jsonl is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
