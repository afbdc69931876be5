"""`idaa export --format detectron2`: a ResNet backbone under detectron2's parameter names (paper Table 5).

detectron2's ResNet names its modules ``stem.conv1`` and ``res2`` .. ``res5`` (one per stage), each block
``resS.B`` with ``conv1``..``conv3`` (two for BasicBlocks) and an optional projection ``shortcut``; every conv
carries its norm as ``<conv>.norm`` (weight, bias, running_mean, running_var). The file is the pickle its
checkpointer reads for model-zoo weights: ``{"model": {name: numpy array}, "__author__": ...,
"matching_heuristics": True}``; the heuristics map ``res5.*`` onto ``roi_heads.res5.*`` in the C4 models. The
export metadata and the config keys the weights need travel in the same pickle under ``"idaa"`` (detectron2's
checkpointer hands unknown keys back unused).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from idaa.errors import IdaaError
from idaa.nets.dual_bn import DualBatchNorm2d
from idaa.nets.resnet import Backbone, Bottleneck, ResNet

AUTHOR = "idaa"
NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


def detectron2_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """detectron2 parameter name -> tensor for the stem and res2..res5 (main BN of a dual-BN net)."""
    if not isinstance(backbone, ResNet):
        raise IdaaError(f"--format detectron2 converts the ResNet backbones (resnet18/50/101, -cifar too); "
                        f"{type(backbone).__name__} has no detectron2 counterpart (its blocks are pre-activation)")
    state: dict[str, torch.Tensor] = {}
    stem_conv, stem_bn = backbone.stem[0], backbone.stem[1]
    _add(state, "stem.conv1", stem_conv, stem_bn)
    width = stem_conv.out_channels
    blocks_seen: dict[int, int] = {}
    for block in backbone.layers:
        stage = 2 + round(math.log2(block.conv1.out_channels / width))  # stage i has width * 2^i planes
        index = blocks_seen.get(stage, 0)
        blocks_seen[stage] = index + 1
        convs = 3 if isinstance(block, Bottleneck) else 2
        for i in range(1, convs + 1):
            _add(state, f"res{stage}.{index}.conv{i}", getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
        if isinstance(block.shortcut, nn.Sequential):
            _add(state, f"res{stage}.{index}.shortcut", block.shortcut[0], block.shortcut[1])
    return state


def detectron2_config(backbone: Backbone, meta: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(config key -> value that detectron2 needs for these weights, notes on what will not load as is)."""
    state = detectron2_state(backbone)
    blocks = [sum(1 for key in state if key.startswith(f"res{s}.") and key.endswith(".conv1.weight"))
              for s in range(2, 6)]
    bottleneck = any(key.endswith(".conv3.weight") for key in state)
    depth = sum(blocks) * (3 if bottleneck else 2) + 2
    width = state["stem.conv1.weight"].shape[0]
    config: dict[str, Any] = {
        "MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.STEM_OUT_CHANNELS": width,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": width * (4 if bottleneck else 1), "MODEL.RESNETS.NUM_GROUPS": 1,
        "MODEL.RESNETS.WIDTH_PER_GROUP": width, "MODEL.RESNETS.STRIDE_IN_1X1": False,  # stride in the 3x3 conv
        "MODEL.PIXEL_MEAN": [round(255 * m, 3) for m in meta["mean"]],
        "MODEL.PIXEL_STD": [round(255 * s, 3) for s in meta["std"]], "INPUT.FORMAT": "RGB"}
    notes = []
    if state["stem.conv1.weight"].shape[-1] != 7:
        notes.append("the CIFAR stem (3x3 conv, stride 1, no max-pool) does not fit detectron2's 7x7 BasicStem: "
                     "detectron2 skips stem.conv1 (shape mismatch) and trains it from scratch; res2-res5 load")
    if not bottleneck:
        notes.append(f"ResNet-{depth} has BasicBlocks: detectron2 builds them only with RES2_OUT_CHANNELS 64 "
                     "(width 64) and only in FPN models (the C4 head's res5 is a bottleneck stage)")
    if meta.get("in_channels", 3) != 3:
        notes.append(f"the backbone takes {meta['in_channels']}-channel images, detectron2's stem 3")
    return config, notes


def detectron2_checkpoint(backbone: Backbone, meta: dict[str, Any]) -> dict[str, Any]:
    """The pickle's content: numpy weights under detectron2's names, the author tag and the heuristics flag."""
    config, notes = detectron2_config(backbone, meta)
    model = {key: value.detach().cpu().numpy() for key, value in detectron2_state(backbone).items()}
    return {"model": model, "__author__": AUTHOR, "matching_heuristics": True,
            "idaa": {**meta, "detectron2_config": config, "detectron2_notes": notes}}


def _add(state: dict[str, torch.Tensor], name: str, conv: nn.Conv2d, norm: nn.Module) -> None:
    """One detectron2 `Conv2d` with its norm: `<name>.weight` and `<name>.norm.<field>`."""
    bn = norm.main if isinstance(norm, DualBatchNorm2d) else norm
    state[f"{name}.weight"] = conv.weight
    for field in NORM_FIELDS:
        state[f"{name}.norm.{field}"] = getattr(bn, field)
