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

Other formats (``--format``, else chosen by the suffix of ``--out``):

- ``safetensors`` (``.safetensors``): the same tensors, and the metadata as the header's string map (numbers and
  lists JSON-encoded), readable by any safetensors tool; ``load_backbone`` reads it like the ``.pt`` file;
- ``detectron2`` (``.pkl``): a ResNet backbone under detectron2's parameter names (see `idaa.export_detectron2`).

An exported .pt or .safetensors file given to `idaa export` in place of a checkpoint is converted to the format asked.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idaa.errors import IdaaError
from idaa.fileio import file_digest
from idaa.nets.dual_bn import DualBatchNorm2d
from idaa.nets.resnet import Backbone, build_backbone

EXPORT_FORMAT = "idaa-backbone/1"
FORMATS = ("pt", "safetensors", "detectron2")
_SUFFIX_FORMATS = {".safetensors": "safetensors", ".pkl": "detectron2"}
# metadata fields that are not text: JSON-encoded in a safetensors header, whose values must be strings
_JSON_FIELDS = ("width", "in_channels", "image_size", "mean", "std", "out_dim", "epoch")


def collapse_dual_bn(module: nn.Module) -> nn.Module:
    """Replace every DualBatchNorm2d inside `module` by its main BatchNorm2d, in place; returns `module`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DualBatchNorm2d):
                setattr(parent, name, child.main)
    if isinstance(module, Backbone):
        module._collect_duals()  # nothing left to switch between
    return module


def export_format(out: str | Path, fmt: str | None = None) -> str:
    """The format to write: `fmt` if given, else by suffix (.safetensors, .pkl -> detectron2, anything else -> pt)."""
    if fmt is None:
        return _SUFFIX_FORMATS.get(Path(out).suffix.lower(), "pt")
    if fmt not in FORMATS:
        raise IdaaError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def export_backbone(checkpoint: str | Path, out: str | Path, overwrite: bool = False,
                    fmt: str | None = None) -> dict[str, Any]:
    """Write the checkpoint's backbone (main BN only) and its metadata to `out` as `fmt`; returns the metadata.

    `checkpoint` may also be a file this function wrote (.pt or .safetensors): it is converted to `fmt`.
    """
    out = Path(out)
    fmt = export_format(out, fmt)
    if out.exists() and not overwrite:
        raise IdaaError(f"'{out}' already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise IdaaError(f"'{out}' is a folder; give a file name such as backbone.pt")
    backbone, meta = _exported_source(Path(checkpoint)) or _checkpoint_source(checkpoint)
    state = {key: value.detach().clone().contiguous() for key, value in backbone.state_dict().items()}
    if fmt == "detectron2":
        from idaa.export_detectron2 import detectron2_checkpoint

        payload = detectron2_checkpoint(backbone, meta)  # refuses backbones detectron2 cannot hold
        meta = payload["idaa"]  # + detectron2_config and detectron2_notes
    _write(out, fmt, meta, payload if fmt == "detectron2" else state)
    return meta


def _checkpoint_source(checkpoint: str | Path) -> tuple[Backbone, dict[str, Any]]:
    """The plain-BN backbone of a pretraining checkpoint and the metadata to rebuild and feed it."""
    from idaa.checkpoints import load_method

    method, blob = load_method(checkpoint, "cpu")
    cfg, data = blob["config"], blob["data"]
    backbone = collapse_dual_bn(copy.deepcopy(method.backbone)).eval()
    meta = {"format": EXPORT_FORMAT, "backbone": cfg["backbone"], "width": cfg.get("width"),
            "in_channels": int(data.get("channels", 3)), "image_size": int(data["image_size"]),
            "mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]],
            "out_dim": int(backbone.out_dim), "method": cfg.get("method"), "adversary": cfg.get("adversary"),
            "dataset": data.get("name"), "epoch": int(blob.get("epoch", 0)),
            "checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint)}
    return backbone, meta


def _exported_source(path: Path) -> tuple[Backbone, dict[str, Any]] | None:
    """An already exported backbone (to convert to another format), or None for anything else."""
    if not path.is_file():
        return None
    if not _is_safetensors(path):
        if path.suffix.lower() != ".pt":
            return None
        try:
            _read_torch(path)
        except IdaaError:  # not an export: perhaps a checkpoint saved as .pt
            return None
    net = load_backbone(path)  # a damaged export stops here with a one-line error
    return net, dict(net.meta)


def describe_export(meta: dict[str, Any], out: str | Path) -> str:
    """What `idaa export` prints: the backbone, the file and how to use it (detectron2: its config keys)."""
    line = (f"export: {meta['backbone']} (width {meta['width']}, {meta['out_dim']}-d features, "
            f"{meta['image_size']} px) -> {out}")
    if "detectron2_config" not in meta:
        return line + "; load with idaa.load_backbone"
    import shlex

    # as train_net.py's trailing options: Python literals (yacs reads them so), quoted for the shell
    keys = " ".join(f"{key} {shlex.quote(value if isinstance(value, str) else repr(value).replace(' ', ''))}"
                    for key, value in meta["detectron2_config"].items())
    notes = "".join(f"\nnote: {note}" for note in meta["detectron2_notes"])
    return f"{line}\ndetectron2: MODEL.WEIGHTS {out} {keys}{notes}"


def _write(out: Path, fmt: str, meta: dict[str, Any], content: dict[str, Any]) -> None:
    """Serialise atomically: a torch file, a safetensors file (metadata in its header) or a detectron2 pickle."""
    import io
    import pickle

    from idaa.fileio import atomic_write_bytes

    if fmt == "safetensors":
        from safetensors.torch import save as safetensors_bytes

        header = {key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}
        data = safetensors_bytes(content, metadata=header)
    elif fmt == "detectron2":
        data = pickle.dumps(content, protocol=4)
    else:
        buffer = io.BytesIO()
        torch.save({"format": EXPORT_FORMAT, "meta": meta, "state_dict": content}, buffer)
        data = buffer.getvalue()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, lambda handle: handle.write(data))
    except OSError as exc:
        raise IdaaError(f"cannot write '{out}' ({exc.strerror or type(exc).__name__})") from None


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> Backbone:
    """The exported backbone (.pt or .safetensors), rebuilt from its metadata, in eval mode; `.meta` has the metadata.

    `net(x)` maps normalised N x C x image_size x image_size inputs (see `preprocess`) to N x out_dim features.
    """
    path = Path(path)
    if not path.is_file():
        raise IdaaError(f"exported backbone '{path}' does not exist")
    if _is_safetensors(path):
        meta, state = _read_safetensors(path)
    elif path.suffix.lower() == ".pkl":
        raise IdaaError(f"'{path}' is a detectron2 weights file; load it with detectron2 (MODEL.WEIGHTS), "
                        "or export a .pt / .safetensors file for idaa.load_backbone")
    else:
        meta, state = _read_torch(path)
    net = collapse_dual_bn(build_backbone(meta["backbone"], width=meta.get("width"),
                                          in_channels=meta["in_channels"]))
    _check_tensors(path, meta, net.state_dict(), state)
    net.load_state_dict(state)
    net.meta = meta
    return net.to(map_location).eval()


def _read_torch(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IdaaError(f"'{path}' is not a readable backbone file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise IdaaError(f"'{path}' is not an `idaa export` backbone file")
    return blob["meta"], blob["state_dict"]


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then the header."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise IdaaError(f"'{path}' is not a readable safetensors file ({type(exc).__name__})") from None
    if header.get("format") != EXPORT_FORMAT:
        raise IdaaError(f"'{path}' is a safetensors file without `idaa export` metadata (format {EXPORT_FORMAT})")
    meta: dict[str, Any] = dict(header)
    for key in _JSON_FIELDS:
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise IdaaError(f"'{path}': metadata field {key!r} is not valid JSON") from None
    return meta, state


def _check_tensors(path: Path, meta: dict[str, Any], expected: dict[str, torch.Tensor],
                   found: dict[str, torch.Tensor]) -> None:
    """One-line errors for a missing, unexpected or misshapen tensor (load_state_dict would print a page)."""
    what = f"a {meta['backbone']} backbone (width {meta.get('width') or 64})"
    missing = [key for key in expected if key not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise IdaaError(f"'{path}' lacks the tensor '{missing[0]}'{more} of {what}")
    extra = [key for key in found if key not in expected]
    if extra:
        raise IdaaError(f"'{path}' has a tensor '{extra[0]}' that {what} does not have")
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise IdaaError(f"'{path}': tensor '{key}' has shape {tuple(found[key].shape)}, {what} needs "
                            f"{tuple(tensor.shape)}")


def preprocess(images: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) N x C x H x W images -> the backbone's input: resized, then normalised."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    size = int(meta["image_size"])
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(meta["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
