"""The resolved configuration of `idaa semi`; defaults are FixMatch's CIFAR recipe with a WRN-28-2."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from idaa.adversaries import ADVERSARIES
from idaa.data.sources import StreamOptions
from idaa.errors import IdaaError
from idaa.tracking import parse_loggers

METHODS = ("fixmatch", "supervised")
VAE_ADVERSARIES = ("idaa", "idaa-nodecomp", "latent-noise")


@dataclass
class SemiConfig:
    """Every setting of `idaa semi`. `steps` is K, the length of the cosine schedule (FixMatch: 2^20 = 1024 x 1024).

    `max_steps` stops a run early without changing the schedule (smoke runs); `eval_every` is FixMatch's
    "epoch" of 1024 steps, after which the EMA model is evaluated and last.ckpt is written.
    """

    out: str = ""
    method: str = "fixmatch"
    labels: int | None = None
    adversary: str = "none"
    vae: str | None = None
    eps: float | None = None
    attack_steps: int = 1
    alpha: float = 1.0
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None
    backbone: str = "wrn28-2"
    width: int | None = None
    steps: int = 2**20
    batch_size: int = 64
    mu: int = 7
    threshold: float = 0.95
    lambda_u: float = 1.0
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    ema_decay: float = 0.999
    eval_every: int = 1024
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    stream: bool | None = None  # streamed folders are decoded once, as centre crops at image_size, into memory
    image_size: int | None = None
    workers: int | None = None
    bad_images: str = "error"
    test_fraction: float | None = None  # a single labelled folder: the seeded share of each class held out as test
    logger: str | None = None  # trackers (idaa.tracking); metrics.jsonl is always written
    mlflow_uri: str | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None

    def sources(self) -> StreamOptions:
        """How the images are read (streamed or in memory), checked."""
        return StreamOptions(self.stream, self.image_size, self.workers, self.bad_images, self.seed,
                             self.test_fraction).validate()

    def validate(self) -> SemiConfig:
        """One-line errors for impossible values, before any data is read or any folder written."""
        if not self.out:
            raise IdaaError("--out is required: the run folder to create")
        if self.method not in METHODS:
            raise IdaaError(f"unknown semi-supervised method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.adversary not in ADVERSARIES:
            raise IdaaError(f"unknown adversary {self.adversary!r}; choose from {', '.join(ADVERSARIES)}")
        if self.method == "supervised" and self.adversary != "none":
            raise IdaaError("the supervised baseline takes no adversary (it has no strong branch): drop --adversary")
        if self.adversary in VAE_ADVERSARIES and not self.vae:
            raise IdaaError(f"adversary '{self.adversary}' needs --vae VAE.pt (make one with 'idaa vae train')")
        if self.labels is None:
            raise IdaaError("--labels is required: how many training images keep their label")
        for key in ("labels", "attack_steps", "steps", "batch_size", "mu", "eval_every"):
            _check_int(key, getattr(self, key), low=1)
        for key in ("limit", "max_steps", "width"):
            if getattr(self, key) is not None:
                _check_int(key, getattr(self, key), low=1)
        for key in ("lr",):
            _check_float(key, getattr(self, key), positive=True)
        for key in ("alpha", "lambda_u", "momentum", "weight_decay", "eps"):
            if getattr(self, key) is not None:
                _check_float(key, getattr(self, key), positive=False)
        for key in ("threshold", "ema_decay"):
            value = getattr(self, key)
            _check_float(key, value, positive=False)
            if value > 1:
                raise IdaaError(f"{_flag(key)} must lie in [0, 1], got {value!r}")
        if self.precision not in ("fp32", "bf16"):
            raise IdaaError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.width is not None and self.backbone.lower().startswith("wrn"):
            raise IdaaError(f"--width sets a ResNet's base width; a WideResNet has it in its name ({self.backbone})")
        self.sources()
        parse_loggers(self.logger or "none")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(SemiConfig))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_int(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise IdaaError(f"{_flag(key)} must be an integer >= {low}, got {value!r}")


def _check_float(key: str, value: Any, positive: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise IdaaError(f"{_flag(key)} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
