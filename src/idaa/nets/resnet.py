"""ResNets and WideResNets with dual batch norm: CIFAR stem (3x3, stride 1, no max-pool) and ImageNet stem."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

import torch
from torch import nn

from idaa.errors import IdaaError
from idaa.nets.dual_bn import DualBatchNorm2d


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class _Shortcut(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), DualBatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = DualBatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, cout)
        self.bn2 = DualBatchNorm2d(cout)
        self.shortcut = _Shortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = DualBatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = DualBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = DualBatchNorm2d(cout)
        self.shortcut = _Shortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class Backbone(nn.Module, ABC):
    """Feature extractor `f(x) -> N x out_dim`; `forward(x, adv=True)` normalises with the adversarial BNs."""

    out_dim: int

    def _collect_duals(self) -> None:
        self._duals = [m for m in self.modules() if isinstance(m, DualBatchNorm2d)]

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features with whichever BN branch is currently selected."""

    def forward(self, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
        for m in self._duals:
            m.use_adv = adv
        try:
            return self.features(x)
        finally:
            if adv:
                for m in self._duals:
                    m.use_adv = False


class ResNet(Backbone):
    """ResNet-18/50/101; `stem="cifar"` uses a 3x3 stride-1 conv without max-pool, `"imagenet"` 7x7/2 + pool."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], stem: str = "cifar",
                 width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(_conv3x3(in_channels, width), DualBatchNorm2d(width), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), DualBatchNorm2d(width),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        else:
            raise IdaaError(f"unknown ResNet stem {stem!r}; use 'cifar' or 'imagenet'")
        stages, cin = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            for j in range(blocks):
                stages.append(block(cin, planes, stride=2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin
        _init_weights(self)
        self._collect_duals()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(self.stem(x))), 1)


class _WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = DualBatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = DualBatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.nn.functional.leaky_relu(self.bn1(x), 0.1)
        out = self.conv1(pre)
        out = self.conv2(torch.nn.functional.leaky_relu(self.bn2(out), 0.1))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(Backbone):
    """WideResNet-depth-k as used by FixMatch (leaky ReLU 0.1, pre-activation blocks)."""

    def __init__(self, depth: int = 28, widen: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise IdaaError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = _conv3x3(in_channels, widths[0])
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(_WideBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = DualBatchNorm2d(cin)
        self.out_dim = cin
        _init_weights(self)
        self._collect_duals()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.leaky_relu(self.bn(self.blocks(self.conv(x))), 0.1)
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(out, 1), 1)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


_RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3]),
            "resnet101": (Bottleneck, [3, 4, 23, 3])}
BACKBONES = ("resnet18-cifar", "resnet50-cifar", "resnet18", "resnet50", "resnet101", "wrn28-<k>")


def build_backbone(name: str, width: int | None = None, in_channels: int = 3) -> Backbone:
    """Build a dual-BN backbone by name: resnet{18,50}-cifar, resnet{18,50,101} (ImageNet stem), wrn28-k.

    `width` sets the ResNet base width (64 by default; smaller widths give fast CPU protocols).
    """
    key = name.lower().replace("_", "-")
    wide = re.fullmatch(r"wrn-?(\d+)-(\d+)", key)
    if wide:
        return WideResNet(int(wide.group(1)), int(wide.group(2)), in_channels)
    arch, _, stem = key.partition("-")
    if arch in _RESNETS and stem in ("", "cifar", "imagenet"):
        stem = stem or "imagenet"  # a bare name is the torchvision-style ImageNet ResNet
        block, layers = _RESNETS[arch]
        return ResNet(block, layers, stem=stem, width=width or 64, in_channels=in_channels)
    raise IdaaError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
