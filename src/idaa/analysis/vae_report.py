"""VAE report: reconstructions, residuals, reconstruction error and KL per latent dimension.

Written by `idaa vae train` next to `vae.pt` (vae_report.png + vae_report.json), on held-out evaluation views.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idaa.analysis.plots import new_figure
from idaa.imaging import stretch, to_unit_range
from idaa.nets.vae import VAE

ACTIVE_KL = 0.01  # nats: a latent dimension carrying less than this is counted as unused (collapsed)


@torch.no_grad()
def vae_statistics(vae: VAE, views: torch.Tensor, batch_size: int = 500) -> dict[str, Any]:
    """Per-image reconstruction MSE, per-dimension KL (nats, averaged over images) and the residual's share.

    Eval mode, z = mu: G(x) = D(mu(x)), R(x) = x - G(x), all in the normalised space of the views.
    """
    was_training = vae.training
    vae.eval()
    mse, kl, residual_energy, energy = [], torch.zeros(vae.latent_dim, dtype=torch.float64), 0.0, 0.0
    for chunk in views.split(batch_size):
        mu, logvar = vae.encode(chunk)
        residual = chunk - vae.decode(mu)
        mse.append(residual.pow(2).flatten(1).mean(1).double().cpu())
        kl += (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).double().sum(0).cpu()
        residual_energy += residual.pow(2).sum().item()
        energy += chunk.pow(2).sum().item()
    vae.train(was_training)
    per_image = torch.cat(mse).numpy()
    kl_per_dim = (kl / len(views)).numpy()
    return {"images": len(views), "mse": float(per_image.mean()),
            "relative_mse": float(per_image.mean() / views.var().item()),
            "mse_quantiles": {q: float(np.quantile(per_image, float(q))) for q in ("0.1", "0.5", "0.9", "0.99")},
            "residual_energy_share": residual_energy / max(energy, 1e-12),
            "kl_total_nats": float(kl_per_dim.sum()), "active_dims": int((kl_per_dim > ACTIVE_KL).sum()),
            "latent_dim": vae.latent_dim, "active_threshold_nats": ACTIVE_KL,
            "kl_per_dim": [round(float(v), 6) for v in kl_per_dim], "per_image_mse": per_image.tolist()}


def _image_strip(rows: Sequence[torch.Tensor]) -> np.ndarray:
    """Rows of N x C x H x W [0, 1] images as one H*len(rows) x W*N x 3 array with 1 px white gaps."""
    lines = []
    for row in rows:
        row = row.float().cpu()
        row = row.repeat(1, 3, 1, 1) if row.shape[1] == 1 else row
        padded = torch.nn.functional.pad(row, (0, 1, 0, 1), value=1.0)
        lines.append(torch.cat(list(padded), dim=2))
    return torch.cat(lines, dim=1).permute(1, 2, 0).numpy()


def write_vae_report(vae: VAE, views: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     out_dir: str | Path, shown: int = 10) -> dict[str, Any]:
    """vae_report.png (x / G / R, error histogram, KL per dimension, where the residual lives) and .json."""
    out = Path(out_dir)
    stats = vae_statistics(vae, views)
    sample = views[:: max(len(views) // shown, 1)][:shown]
    with torch.no_grad():
        generated = vae.decode(vae.encode(sample)[0])
        residual_map = torch.cat([(c - vae.decode(vae.encode(c)[0])).abs().mean(1) for c in views.split(500)])
    strip = _image_strip([to_unit_range(sample, mean, std), to_unit_range(generated, mean, std),
                          stretch(sample - generated)])
    fig = new_figure(12, 7.5)
    grid = fig.add_gridspec(2, 3, height_ratios=[1.1, 1])
    images = fig.add_subplot(grid[0, :])
    images.imshow(strip, interpolation="nearest")
    images.set_axis_off()
    images.set_title(f"rows: x, G(x) = D(mu(x)), R(x) = x - G(x) (stretched); held-out MSE {stats['mse']:.4f} "
                     f"(relative {stats['relative_mse']:.3f}), R carries {100 * stats['residual_energy_share']:.1f}% "
                     "of the energy", fontsize=9)
    errors = fig.add_subplot(grid[1, 0])
    errors.hist(stats["per_image_mse"], bins=40, color="#1f77b4")
    errors.set(xlabel="per-image reconstruction MSE (normalised space)", ylabel="images",
               title=f"reconstruction error, {stats['images']} views")
    kl = fig.add_subplot(grid[1, 1])
    ordered = np.sort(np.asarray(stats["kl_per_dim"]))[::-1]
    kl.bar(np.arange(len(ordered)), ordered, width=1.0, color="#ff7f0e")
    kl.axhline(ACTIVE_KL, color="black", linestyle="--", linewidth=1)
    kl.set_yscale("log")
    kl.set(xlabel="latent dimension (sorted)", ylabel="KL (nats)",
           title=f"KL per dimension: {stats['active_dims']}/{stats['latent_dim']} above {ACTIVE_KL}")
    where = fig.add_subplot(grid[1, 2])
    shown_map = where.imshow(residual_map.mean(0).cpu().numpy(), cmap="magma")
    fig.colorbar(shown_map, ax=where, fraction=0.046)
    where.set_axis_off()
    where.set_title("mean |R(x)| per pixel", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "vae_report.png", dpi=110)
    summary = {k: v for k, v in stats.items() if k != "per_image_mse"}
    (out / "vae_report.json").write_text(json.dumps(summary, indent=1))
    return summary
