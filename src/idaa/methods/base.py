"""What every method supplies to the one training loop: a clean loss, an attack loss and an adversarial term."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from idaa.adversaries.base import LossFn
from idaa.nets.resnet import Backbone

State = dict[str, Any]


class Method(nn.Module, ABC):
    """A self-supervised method around a dual-BN backbone.

    `clean_loss(v1, v2)` returns the method's loss on two views plus a state (e.g. the clean embeddings) that
    `attack_loss(state)` and `adversarial_loss(state, x_adv)` reuse, so no clean forward is ever recomputed.
    Adversarial inputs always go through the backbone's adversarial BN.
    """

    name: str = "method"
    view_policy: str = "simclr"

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    @abstractmethod
    def clean_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, State]:
        """The method's own loss on two random views."""

    @abstractmethod
    def attack_loss(self, state: State) -> LossFn:
        """The function of x~ that the adversary maximises (anchors taken from the clean pass, detached)."""

    @abstractmethod
    def adversarial_loss(self, state: State, x_adv: torch.Tensor) -> torch.Tensor:
        """L(v1, x'): the method's loss between the clean view and the adversarial view."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameters for the optimiser (methods with frozen targets override this)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @torch.no_grad()
    def embed_for_eval(self, x: torch.Tensor, features: str = "backbone") -> torch.Tensor:
        """Features for kNN/linear evaluation: backbone output (default) or the projector's."""
        h = self.backbone(x)
        if features == "backbone":
            return h
        if features == "projector" and hasattr(self, "projector"):
            return self.projector(h)
        raise ValueError(f"unknown feature source {features!r} for {self.name}; use backbone or projector")
