"""The data and tracker settings every training command shares (pretrain, semi, vae train), each defined once.

A setting is one dataclass field that carries its default, flag type, help text and check, so the configs,
their YAML keys (flat: `data_dir: ...`) and their command-line flags (`--data-dir`) all come from here.
The `check_*` helpers are the one validation style of every training config: a bool is never a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from idaa.data import BAD_IMAGES, StreamOptions
from idaa.errors import IdaaError
from idaa.tracking import parse_loggers

SWITCH = "switch"  # a flag without a value (--stream): True when given, None (the setting's default) when not


def flag_name(key: str) -> str:
    """The command-line flag of a setting: data_dir -> --data-dir."""
    return "--" + key.replace("_", "-")


def check_int(key: str, value: Any, low: int, optional: bool = False) -> None:
    """An integer >= low (None allowed when `optional`), else a one-line error naming the flag."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise IdaaError(f"{flag_name(key)} must be an integer >= {low}, got {value!r}")


def check_number(key: str, value: Any, positive: bool = False, optional: bool = False) -> None:
    """A finite number > 0 (`positive`) or >= 0 (None allowed when `optional`), else a one-line error."""
    if optional and value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise IdaaError(f"{flag_name(key)} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """One of `allowed`, else a one-line error listing them."""
    if value not in allowed:
        raise IdaaError(f"{flag_name(key)} must be one of {', '.join(allowed)}, got {value!r}")


def _fraction(key: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1):
        raise IdaaError(f"{flag_name(key)} must be a number in (0, 1), got {value!r}")


def setting(default: Any, kind: type | str, text: str, check: Callable[[str, Any], None] | None = None) -> Any:
    """A dataclass field that is also a command-line flag: its default, flag type, help text and check."""
    return field(default=default, metadata={"kind": kind, "help": text, "check": check})


@dataclass
class RunSettings:
    """Which images a run reads and how, its seed, and which trackers log it (shared by every training config)."""

    dataset: str = setting("cifar10", str, "cifar10, cifar100, stl10, tinyimagenet, imagenet, folder, shards, digits, "
                           "...")
    data_dir: str | None = setting(None, str, "dataset folder (not needed for digits)")
    download: bool = setting(False, SWITCH, "fetch the official archive (cifar10/100, stl10)")
    limit: int | None = setting(None, int, "use a seeded class-balanced subset of N training images",
                                lambda k, v: check_int(k, v, 1, optional=True))
    seed: int = setting(0, int, "seed of the data subset and split, the initial weights and the sampling (0)")
    stream: bool | None = setting(None, SWITCH, "decode images from their files in worker processes (automatic for "
                                  "mixed or large images)")
    image_size: int | None = setting(None, int, "crop size of streamed images (default: their size if uniform, "
                                     "else 224)", lambda k, v: check_int(k, v, 8, optional=True))
    workers: int | None = setting(None, int, "processes decoding streamed images (default: the cores less one)",
                                  lambda k, v: check_int(k, v, 0, optional=True))
    bad_images: str = setting("error", str, "error (default: stop, naming the file) or skip unreadable images",
                              lambda k, v: check_choice(k, v, BAD_IMAGES))
    # a single labelled folder: the seeded share of each class held out as the test split
    test_fraction: float | None = setting(None, float, "a single labelled folder: hold out this seeded share of every "
                                          "class as the test split", _fraction)
    # None: tensorboard when installed; metrics.jsonl is always written
    logger: str | None = setting(None, str, "trackers, comma-separated: tensorboard, wandb, mlflow, csv or none "
                                 "(default: tensorboard when installed; metrics.jsonl is always written)")
    mlflow_uri: str | None = setting(None, str, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a file "
                                     "store in RUN/mlruns)")
    wandb_project: str | None = setting(None, str, "W&B project (default: $WANDB_PROJECT, else idaa)")
    wandb_entity: str | None = setting(None, str, "W&B entity")

    def sources(self) -> StreamOptions:
        """How the images are read (streamed or in memory), checked."""
        return StreamOptions(self.stream, self.image_size, self.workers, self.bad_images, self.seed,
                             self.test_fraction).validate()

    def validate_settings(self) -> None:
        """One-line errors for impossible data or tracker settings, before any data is read."""
        for spec in SETTINGS:
            if spec.metadata["check"] is not None:
                spec.metadata["check"](spec.name, getattr(self, spec.name))
        self.sources()
        parse_loggers(self.logger or "none")  # unknown names, missing extras: before any data is read


SETTINGS: tuple[dataclasses.Field, ...] = dataclasses.fields(RunSettings)
SETTING_NAMES = tuple(spec.name for spec in SETTINGS)


def add_settings_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Every shared setting as a flag whose default None means 'not given' (a preset or the config keeps its own)."""
    for spec in SETTINGS:
        if spec.name in skip:
            continue
        kind, text = spec.metadata["kind"], spec.metadata["help"]
        if kind == SWITCH:
            parser.add_argument(flag_name(spec.name), action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag_name(spec.name), type=kind, default=None, help=text)


def settings_given(args: argparse.Namespace) -> dict[str, Any]:
    """The shared settings given on the command line (None: not given)."""
    return {name: getattr(args, name) for name in SETTING_NAMES if getattr(args, name, None) is not None}
