"""Projection and prediction heads, declared as a list of layer widths."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLPHead(nn.Sequential):
    """Linear-BN-ReLU blocks between `dims[0]` and `dims[-1]`; e.g. SimCLR's projector is (512, 512, 64).

    `last_bn` adds a BatchNorm (no affine) after the output layer, as SimSiam's projector does; `bn=False` gives
    Linear-ReLU blocks (MoCo v2's head).
    """

    def __init__(self, dims: Sequence[int], last_bn: bool = False, bn: bool = True) -> None:
        if len(dims) < 2 or any(d < 1 for d in dims):
            raise ValueError(f"head dims must be at least two positive widths, got {list(dims)}")
        layers: list[nn.Module] = []
        for i in range(len(dims) - 2):
            if bn:
                layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1])]
            else:
                layers.append(nn.Linear(dims[i], dims[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(dims[-1], affine=False))
        super().__init__(*layers)
        self.in_dim, self.out_dim = dims[0], dims[-1]
