"""One optimisation step for any method and adversary: L = L(v1, v2) + alpha * L(v1, x') (SPEC 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idaa.adversaries.base import Adversary
from idaa.methods.base import Method


@dataclass
class StepLosses:
    total: torch.Tensor
    clean: torch.Tensor
    adversarial: torch.Tensor | None
    x_adv: torch.Tensor | None = None  # the adversarial view, kept for the finiteness check


def compute_losses(method: Method, adversary: Adversary | None, v1: torch.Tensor, v2: torch.Tensor,
                   source: torch.Tensor | None = None, alpha: float = 1.0) -> StepLosses:
    """Clean loss, then (with an adversary) x' from v1 against the clean anchors, then the 3-view objective.

    The attack reuses the clean pass's state (no anchor is recomputed) and takes input gradients only.
    """
    clean, state = method.clean_loss(v1, v2)
    if adversary is None:
        return StepLosses(clean, clean, None)
    x_adv = adversary.perturb(v1, method.attack_loss(state), source=source)
    adversarial = method.adversarial_loss(state, x_adv)
    return StepLosses(clean + alpha * adversarial, clean, adversarial, x_adv)
