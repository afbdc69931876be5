"""The resolved configuration of `idaa semi`; defaults are FixMatch's CIFAR recipe with a WRN-28-2."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from idaa.adversaries import ADVERSARIES, VAE_ADVERSARIES
from idaa.errors import IdaaError
from idaa.train.settings import RunSettings, check_choice, check_int, check_number, flag_name

METHODS = ("fixmatch", "supervised")


@dataclass
class SemiConfig(RunSettings):
    """Every setting of `idaa semi`. `steps` is K, the length of the cosine schedule (FixMatch: 2^20 = 1024 x 1024).

    Data and tracker settings come from RunSettings (streamed folders are decoded once, as centre crops at
    image_size, into memory). `max_steps` stops a run early without changing the schedule (smoke runs);
    `eval_every` is FixMatch's "epoch" of 1024 steps, after which the EMA model is evaluated and last.ckpt is written.
    """

    out: str = ""
    method: str = "fixmatch"
    labels: int | None = None
    adversary: str = "none"
    vae: str | None = None
    eps: float | None = None
    attack_steps: int = 1
    alpha: float = 1.0
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
    device: str = "auto"
    precision: str = "fp32"

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
            check_int(key, getattr(self, key), 1)
        for key in ("max_steps", "width"):
            check_int(key, getattr(self, key), 1, optional=True)
        check_number("lr", self.lr, positive=True)
        for key in ("alpha", "lambda_u", "momentum", "weight_decay", "eps"):
            check_number(key, getattr(self, key), optional=True)
        for key in ("threshold", "ema_decay"):
            value = getattr(self, key)
            check_number(key, value)
            if value > 1:
                raise IdaaError(f"{flag_name(key)} must lie in [0, 1], got {value!r}")
        check_choice("precision", self.precision, ("fp32", "bf16"))
        if self.width is not None and self.backbone.lower().startswith("wrn"):
            raise IdaaError(f"--width sets a ResNet's base width; a WideResNet has it in its name ({self.backbone})")
        self.validate_settings()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(SemiConfig))

