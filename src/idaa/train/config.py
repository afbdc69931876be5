"""The resolved configuration of a pretraining run: presets from YAML, then command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idaa.adversaries import ADVERSARIES
from idaa.errors import IdaaError
from idaa.methods import METHODS
from idaa.train.settings import RunSettings, check_choice, check_int, check_number


@dataclass
class PretrainConfig(RunSettings):
    """Every setting of `idaa pretrain` (data and trackers: RunSettings); defaults: the authors' SimCLR recipe."""

    out: str = ""
    method: str = "simclr"
    adversary: str = "none"
    vae: str | None = None
    backbone: str = "resnet18-cifar"
    width: int | None = None
    epochs: int = 200
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 3e-4
    weight_decay: float = 1e-6
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: int = 0
    temperature: float | None = None
    attack_loss: str = "anchored"
    method_options: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    eps: float | None = None
    attack_steps: int = 1
    attack_step_size: float | None = None
    attack_norm: str = "linf"
    random_start: bool = False
    attack_graph: str = "separate"
    adversarial_anchor: str = "live"  # "detached": L(v1, x') trains through x' only
    vae_precision: str = "fp32"  # "bf16": the frozen VAE's passes under bf16 autocast (changes x' slightly)
    attack_fraction: float = 1.0
    attack_every: int = 1  # attack only every k-th step (the others train on the clean loss alone)
    attack_from_epoch: int = 0  # attack only from this epoch on (1-based; 0 and 1: from the start)
    alpha: float = 1.0
    knn_every: int = 1
    knn_k: int = 200
    knn_temperature: float = 0.1
    checkpoint_every: int = 0
    checkpoint_steps: int = 0
    skip_nonfinite: int = 0
    max_steps: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    embed_map: bool = False  # at the end: RUN/embed.png + embed.csv, a 2-d map of the test features

    def validate(self) -> PretrainConfig:
        """One-line errors for impossible values, before anything is read or written."""
        if not self.out:
            raise IdaaError("--out is required: the run folder to create")
        if self.method not in METHODS:
            raise IdaaError(f"unknown method {self.method!r}; choose from {', '.join(sorted(METHODS))}")
        if not isinstance(self.method_options, dict):
            raise IdaaError(f"method_options must be a mapping of option: value, got {self.method_options!r}")
        if self.adversary not in ADVERSARIES:
            raise IdaaError(f"unknown adversary {self.adversary!r}; choose from {', '.join(ADVERSARIES)}")
        for key in ("epochs", "batch_size", "attack_steps", "knn_k", "attack_every"):
            check_int(key, getattr(self, key), 1)
        for key in ("max_steps", "width"):
            check_int(key, getattr(self, key), 1, optional=True)
        for key in ("knn_every", "checkpoint_every", "checkpoint_steps", "skip_nonfinite", "warmup_epochs",
                    "attack_from_epoch"):
            check_int(key, getattr(self, key), 0)
        for key in ("lr", "temperature", "knn_temperature"):  # temperature None: the method's own default
            check_number(key, getattr(self, key), positive=True, optional=key == "temperature")
        for key in ("weight_decay", "alpha", "momentum", "eps"):
            check_number(key, getattr(self, key), optional=True)
        choices = {"optimizer": ("adam", "sgd"), "schedule": ("cosine", "constant"),
                   "precision": ("fp32", "bf16", "fp16"), "attack_norm": ("linf", "l2"),
                   "attack_loss": ("anchored", "symmetric"), "attack_graph": ("separate", "clean", "shared"),
                   "adversarial_anchor": ("live", "detached"), "vae_precision": ("fp32", "bf16")}
        for key, allowed in choices.items():
            check_choice(key, getattr(self, key), allowed)
        if isinstance(self.attack_fraction, bool) or not isinstance(self.attack_fraction, int | float) \
                or not 0 < self.attack_fraction <= 1:
            raise IdaaError(f"--attack-fraction must be in (0, 1], got {self.attack_fraction!r}")
        if self.attack_graph != "separate" and (self.attack_steps != 1 or self.random_start
                                                or self.adversary not in ("idaa", "clae")):
            raise IdaaError(f"--attack-graph {self.attack_graph} needs the FGSM idaa or clae adversary (one step, "
                            f"no random start), got --adversary {self.adversary}"
                            f"{' --random-start' if self.random_start else ''}"
                            f"{f' --attack-steps {self.attack_steps}' if self.attack_steps != 1 else ''}")
        self.validate_settings()
        return self


FIELDS = {f.name for f in dataclasses.fields(PretrainConfig)}


def read_preset(path: str | Path, fields: set[str] | None = None) -> dict[str, Any]:
    """A preset's settings; unknown keys (not in `fields`, default: pretraining's) and bad YAML are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise IdaaError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise IdaaError(f"config file '{path}' is not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise IdaaError(f"config file '{path}' must hold a mapping of settings, got {type(data).__name__}")
    data.pop("command", None)
    unknown = sorted(set(data) - (FIELDS if fields is None else fields))
    if unknown:
        raise IdaaError(f"unknown config key(s) {', '.join(unknown)} in '{path}'")
    return data


def resolve_config(preset: dict[str, Any] | None, overrides: dict[str, Any]) -> PretrainConfig:
    """Defaults, then the preset, then explicitly given flags (None means 'not given')."""
    values = dict(preset or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise IdaaError(f"unknown setting(s) {', '.join(unknown)}")
    return PretrainConfig(**values).validate()
