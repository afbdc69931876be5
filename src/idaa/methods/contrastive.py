"""Contrastive methods sharing one skeleton: a projector, a pair loss, the anchored attack (SPEC 1, 2).

Plain (InfoNCE, Eq. 1), UEL (Ye et al. 2019), Debiased (Chuang et al. 2020) and HCL (Robinson et al. 2020);
SimCLR lives in simclr.py on the same base. Each differs only in its head, temperature and `pair_loss`.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from idaa.adversaries.base import LossFn
from idaa.errors import IdaaError
from idaa.losses import anchored_info_nce, debiased_nce, hcl_loss, info_nce, uel_batch_criterion
from idaa.methods.base import Method, State, check_attack_mode, check_positive
from idaa.nets.heads import MLPHead
from idaa.nets.resnet import Backbone


class ContrastiveMethod(Method):
    """Two views through backbone + projector, a pair loss; the attack maximises the anchored InfoNCE.

    `attack_loss="anchored"` (the paper's equation after Eq. 9: clean anchors detached, candidates from x~) or
    `"symmetric"` (the method's own pair loss between the detached clean embeddings and x~'s).
    """

    default_temperature = 0.5
    batch_state_keys = ("z1",)

    def __init__(self, backbone: Backbone, projector: nn.Module, temperature: float | None = None,
                 attack_loss: str = "anchored") -> None:
        super().__init__(backbone)
        self.projector = projector
        self.temperature = check_positive("temperature", temperature or self.default_temperature, self.name)
        self.attack_mode = check_attack_mode(attack_loss, ("anchored", "symmetric"), self.name)

    @abstractmethod
    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The method's loss between two batches of embeddings (row i of each is the same image)."""

    def embed(self, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
        return self.projector(self.backbone(x, adv=adv))

    def clean_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, State]:
        z1, z2 = self.embed(v1), self.embed(v2)
        return self.pair_loss(z1, z2), {"z1": z1}

    def attack_loss(self, state: State) -> LossFn:
        anchors = state["z1"].detach()
        if self.attack_mode == "symmetric":
            return lambda x: self.pair_loss(anchors, self.embed(x, adv=True))
        return lambda x: anchored_info_nce(anchors, self.embed(x, adv=True), self.temperature)

    def clean_attack_value(self, state: State) -> torch.Tensor:
        z1 = state["z1"]
        if self.attack_mode == "symmetric":
            return self.pair_loss(z1.detach(), z1)
        return anchored_info_nce(z1.detach(), z1, self.temperature)

    def adversarial_loss(self, state: State, x_adv: torch.Tensor) -> torch.Tensor:
        return self.pair_loss(state["z1"], self.embed(x_adv, adv=True))


class _LinearHeadMethod(ContrastiveMethod):
    """CLAE's setting for Plain and UEL: a linear head to 128 dimensions, tau 0.1, CLAE views."""

    view_policy = "clae"
    default_temperature = 0.1

    def __init__(self, backbone: Backbone, temperature: float | None = None, attack_loss: str = "anchored",
                 proj_dim: int = 128) -> None:
        super().__init__(backbone, nn.Linear(backbone.out_dim, proj_dim), temperature, attack_loss)


class Plain(_LinearHeadMethod):
    """CLAE's Plain: one-directional InfoNCE (Eq. 1) on L2-normalised linear embeddings, tau 0.1."""

    name = "plain"

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return info_nce(z1, z2, self.temperature)


class UEL(_LinearHeadMethod):
    """Unsupervised embedding learning (Ye et al. 2019): the batch criterion on linear embeddings, tau 0.1."""

    name = "uel"

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return uel_batch_criterion(z1, z2, self.temperature)


class Debiased(ContrastiveMethod):
    """Debiased contrastive learning (Chuang et al. 2020): tau 0.5, tau+ 0.1, projector 512-128."""

    name = "debiased"

    def __init__(self, backbone: Backbone, temperature: float | None = None, attack_loss: str = "anchored",
                 tau_plus: float = 0.1, proj_hidden: int = 512, proj_dim: int = 128) -> None:
        super().__init__(backbone, MLPHead([backbone.out_dim, proj_hidden, proj_dim]), temperature, attack_loss)
        if not 0 <= tau_plus < 1:
            raise IdaaError(f"{self.name} option tau_plus must be in [0, 1), got {tau_plus}")
        self.tau_plus = tau_plus

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return debiased_nce(z1, z2, self.temperature, self.tau_plus)


class HCL(Debiased):
    """Hard-negative contrastive learning (Robinson et al. 2020): Debiased plus negatives reweighted by beta."""

    name = "hcl"

    def __init__(self, backbone: Backbone, temperature: float | None = None, attack_loss: str = "anchored",
                 tau_plus: float = 0.1, beta: float = 1.0, proj_hidden: int = 512, proj_dim: int = 128) -> None:
        super().__init__(backbone, temperature, attack_loss, tau_plus, proj_hidden, proj_dim)
        if beta < 0:
            raise IdaaError(f"hcl option beta must be >= 0, got {beta}")
        self.beta = beta

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return hcl_loss(z1, z2, self.temperature, self.tau_plus, self.beta)
