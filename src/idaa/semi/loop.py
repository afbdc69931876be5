"""The `idaa semi` loop: FixMatch (any adversary) or the supervised baseline on the same labelled split."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from idaa.adversaries import VAE_ADVERSARIES, Adversary, build_adversary
from idaa.checkpoints import load_file
from idaa.data.protocol import Source
from idaa.data.sources import open_dataset
from idaa.data.unreadable import readable
from idaa.data.views import ViewPolicy, build_view_policy
from idaa.devices import resolve_device
from idaa.errors import IdaaError
from idaa.nets.resnet import build_backbone
from idaa.nets.vae import check_vae_fits, load_vae
from idaa.semi.config import SemiConfig
from idaa.semi.fixmatch import EMA, Classifier, SemiLosses, fixmatch_losses, supervised_losses
from idaa.semi.split import SPLIT_FILE, class_balanced_split, save_split
from idaa.train.run_dir import LastCheckpoint, MetricsLog, RunLock
from idaa.train.run_state import open_run_folder, save_checkpoint
from idaa.train.state import GracefulStop, TrainingStopped, rng_state, seed_everything, set_rng_state

CHECKPOINT_KIND = "idaa-semi"
# Running sums kept on the device between evaluations (one host sync per interval, not per step).
_SUMS = ("loss", "supervised_loss", "unlabelled_loss", "adversarial_loss", "confident", "confident_correct")


class IndexStream:
    """Endless batches of indices from consecutive seeded permutations: every image once per pass, even when
    the set is smaller than a batch (50 labels, batch 64), as FixMatch's repeated labelled sampler does."""

    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int) -> None:
        self.indices, self.batch_size = indices, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = self._permutation(), 0

    def _permutation(self) -> torch.Tensor:
        return self.indices[torch.randperm(len(self.indices), generator=self.generator)]

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.position == len(self.order):
                self.order, self.position = self._permutation(), 0
            take = min(need, len(self.order) - self.position)
            parts.append(self.order[self.position:self.position + take])
            self.position, need = self.position + take, need - take
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position = state["order"], state["position"]
        self.generator.set_state(state["generator"])


def build_optimizer(cfg: SemiConfig, model: torch.nn.Module) -> tuple[Any, Any]:
    """FixMatch's SGD (Nesterov, no decay on biases and BN) and its schedule lr * cos(7 pi k / (16 K))."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)

    def factor(step: int) -> float:
        return math.cos(7 * math.pi * min(step, cfg.steps) / (16 * cfg.steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, view: ViewPolicy,
             device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy (%) of `model` in eval mode on uint8 images seen through the evaluation view."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = view(images[start:start + batch_size].to(device))
        correct += int((model(x).argmax(1).cpu() == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(images), 1)


@dataclass
class _Run:
    """Everything a run needs, built and validated before the run folder is touched."""

    train: Source
    test: Source | None
    labelled: torch.Tensor
    unlabelled: torch.Tensor
    model: Classifier
    adversary: Adversary | None
    weak: ViewPolicy
    strong: ViewPolicy
    device: torch.device

    images: torch.Tensor = field(init=False)  # the training split, moved to the device once
    labels: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.images, self.labels = self.train.images.to(self.device), self.train.labels.to(self.device)


def _load_data(cfg: SemiConfig) -> tuple[Source, Source | None]:
    train = open_dataset(cfg.dataset, cfg.data_dir, split="train", download=cfg.download, options=cfg.sources())
    if cfg.limit is not None:
        train = train.take(min(cfg.limit, len(train)), seed=cfg.seed)
    train = readable(train)  # decoded whole: under --bad-images skip without the files that do not decode
    try:
        test = readable(open_dataset(cfg.dataset, cfg.data_dir, split="test", options=cfg.sources(), like=train))
    except IdaaError:
        test = None
    return train, test if test is not None and bool((test.labels >= 0).all()) else None


def _build(cfg: SemiConfig, labelled: list[int] | None = None) -> _Run:
    """Data, split (or the saved one when resuming), model, views and adversary; all bad input fails here."""
    device = resolve_device(cfg.device)
    train, test = _load_data(cfg)
    num_classes = len(train.classes)
    split = class_balanced_split(train.labels, cfg.labels, num_classes, cfg.seed)
    if labelled is not None:  # resuming: the saved split is the truth; it must still index this dataset
        if labelled != split[0].tolist():
            raise IdaaError("the saved labelled split does not match the dataset any more; start a new run")
    seed_everything(cfg.seed)  # same seed, same initial weights for FixMatch and the supervised baseline
    backbone = build_backbone(cfg.backbone, width=cfg.width, in_channels=train.channels)
    model = Classifier(backbone, num_classes).to(device)
    weak, strong = (build_view_policy(name, train.image_size, train.mean, train.std).to(device)
                    for name in ("fixmatch-weak", "fixmatch-strong"))
    vae = None
    if cfg.adversary in VAE_ADVERSARIES:
        vae = load_vae(cfg.vae, map_location=device, to_train_with=True)
        check_vae_fits(vae, train.name, train.image_size, train.mean, train.std)
    adversary = build_adversary(cfg.adversary, vae=vae, eps=cfg.eps, steps=cfg.attack_steps, view_fn=strong)
    return _Run(train, test, split[0], split[1], model, adversary, weak, strong, device)


def read_semi_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A `idaa semi` last.ckpt as a dict; a missing, truncated or foreign file is a one-line error."""
    blob = load_file(path, map_location)
    if not isinstance(blob, dict) or blob.get("kind") != CHECKPOINT_KIND:
        raise IdaaError(f"'{path}' is not an 'idaa semi' checkpoint")
    return blob


def train_semi(cfg: SemiConfig, resume: bool = False, overwrite: bool = False,
               progress: bool = True) -> dict[str, Any]:
    """Train `cfg.method` on `cfg.labels` labels; returns the last metrics record (EMA test accuracy).

    The run folder's lock (RUN/.lock) is held from before the first write until the run returns or fails.
    """
    cfg.validate()
    if resume and overwrite:
        raise IdaaError("--resume and --overwrite exclude each other")
    with RunLock(cfg.out) as lock:
        return _train_semi(cfg, resume, overwrite, progress, lock)


def _train_semi(cfg: SemiConfig, resume: bool, overwrite: bool, progress: bool, lock: RunLock) -> dict[str, Any]:
    blob = read_semi_checkpoint(Path(cfg.out) / "last.ckpt") if resume else None
    run = _build(cfg, blob["labelled"] if blob else None)
    ema = EMA(run.model, cfg.ema_decay)
    optimizer, scheduler = build_optimizer(cfg, run.model)
    streams = {"labelled": IndexStream(run.labelled, cfg.batch_size, cfg.seed),
               "unlabelled": IndexStream(run.unlabelled, cfg.mu * cfg.batch_size, cfg.seed + 1)}
    step, elapsed = 0, 0.0
    if blob is not None:
        run.model.load_state_dict(blob["model"])
        ema.model.load_state_dict(blob["ema"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        for name, stream in streams.items():
            stream.load_state_dict(blob["streams"][name])
        step, elapsed = blob["step"], blob["elapsed"]
        set_rng_state(blob["rng"])
    checkpointed = LastCheckpoint(Path(cfg.out) / "last.ckpt", step if blob is not None else None)
    out, trackers = open_run_folder(cfg, cfg.out, {"command": "semi", **cfg.to_dict()}, resume, overwrite, lock,
                                    checkpointed, step)
    with checkpointed.on_write_fault():
        save_split(out / SPLIT_FILE, run.labelled, run.unlabelled,
                   {"dataset": run.train.name, "train_images": len(run.train), "labels": cfg.labels, "seed": cfg.seed})
    stop = cfg.steps if cfg.max_steps is None else min(cfg.steps, cfg.max_steps)
    bar = tqdm(total=stop, initial=min(step, stop), desc=f"{cfg.method}+{cfg.adversary}", unit="step",
               disable=not progress, dynamic_ncols=True)
    record: dict[str, Any] = {}
    with GracefulStop() as stopper, checkpointed.on_write_fault():
        while step < stop:
            chunk = min(cfg.eval_every - step % cfg.eval_every, stop - step)
            record, seconds, done = _train_interval(cfg, run, ema, optimizer, scheduler, streams, step, chunk, bar,
                                                    stopper)
            step, elapsed = step + done, elapsed + seconds
            state = {"model": run.model.state_dict(), "ema": ema.model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "streams": {k: s.state_dict() for k, s in streams.items()}, "step": step, "elapsed": elapsed}
            if done < chunk:  # a signal: save where we are (the interval's statistics restart on resume)
                save_checkpoint(_checkpoint(cfg, run, state), checkpointed.path, checkpointed)
                bar.close()
                raise TrainingStopped(stopper.signum, step, out / "last.ckpt")
            _log_interval(cfg, run, ema, record, state, checkpointed, bar)
            trackers.log_metrics(record, step)
    bar.close()
    trackers.close()
    return record


def _log_interval(cfg: SemiConfig, run: _Run, ema: EMA, record: dict[str, Any], state: dict[str, Any],
                  checkpointed: LastCheckpoint, bar: Any) -> None:
    """Evaluate the EMA model, write last.ckpt, then the metrics line."""
    step, elapsed = state["step"], state["elapsed"]
    record.update(_evaluate(run, ema), step=step, time=elapsed)
    save_checkpoint(_checkpoint(cfg, run, state), checkpointed.path, checkpointed)
    # after the checkpoint: a run killed in between loses a line rather than logging a step twice on resume
    MetricsLog(checkpointed.path.parent / "metrics.jsonl").write(record)
    if "test_top1" in record:
        bar.set_postfix(loss=f"{record['loss']:.3f}", ema_top1=f"{record['test_top1']:.2f}")


def _checkpoint(cfg: SemiConfig, run: _Run, state: dict[str, Any]) -> dict[str, Any]:
    """Everything an exact resume or an evaluation needs: weights, optimiser, sampler and RNG states, the split."""
    data = {"name": run.train.name, "image_size": run.train.image_size, "channels": run.train.channels,
            "mean": list(run.train.mean), "std": list(run.train.std), "classes": list(run.train.classes)}
    return {"kind": CHECKPOINT_KIND, "config": cfg.to_dict(), "data": data, "labelled": run.labelled.tolist(),
            **state, "rng": rng_state()}


def _evaluate(run: _Run, ema: EMA) -> dict[str, float]:
    """Test accuracy of the EMA model, the one FixMatch reports (the raw weights are noisier)."""
    if run.test is None:
        return {}
    view = build_view_policy("eval", run.train.image_size, run.train.mean, run.train.std).to(run.device)
    return {"test_top1": accuracy(ema.model, run.test.images, run.test.labels, view, run.device)}


def _train_interval(cfg: SemiConfig, run: _Run, ema: EMA, optimizer: Any, scheduler: Any,
                    streams: dict[str, IndexStream], step: int, count: int, bar: Any,
                    stopper: GracefulStop | None = None) -> tuple[dict[str, Any], float, int]:
    """Up to `count` steps from `step` (fewer when a signal asks to stop); returns the interval's mean training
    statistics, its seconds and the number of steps done."""
    images, labels = run.images, run.labels
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    sums = torch.zeros(len(_SUMS), device=run.device, dtype=torch.float64)
    run.model.train()
    start = time.perf_counter()
    for i in range(count):
        l_idx = streams["labelled"].next().to(run.device)
        x_l, y_l = run.weak(images[l_idx]), labels[l_idx]
        with autocast:
            if cfg.method == "fixmatch":
                u_idx = streams["unlabelled"].next().to(run.device)
                source = images[u_idx]
                losses = fixmatch_losses(run.model, run.adversary, x_l, y_l, run.weak(source), run.strong(source),
                                         source, cfg.threshold, cfg.lambda_u, cfg.alpha)
                sums += _statistics(losses, labels[u_idx])
            else:
                losses = supervised_losses(run.model, x_l, y_l)
                sums += _statistics(losses, None)
        if not torch.isfinite(losses.total):
            raise IdaaError(f"non-finite loss ({losses.total.item()}) at step {step + i + 1}; "
                            "the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        scheduler.step()
        ema.update(run.model)
        bar.update()
        if stopper is not None and stopper.signum is not None:
            count = i + 1
            break
    seconds = time.perf_counter() - start
    totals = sums.tolist()
    record: dict[str, Any] = {key: value / count for key, value in zip(_SUMS[:4], totals[:4], strict=True)}
    confident, correct = totals[4], totals[5]
    record["mask_rate"] = confident / (count * cfg.mu * cfg.batch_size)
    record["pseudo_label_acc"] = 100.0 * correct / confident if confident else None  # on the confident ones
    if run.adversary is None:
        record["adversarial_loss"] = None
    images_per_step = cfg.batch_size * (1 + (2 * cfg.mu if cfg.method == "fixmatch" else 0))
    record.update(lr=optimizer.param_groups[0]["lr"], images_per_s=count * images_per_step / seconds)
    if cfg.method != "fixmatch":
        for key in ("unlabelled_loss", "adversarial_loss", "mask_rate", "pseudo_label_acc"):
            record.pop(key)
    return record, seconds, count


def _statistics(losses: SemiLosses, true_labels: torch.Tensor | None) -> torch.Tensor:
    """(loss, L_s, L_u, L_adv, #confident, #correct confident pseudo-labels) of one step, without a host sync."""
    zero = losses.total.new_zeros(())
    mask = losses.mask
    correct = None if mask is None else ((losses.targets == true_labels).float() * mask).sum()
    terms = [losses.total, losses.supervised, losses.unlabelled, losses.adversarial,
             None if mask is None else mask.sum(), correct]
    return torch.stack([zero if t is None else t.detach().float() for t in terms]).double()
