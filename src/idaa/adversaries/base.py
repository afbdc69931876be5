"""The adversary contract: `perturb(x, loss_fn) -> x'`, a batch augmenter called inside a training step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from idaa.errors import IdaaError

LossFn = Callable[[torch.Tensor], torch.Tensor]


class Adversary(ABC):
    """Makes a harder view of a batch by maximising `loss_fn`; knows nothing about methods or models.

    Implementations take input gradients only (`torch.autograd.grad`), so no `.grad` is ever written to a
    parameter, and return tensors without graph history.
    """

    name: str = "adversary"
    uses_gradient: bool = False  # True for adversaries that can also start from a given input gradient

    def perturb_from_gradient(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """x' from d loss / d x at x, already computed elsewhere (FGSM only); see Method.forward."""
        raise IdaaError(f"the {self.name} adversary cannot attack from a given gradient")

    @abstractmethod
    def perturb(self, x: torch.Tensor, loss_fn: LossFn, source: torch.Tensor | None = None) -> torch.Tensor:
        """Return x' for the views `x` (N x C x H x W, normalised). `source` is the uint8 batch x came from."""

    def to(self, device: torch.device | str) -> Adversary:
        """Move any networks the adversary owns; the pixel-space ones own none."""
        return self


def check_eps(eps: float, name: str) -> float:
    """Validate a perturbation budget: finite and non-negative."""
    eps = float(eps)
    if not eps >= 0 or eps == float("inf"):
        raise IdaaError(f"{name} eps must be a finite number >= 0, got {eps}")
    return eps


def input_gradient(loss_fn: LossFn, point: torch.Tensor, build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """d loss_fn(build(point)) / d point, computing no parameter gradients (autograd prunes those branches)."""
    point = point.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(build(point))
        if loss.ndim != 0:
            raise IdaaError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss, point)
    return grad


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent unit step for one norm ball: sign(g) for L-inf, g / ||g||_2 per sample for L2."""
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / flat.view(-1, *([1] * (grad.ndim - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project each sample's perturbation back into its eps-ball."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = torch.clamp(eps / n, max=1.0)
    return delta * scale.view(-1, *([1] * (delta.ndim - 1)))


def random_start(like: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random point in the eps-ball (L-inf: per coordinate; L2: uniform in the ball)."""
    if norm == "linf":
        return (torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype) * 2 - 1) * eps
    d = like[0].numel()
    direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (like.ndim - 1)))
    radius = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=like.dtype) ** (1.0 / d)
    return direction * (eps * radius).view(-1, *([1] * (like.ndim - 1)))


class SignedGradientAttack:
    """FGSM (one step of size eps from 0) or PGD (k steps, projection) on a perturbation of some point."""

    def __init__(self, eps: float, steps: int = 1, step_size: float | None = None, norm: str = "linf",
                 random_start: bool = False, name: str = "attack") -> None:
        self.eps = check_eps(eps, name)
        if int(steps) < 1:
            raise IdaaError(f"{name} steps must be >= 1, got {steps}")
        if norm not in ("linf", "l2"):
            raise IdaaError(f"{name} norm must be 'linf' or 'l2', got {norm!r}")
        self.steps, self.norm, self.random_start = int(steps), norm, bool(random_start)
        default_step = self.eps if self.steps == 1 else 2.5 * self.eps / self.steps  # Madry et al.'s rule
        self.step_size = float(step_size) if step_size is not None else default_step
        if not self.step_size > 0 and self.eps > 0:
            raise IdaaError(f"{name} step size must be > 0, got {step_size}")

    def run(self, like: torch.Tensor, loss_fn: LossFn, build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The final perturbation (detached) maximising loss_fn(build(delta)) within the eps-ball."""
        delta = random_start(like, self.eps, self.norm) if self.random_start else torch.zeros_like(like)
        if self.eps == 0:
            return delta
        for _ in range(self.steps):
            grad = input_gradient(loss_fn, delta, build)
            delta = project(delta + self.step_size * ascent_direction(grad, self.norm), self.eps, self.norm)
        return delta.detach()
