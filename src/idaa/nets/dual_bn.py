"""Dual batch norm (AdvProp, Xie et al. 2020): clean and adversarial inputs keep separate statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class DualBatchNorm2d(nn.Module):
    """A BatchNorm2d with an adversarial twin; `use_adv` picks which one normalises the next input."""

    def __init__(self, num_features: int, adv_momentum: float = 0.01) -> None:
        super().__init__()
        self.main = nn.BatchNorm2d(num_features)
        self.adv = nn.BatchNorm2d(num_features, momentum=adv_momentum)
        self.use_adv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adv(x) if self.use_adv else self.main(x)


@contextmanager
def adversarial_bn(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Route every DualBatchNorm2d inside `module` through its adversarial twin for the duration."""
    duals = [m for m in module.modules() if isinstance(m, DualBatchNorm2d)]
    previous = [m.use_adv for m in duals]
    for m in duals:
        m.use_adv = enabled
    try:
        yield
    finally:
        for m, flag in zip(duals, previous, strict=True):
            m.use_adv = flag
