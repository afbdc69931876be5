"""`idaa vae train`: fit the identity-disentangling VAE on augmented views, then freeze it into `vae.pt`."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from idaa.analysis.vae_report import write_vae_report
from idaa.data.feeds import make_feed
from idaa.data.protocol import Source
from idaa.data.sources import open_dataset
from idaa.data.unreadable import readable
from idaa.data.views import ViewPolicy, build_view_policy
from idaa.devices import resolve_device, where_timed
from idaa.errors import DataError, IdaaError
from idaa.fileio import reporting_write_faults
from idaa.imaging import save_grid, stretch, to_unit_range
from idaa.nets.vae import VAE, save_vae, vae_loss
from idaa.tracking import plan_trackers
from idaa.train.run_dir import LastCheckpoint, MetricsLog, RunLock, prepare_run_dir, write_config
from idaa.train.settings import RunSettings, check_int, check_number


@dataclass
class VAETrainConfig(RunSettings):
    """Everything `idaa vae train` needs (data and trackers: RunSettings); defaults are SPEC 1 (d=512, beta 0.1,
    Adam 5e-4 (0, 0.9), bs 128)."""

    out: str = ""
    latent_dim: int = 512
    hidden: int = 128
    beta: float = 0.1
    epochs: int = 300
    batch_size: int = 128
    lr: float = 5e-4
    policy: str = "clae"  # the VAE learns to reconstruct augmented views, as the authors train it
    eval_images: int = 2000
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Reject impossible values before any data is read or any folder is touched."""
        if not self.out:
            raise IdaaError("--out is required: the run folder to create")
        for key in ("latent_dim", "hidden", "epochs", "batch_size", "eval_images"):
            check_int(key, getattr(self, key), 1)
        check_number("beta", self.beta)
        check_number("lr", self.lr, positive=True)
        self.validate_settings()


def _held_out(cfg: VAETrainConfig, train: Source) -> Source:
    """The test split for reporting reconstruction error; a slice of train for sets that have none."""
    try:
        test = open_dataset(cfg.dataset, cfg.data_dir, split="test", options=cfg.sources(), like=train)
    except IdaaError:
        test = train
    return readable(test.take(min(cfg.eval_images, len(test)), seed=cfg.seed))  # no file that does not decode


@torch.no_grad()
def evaluate_vae(vae: VAE, views: torch.Tensor, beta: float, batch_size: int = 500) -> dict[str, float]:
    """Reconstruction MSE, KL and the MSE relative to the views' variance, in eval mode (z = mu)."""
    was_training = vae.training
    vae.eval()
    mse = kl = 0.0
    for chunk in views.split(batch_size):
        recon, mu, logvar = vae(chunk)
        _, m, k = vae_loss(recon, chunk, mu, logvar, beta)
        mse, kl = mse + m.item() * len(chunk), kl + k.item() * len(chunk)
    vae.train(was_training)
    n = len(views)
    return {"mse": mse / n, "kl": kl / n, "relative_mse": mse / n / views.var().item()}


def train_vae(cfg: VAETrainConfig) -> dict[str, float]:
    """Train, log every epoch to metrics.jsonl, save vae.pt (atomically), a x / G(x) / R(x) grid and the report.

    The run folder's lock is held from before the first write to the end; a refused write is a WriteFault.
    """
    cfg.validate()
    saved = LastCheckpoint(Path(cfg.out) / "vae.pt", unit="epoch",
                           resume="use it, or train again with --overwrite (VAE training has no resume)")
    with RunLock(cfg.out) as lock, saved.on_write_fault():
        return _train_vae(cfg, lock, saved)


def _train_vae(cfg: VAETrainConfig, lock: RunLock, saved: LastCheckpoint) -> dict[str, float]:
    device = resolve_device(cfg.device)
    train, held_out = _load_data(cfg)
    torch.manual_seed(cfg.seed)
    vae = VAE(train.image_size, train.channels, cfg.latent_dim, cfg.hidden).to(device)
    trackers = plan_trackers(cfg.logger, cfg.out, mlflow_uri=cfg.mlflow_uri, wandb_project=cfg.wandb_project,
                             wandb_entity=cfg.wandb_entity)  # checked before the run folder is touched
    out = prepare_run_dir(cfg.out, overwrite=cfg.overwrite, lock=lock)
    write_config(out / "config.yaml", {"command": "vae train", **asdict(cfg), "train_images": len(train)})
    trackers.start().log_config({"command": "vae train", **asdict(cfg), "train_images": len(train)})
    log = MetricsLog(out / "metrics.jsonl")

    feed = make_feed(train, device, cfg.batch_size, policy=cfg.policy, views=1)
    augment = build_view_policy(cfg.policy, train.image_size, train.mean, train.std, crop=not feed.crops)
    plain = build_view_policy("eval", train.image_size, train.mean, train.std)
    eval_views = plain(held_out.images.to(device))
    steps_per_epoch = len(train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr, betas=(0.0, 0.9))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)  # linear decay to 0
    meta = {"dataset": train.name, "data_dir": cfg.data_dir, "image_size": train.image_size,
            "channels": train.channels, "mean": list(train.mean), "std": list(train.std), "beta": cfg.beta,
            "policy": cfg.policy, "train_images": len(train)}
    bar = tqdm(total=total, desc="vae", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    start, step, result = time.perf_counter(), 0, {}
    for epoch in range(1, cfg.epochs + 1):
        vae.train()
        order = torch.randperm(len(train), device=device)
        epoch_start = time.perf_counter()
        sums, step = _train_epoch(cfg, vae, feed, augment, optimizer, schedule, order, epoch, step, bar)
        if feed.failure:  # an unreadable file under --bad-images error
            raise DataError(f"{feed.failure}; vae.pt holds the last complete epoch (--bad-images skip skips it)")
        seconds = time.perf_counter() - epoch_start
        train_loss, train_mse, train_kl = (sums / steps_per_epoch).tolist()
        held = evaluate_vae(vae, eval_views, cfg.beta)
        result = {"epoch": epoch, "step": step, "loss": train_loss, "train_mse": train_mse, "train_kl": train_kl,
                  "test_mse": held["mse"], "test_kl": held["kl"], "test_relative_mse": held["relative_mse"],
                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": steps_per_epoch * cfg.batch_size / seconds,
                  "time": time.perf_counter() - start, **where_timed(device.type), **feed.end_epoch(bar.write)}
        log.write(result)
        trackers.log_metrics(result, step)
        with reporting_write_faults("the VAE", saved.path):
            save_vae(vae, saved.path, {**meta, "epochs": epoch})
        saved.step = epoch
    bar.close()
    _write_figures(vae, eval_views, train, out, trackers)
    return result


def _load_data(cfg: VAETrainConfig) -> tuple[Source, Source]:
    """The training images (a seeded subset under --limit) and the held-out ones the report is measured on."""
    train = open_dataset(cfg.dataset, cfg.data_dir, split="train", download=cfg.download, options=cfg.sources())
    if cfg.limit is not None:
        train = train.take(min(cfg.limit, len(train)), seed=cfg.seed)
    if cfg.batch_size > len(train):
        raise IdaaError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(train)} images)")
    return train, _held_out(cfg, train)


def _train_epoch(cfg: VAETrainConfig, vae: VAE, feed: Any, augment: ViewPolicy, optimizer: Any, schedule: Any,
                 order: torch.Tensor, epoch: int, step: int, bar: Any) -> tuple[torch.Tensor, int]:
    """One epoch of the VAE objective on fresh augmented views; returns the (loss, mse, kl) sums and the step."""
    sums = torch.zeros(3, device=order.device)
    for batch in feed.batches(epoch, order):
        views = augment(batch.first)
        recon, mu, logvar = vae(views)
        loss, mse, kl = vae_loss(recon, views, mu, logvar, cfg.beta)
        if not torch.isfinite(loss):
            raise IdaaError(f"VAE loss became {loss.item()} at step {step + 1} (epoch {epoch}); try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        sums += torch.stack([loss.detach(), mse.detach(), kl.detach()])
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(epoch=epoch, mse=f"{mse.item():.4f}", kl=f"{kl.item():.4f}")
    return sums, step


def _write_figures(vae: VAE, eval_views: torch.Tensor, train: Source, out: Path, trackers: Any) -> None:
    """The x / G(x) / R(x) grid and the VAE report of the held-out views, also sent to the trackers."""
    vae.eval()
    spread = eval_views[:: max(len(eval_views) // 16, 1)][:16]  # held-out sets come sorted by class: stride
    decomposition_grid(vae, spread, train.mean, train.std, out / "reconstructions.png")
    write_vae_report(vae, eval_views, train.mean, train.std, out)  # vae_report.png / .json
    for figure in ("reconstructions.png", "vae_report.png"):
        trackers.log_file(out / figure)
    trackers.close()


@torch.no_grad()
def decomposition_grid(vae: VAE, views: torch.Tensor, mean, std, path: Path) -> Path:
    """Rows x, G(x) = D(mu(x)) and the residual R(x) = x - G(x) (stretched around grey)."""
    generated = vae.decode(vae.encode(views)[0])
    residual = views - generated
    return save_grid([to_unit_range(views, mean, std), to_unit_range(generated, mean, std), stretch(residual)], path)
