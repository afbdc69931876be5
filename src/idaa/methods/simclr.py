"""SimCLR (Chen et al. 2020): NT-Xent between two views, projector 512-512-64, tau 0.5."""

from __future__ import annotations

import torch

from idaa.losses import nt_xent
from idaa.methods.contrastive import ContrastiveMethod
from idaa.nets.heads import MLPHead
from idaa.nets.resnet import Backbone


class SimCLR(ContrastiveMethod):
    """SimCLR with the paper's anchored attack loss (default) or the symmetric NT-Xent the authors' code uses."""

    name = "simclr"
    view_policy = "simclr"
    default_temperature = 0.5

    def __init__(self, backbone: Backbone, temperature: float | None = None, proj_hidden: int = 512,
                 proj_dim: int = 64, attack_loss: str = "anchored") -> None:
        super().__init__(backbone, MLPHead([backbone.out_dim, proj_hidden, proj_dim]), temperature, attack_loss)

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature)
