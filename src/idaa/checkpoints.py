"""Reading pretraining checkpoints without the training loop (evaluation and analysis start here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idaa.data import StreamOptions, checkpoint_options
from idaa.errors import IdaaError
from idaa.methods import Method, build_method
from idaa.nets.resnet import build_backbone

CHECKPOINT_FORMAT = 1


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """What a checkpoint file holds; a missing or truncated file is a one-line error (pretrain and semi alike)."""
    path = Path(path)
    if not path.is_file():
        raise IdaaError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, ...
        raise IdaaError(f"'{path}' is not a readable checkpoint ({type(exc).__name__})") from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dictionary; a missing, truncated or foreign file is a one-line error."""
    blob = load_file(path, map_location)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT or "method" not in blob:
        raise IdaaError(f"'{path}' is not an idaa pretraining checkpoint")
    return blob


def build_from_config(config: dict[str, Any], in_channels: int = 3) -> Method:
    """The method (backbone + heads) a run config describes, freshly initialised."""
    backbone = build_backbone(config["backbone"], width=config.get("width"), in_channels=in_channels)
    method = build_method(config["method"], backbone, temperature=config.get("temperature"),
                          attack_loss=config["attack_loss"], **config.get("method_options", {}))
    method.attack_graph = config.get("attack_graph", "separate")
    method.attack_fraction = config.get("attack_fraction", 1.0)
    method.adversarial_anchor = config.get("adversarial_anchor", "live")
    return method


def load_method(path: str | Path, device: str | torch.device = "cpu") -> tuple[Method, dict[str, Any]]:
    """(method in eval mode with its weights, checkpoint dict) from a `last.ckpt`-style file."""
    blob = read_checkpoint(path, map_location=device)
    method = build_from_config(blob["config"], blob.get("data", {}).get("channels", 3))
    method.load_state_dict(blob["method"])
    return method.to(device).eval(), blob


@dataclass(frozen=True)
class CheckpointData:
    """Which data a checkpoint is evaluated on: the dataset, its folder and how its images are read."""

    name: str
    data_dir: str | None
    options: StreamOptions
    own: bool  # the run's own dataset: its folder, streaming choice and crop size carry over


def checkpoint_data(config: dict[str, Any], dataset: str | None = None, data_dir: str | None = None,
                    sources: StreamOptions | None = None) -> CheckpointData:
    """The one rule of every evaluation and analysis command: --dataset and --data-dir when given, else the
    run's own; a run's folder is kept whenever its own dataset is evaluated, named or not."""
    name = dataset or config["dataset"]
    own = name == config["dataset"]
    folder = data_dir or (config.get("data_dir") if own else None)
    return CheckpointData(name, folder, checkpoint_options(config, own, sources), own)
