"""SimSiam (Chen & He 2021): negative cosine between a predictor's output and the stop-gradient projection."""

from __future__ import annotations

import torch

from idaa.adversaries.base import LossFn
from idaa.errors import IdaaError
from idaa.losses import negative_cosine
from idaa.methods.base import Method, State, check_attack_mode
from idaa.nets.heads import MLPHead
from idaa.nets.resnet import Backbone


class SimSiam(Method):
    """Projector (2 layers for CIFAR, 3 for ImageNet, BN on the output) and a bottleneck predictor; no negatives.

    Attack (SPEC 1): maximise D(p(x~), stopgrad z(v1)), the negative cosine between the prediction for x~ and
    the clean view's projection, which the clean pass already computed.
    """

    name = "simsiam"
    view_policy = "simsiam"
    batch_state_keys = ("z1", "p1")

    def __init__(self, backbone: Backbone, temperature: float | None = None, attack_loss: str = "anchored",
                 proj_hidden: int = 2048, proj_dim: int = 2048, pred_hidden: int = 512, proj_layers: int = 2) -> None:
        super().__init__(backbone)
        check_attack_mode(attack_loss, ("anchored",), self.name)
        if proj_layers not in (2, 3):
            raise IdaaError(f"simsiam option proj_layers must be 2 (CIFAR) or 3 (ImageNet), got {proj_layers!r}")
        dims = [backbone.out_dim] + [proj_hidden] * (proj_layers - 1) + [proj_dim]
        self.projector = MLPHead(dims, last_bn=True)
        self.predictor = MLPHead([proj_dim, pred_hidden, proj_dim])

    def _zp(self, x: torch.Tensor, adv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(self.backbone(x, adv=adv))
        return z, self.predictor(z)

    def clean_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, State]:
        (z1, p1), (z2, p2) = self._zp(v1), self._zp(v2)
        return (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2, {"z1": z1, "p1": p1}

    def attack_loss(self, state: State) -> LossFn:
        target = state["z1"].detach()
        return lambda x: negative_cosine(self._zp(x, adv=True)[1], target)

    def clean_attack_value(self, state: State) -> torch.Tensor:
        return negative_cosine(state["p1"], state["z1"])  # the target is detached inside

    def adversarial_loss(self, state: State, x_adv: torch.Tensor) -> torch.Tensor:
        z, p = self._zp(x_adv, adv=True)
        return (negative_cosine(state["p1"], z) + negative_cosine(p, state["z1"])) / 2
