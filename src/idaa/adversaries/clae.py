"""CLAE (Ho & Vasconcelos 2020): the same signed-gradient step, taken on the pixels of the view."""

from __future__ import annotations

import torch

from idaa.adversaries.base import Adversary, LossFn, SignedGradientAttack, ascent_direction
from idaa.errors import IdaaError


class PixelAdversary(Adversary):
    """x' = x + delta with delta = eps * sign(grad_x loss_fn) (FGSM), or PGD in the eps-ball."""

    name = "clae"
    uses_gradient = True

    def __init__(self, eps: float = 0.03, steps: int = 1, step_size: float | None = None, norm: str = "linf",
                 random_start: bool = False) -> None:
        self.attack = SignedGradientAttack(eps, steps, step_size, norm, random_start, name="CLAE")

    @property
    def eps(self) -> float:
        return self.attack.eps

    @torch.no_grad()
    def perturb_from_gradient(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.attack.steps != 1 or self.attack.random_start:
            raise IdaaError("--attack-graph clean supports FGSM only (one step, no random start)")
        return x.detach() + self.attack.step_size * ascent_direction(grad, self.attack.norm)

    def perturb(self, x: torch.Tensor, loss_fn: LossFn, source: torch.Tensor | None = None) -> torch.Tensor:
        x = x.detach()
        delta = self.attack.run(x, loss_fn, lambda d: x + d)
        return x + delta


CLAE = PixelAdversary
