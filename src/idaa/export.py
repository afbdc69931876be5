"""Export a pretrained backbone for downstream use, and load it back without the training code.

`idaa export last.ckpt --out backbone.pt` writes one file holding

- ``state_dict``: the backbone's weights with plain ``BatchNorm2d`` layers (the main, clean-data BN of the
  dual-BN network; the adversarial twins are dropped, since every clean input and every evaluation uses the
  main ones), keys such as ``stem.0.weight``, ``layers.0.bn1.running_mean``;
- ``meta``: what is needed to rebuild and feed it: ``backbone`` (e.g. ``resnet18-cifar``), ``width``,
  ``in_channels``, ``image_size``, ``mean``, ``std``, ``out_dim``, plus provenance (method, adversary,
  pretraining dataset, epoch, checkpoint sha256).

Downstream use::

    import torch
    from idaa import load_backbone, preprocess

    net = load_backbone("backbone.pt")              # eval mode, plain BN; net.meta has the metadata above
    x = preprocess(images_uint8, net.meta)          # N x 3 x H x W uint8 -> resized, normalised float
    with torch.no_grad():
        features = net(x)                           # N x net.meta["out_dim"]

The file contains only tensors, strings and numbers, so it loads with ``torch.load(..., weights_only=True)``;
``load_backbone`` needs only ``idaa.nets`` (no methods, adversaries or training loop).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idaa.errors import IdaaError
from idaa.nets.dual_bn import DualBatchNorm2d
from idaa.nets.resnet import Backbone, build_backbone

EXPORT_FORMAT = "idaa-backbone/1"


def collapse_dual_bn(module: nn.Module) -> nn.Module:
    """Replace every DualBatchNorm2d inside `module` by its main BatchNorm2d, in place; returns `module`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DualBatchNorm2d):
                setattr(parent, name, child.main)
    if isinstance(module, Backbone):
        module._collect_duals()  # nothing left to switch between
    return module


def export_backbone(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the checkpoint's backbone (main BN only) and its metadata to `out`; returns the metadata."""
    from idaa.checkpoints import load_method
    from idaa.evaluate.features import file_digest
    from idaa.train.run_dir import atomic_torch_save

    out = Path(out)
    if out.exists() and not overwrite:
        raise IdaaError(f"'{out}' already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise IdaaError(f"'{out}' is a folder; give a file name such as backbone.pt")
    method, blob = load_method(checkpoint, "cpu")
    cfg, data = blob["config"], blob["data"]
    backbone = collapse_dual_bn(copy.deepcopy(method.backbone)).eval()
    meta = {"format": EXPORT_FORMAT, "backbone": cfg["backbone"], "width": cfg.get("width"),
            "in_channels": int(data.get("channels", 3)), "image_size": int(data["image_size"]),
            "mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]],
            "out_dim": int(backbone.out_dim), "method": cfg.get("method"), "adversary": cfg.get("adversary"),
            "dataset": data.get("name"), "epoch": int(blob.get("epoch", 0)),
            "checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint)}
    state = {key: value.detach().clone() for key, value in backbone.state_dict().items()}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"format": EXPORT_FORMAT, "meta": meta, "state_dict": state}, out)
    except OSError as exc:
        raise IdaaError(f"cannot write '{out}' ({exc.strerror or type(exc).__name__})") from None
    return meta


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> Backbone:
    """The exported backbone, rebuilt from its metadata, weights loaded, in eval mode; `.meta` holds the metadata.

    `net(x)` maps normalised N x C x image_size x image_size inputs (see `preprocess`) to N x out_dim features.
    """
    path = Path(path)
    if not path.is_file():
        raise IdaaError(f"exported backbone '{path}' does not exist")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise IdaaError(f"'{path}' is not a readable backbone file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise IdaaError(f"'{path}' is not an `idaa export` backbone file")
    meta = blob["meta"]
    net = collapse_dual_bn(build_backbone(meta["backbone"], width=meta.get("width"),
                                          in_channels=meta["in_channels"]))
    net.load_state_dict(blob["state_dict"])
    net.meta = meta
    return net.to(map_location).eval()


def preprocess(images: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) N x C x H x W images -> the backbone's input: resized, then normalised."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    size = int(meta["image_size"])
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(meta["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
