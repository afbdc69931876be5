"""One optimisation step for any method and adversary: L = L(v1, v2) + alpha * L(v1, x') (SPEC 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from idaa.adversaries.base import Adversary


@dataclass
class StepLosses:
    total: torch.Tensor
    clean: torch.Tensor
    adversarial: torch.Tensor | None
    x_adv: torch.Tensor | None = None  # the adversarial view, kept for the finiteness check


def compute_losses(method: nn.Module, adversary: Adversary | None, v1: torch.Tensor, v2: torch.Tensor,
                   source: torch.Tensor | None = None, alpha: float = 1.0) -> StepLosses:
    """Clean loss, then (with an adversary) x' from v1 against the clean anchors, then the 3-view objective.

    `method` is a Method or the DistributedDataParallel wrapping one; the work is `Method.forward`.
    """
    return StepLosses(*method(v1, v2, adversary, source, alpha))
