"""The identity-disentangling VAE of SPEC 1: G(x) = D(mu(x)) is the part the adversary may change."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from idaa.errors import IdaaError
from idaa.fileio import atomic_torch_save
from idaa.runlock import writer_of

VAE_FORMAT = 1
VAE_PRECISIONS = ("fp32", "bf16")


class ResBlock(nn.Module):
    """LeakyReLU-conv3x3-BN-LeakyReLU-conv1x1 with an identity skip (the authors' VAE block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LeakyReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
            nn.LeakyReLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _stages(image_size: int) -> int:
    """Number of stride-2 stages that bring `image_size` down to at most 8 (32 -> 2, 64 -> 3, 224 -> 5)."""
    if image_size < 16:
        raise IdaaError(f"VAE needs images of at least 16 px, got {image_size}")
    n, size = 0, image_size
    while size > 8:
        if size % 2:
            raise IdaaError(f"VAE image size {image_size} does not halve evenly to <= 8 px (try 32, 64, 96, 224)")
        size, n = size // 2, n + 1
    return n


class VAE(nn.Module):
    """Convolutional VAE: `encode(x) -> (mu, logvar)`, `decode(z) -> image` in normalised view space.

    Encoder: stride-2 4x4 convs (hidden/2**k channels) + BN + ReLU down to `hidden` x f x f, two residual
    blocks, then linear heads for mu and logvar. Decoder mirrors it with transposed convs, tanh, and a
    learnable BatchNorm2d over the channels so that G(x) lands in the normalised space of the views.
    """

    def __init__(self, image_size: int = 32, channels: int = 3, latent_dim: int = 512, hidden: int = 128) -> None:
        super().__init__()
        if latent_dim < 1 or hidden < 2 or channels < 1:
            raise IdaaError("VAE latent_dim, hidden and channels must be positive")
        n = _stages(image_size)
        widths = [max(hidden // 2 ** (n - 1 - i), 1) for i in range(n)]  # e.g. 64, 128 for 32 px
        self.config = {"image_size": image_size, "channels": channels, "latent_dim": latent_dim, "hidden": hidden}
        self.feat = image_size // 2**n
        enc: list[nn.Module] = []
        cin = channels
        for w in widths:
            enc += [nn.Conv2d(cin, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        enc += [ResBlock(hidden), nn.BatchNorm2d(hidden), ResBlock(hidden)]
        self.encoder = nn.Sequential(*enc)
        flat = hidden * self.feat**2
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)
        self.fc_dec = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = [ResBlock(hidden), nn.BatchNorm2d(hidden), ResBlock(hidden), nn.BatchNorm2d(hidden)]
        rev = widths[::-1] + [channels]
        for i in range(n):
            dec.append(nn.ConvTranspose2d(rev[i], rev[i + 1], 4, stride=2, padding=1, bias=False))
            if i < n - 1:
                dec += [nn.BatchNorm2d(rev[i + 1]), nn.LeakyReLU(inplace=True)]
        self.decoder = nn.Sequential(*dec)
        self.out_bn = nn.BatchNorm2d(channels)
        self.precision = "fp32"  # "bf16": encode/decode under bf16 autocast (x' changes: a named option)

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def latent_dim(self) -> int:
        return self.config["latent_dim"]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, logvar), each N x latent_dim."""
        self._check_input(x)
        with self._autocast(x):
            h = torch.flatten(self.encoder(x), 1)
            return self.fc_mu(h).float(), self.fc_logvar(h).float()

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """mu(x) alone: what the frozen VAE's adversary needs (the logvar head's matrix product is skipped)."""
        self._check_input(x)
        with self._autocast(x):
            return self.fc_mu(torch.flatten(self.encoder(x), 1)).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image in normalised space for latent codes z (N x latent_dim)."""
        with self._autocast(z):
            h = self.fc_dec(z).view(-1, self.config["hidden"], self.feat, self.feat)
            return self.out_bn(torch.tanh(self.decoder(h))).float()

    def set_precision(self, precision: str) -> VAE:
        """How encode/decode compute: fp32 (exact) or bf16 autocast (faster on CPUs with AVX512-BF16 and GPUs)."""
        if precision not in VAE_PRECISIONS:
            raise IdaaError(f"--vae-precision must be one of {', '.join(VAE_PRECISIONS)}, got {precision!r}")
        self.precision = precision
        return self

    def _autocast(self, like: torch.Tensor) -> AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(like.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mu, logvar); samples z in training mode, uses z = mu in eval mode."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar

    def freeze(self) -> VAE:
        """Eval mode and no parameter gradients: how the VAE is used once trained."""
        self.eval()
        self.requires_grad_(False)
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        c, s = self.config["channels"], self.config["image_size"]
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise IdaaError(f"VAE expects N x {c} x {s} x {s} images, got {tuple(x.shape)}")


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction MSE, KL) with KL averaged per latent dim and divided by the channel count,
    the scale of the authors' code, so that beta=0.1 means what it means there."""
    mse = torch.mean((recon - x) ** 2)
    kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[1]
    return mse + beta * kl, mse, kl


def save_vae(vae: VAE, path: str | Path, meta: dict[str, Any]) -> None:
    """Write `vae.pt` atomically: weights, architecture, and the data it was trained on (name, size, mean/std)."""
    atomic_torch_save({"format": VAE_FORMAT, "config": dict(vae.config), "state_dict": vae.state_dict(),
                       "meta": dict(meta)}, path)  # a full disk: one line, exit 75, the old vae.pt kept


def load_vae(path: str | Path, map_location: str | torch.device = "cpu", *, to_train_with: bool = False) -> VAE:
    """Restore a frozen VAE from `vae.pt`; its training data description is in `vae.meta`.

    `to_train_with` refuses a vae.pt that `idaa vae train` is still writing (it is replaced every epoch): a run
    trained on a half-trained VAE, whose file then changes under it, could never be resumed or reproduced. It
    also refuses one whose training stopped early (fewer epochs than the config.yaml beside it asked for).
    """
    path = Path(path)
    if not path.is_file():
        raise IdaaError(f"VAE checkpoint '{path}' does not exist")
    writer = writer_of(path.parent) if to_train_with else None
    if writer is not None:
        raise IdaaError(f"VAE '{path}' is still being trained by {writer}; start once it has finished")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        vae = VAE(**blob["config"])
        vae.load_state_dict(blob["state_dict"])
    except IdaaError:
        raise
    except Exception as exc:  # a truncated or foreign file: say which one, in one line
        raise IdaaError(f"'{path}' is not a readable idaa VAE checkpoint ({type(exc).__name__})") from None
    vae.meta = dict(blob.get("meta", {}))
    if to_train_with:
        _refuse_unfinished(path, vae.meta.get("epochs"))
    return vae.freeze()


def _refuse_unfinished(path: Path, epochs: Any) -> None:
    """A vae.pt whose `idaa vae train` stopped before the epochs its config.yaml names (no resume exists)."""
    try:
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return  # a vae.pt copied out of its run folder: nothing to compare with
    if not isinstance(config, dict) or config.get("command") != "vae train":
        return  # a folder some other command wrote
    asked = config.get("epochs")
    if isinstance(epochs, int) and isinstance(asked, int) and epochs < asked:
        raise IdaaError(f"VAE '{path}' holds epoch {epochs} of the {asked} its training asked for (it stopped "
                        "early); train it again, or copy vae.pt out of its folder to use it as it is")


def check_vae_fits(vae: VAE, dataset: str, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Refuse a VAE trained on another dataset, image size or normalisation: its G(x) would be meaningless."""
    meta = getattr(vae, "meta", {})
    trained_on = meta.get("dataset")
    if trained_on is not None and trained_on != dataset:
        raise IdaaError(f"VAE was trained on '{trained_on}' but the data is '{dataset}'; train one with "
                        f"'idaa vae train --dataset {dataset}'")
    if vae.image_size != image_size:
        raise IdaaError(f"VAE expects {vae.image_size} px images but the data is {image_size} px")
    for key, want in (("mean", mean), ("std", std)):
        got = meta.get(key)
        if got is not None and any(abs(a - b) > 1e-3 for a, b in zip(got, want, strict=True)):
            raise IdaaError(f"VAE was trained with normalisation {key}={tuple(round(v, 4) for v in got)} but the "
                            f"data uses {tuple(round(v, 4) for v in want)}")
