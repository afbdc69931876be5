"""SimCLR (Chen et al. 2020): NT-Xent between two views, projector 512-512-64, tau 0.5."""

from __future__ import annotations

import torch

from idaa.adversaries.base import LossFn
from idaa.errors import IdaaError
from idaa.losses import anchored_info_nce, nt_xent
from idaa.methods.base import Method, State
from idaa.nets.heads import MLPHead
from idaa.nets.resnet import Backbone


class SimCLR(Method):
    """SimCLR with the paper's anchored attack loss (default) or the symmetric NT-Xent the authors' code uses."""

    name = "simclr"
    view_policy = "simclr"

    def __init__(self, backbone: Backbone, temperature: float = 0.5, proj_hidden: int = 512, proj_dim: int = 64,
                 attack_loss: str = "anchored") -> None:
        super().__init__(backbone)
        if attack_loss not in ("anchored", "symmetric"):
            raise IdaaError(f"--attack-loss must be 'anchored' or 'symmetric', got {attack_loss!r}")
        if not temperature > 0:
            raise IdaaError(f"SimCLR temperature must be > 0, got {temperature}")
        self.projector = MLPHead([backbone.out_dim, proj_hidden, proj_dim])
        self.temperature = temperature
        self.attack_mode = attack_loss

    def embed(self, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
        return self.projector(self.backbone(x, adv=adv))

    def clean_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, State]:
        z1, z2 = self.embed(v1), self.embed(v2)
        return nt_xent(z1, z2, self.temperature), {"z1": z1}

    def attack_loss(self, state: State) -> LossFn:
        anchors = state["z1"].detach()
        if self.attack_mode == "symmetric":
            return lambda x: nt_xent(anchors, self.embed(x, adv=True), self.temperature)
        return lambda x: anchored_info_nce(anchors, self.embed(x, adv=True), self.temperature)

    def adversarial_loss(self, state: State, x_adv: torch.Tensor) -> torch.Tensor:
        return nt_xent(state["z1"], self.embed(x_adv, adv=True), self.temperature)
