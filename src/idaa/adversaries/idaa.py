"""IDAA: an adversarial step in the latent space of a frozen VAE, keeping the identity residual (Eq. 6-8)."""

from __future__ import annotations

import torch

from idaa.adversaries.base import Adversary, LossFn, SignedGradientAttack, ascent_direction, check_eps
from idaa.errors import IdaaError
from idaa.nets.vae import VAE


class IdentityDisentangledAdversary(Adversary):
    """x' = R(x) + D(mu(x) + delta), R(x) = x - D(mu(x)); delta from FGSM (default) or PGD on loss_fn.

    `decompose=False` is the `idaa-nodecomp` ablation (paper C.4): x' = D(mu + delta), residual dropped.
    """

    name = "idaa"

    @property
    def uses_gradient(self) -> bool:  # type: ignore[override]
        return self.decompose_residual  # without R, x~(0) = G(x) is not x: no clean graph to reuse

    def __init__(self, vae: VAE, eps: float = 0.15, steps: int = 1, step_size: float | None = None,
                 norm: str = "linf", random_start: bool = False, decompose: bool = True) -> None:
        if not isinstance(vae, VAE):
            raise IdaaError(f"IDAA needs an idaa VAE, got {type(vae).__name__}")
        self.vae = vae.freeze()
        self.attack = SignedGradientAttack(eps, steps, step_size, norm, random_start, name="IDAA")
        self.decompose_residual = bool(decompose)
        if not decompose:
            self.name = "idaa-nodecomp"

    @property
    def eps(self) -> float:
        return self.attack.eps

    def to(self, device: torch.device | str) -> IdentityDisentangledAdversary:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def decompose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, R): the VAE reconstruction G(x) = D(mu(x)) and the identity residual R(x) = x - G(x)."""
        generated = self.vae.decode(self.vae.encode_mean(x))
        return generated, x - generated

    def perturb(self, x: torch.Tensor, loss_fn: LossFn, source: torch.Tensor | None = None) -> torch.Tensor:
        return self.attack_latent(x, loss_fn)[0]

    def perturb_from_gradient(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """FGSM from g = d loss / d x~ at delta = 0, where x~ = x: d loss / d delta = J_D(mu)^T g (one decoder VJP)."""
        if self.attack.steps != 1 or self.attack.random_start or not self.decompose_residual:
            raise IdaaError("--attack-graph clean supports FGSM IDAA only (one step, no random start, with R)")
        with torch.no_grad():
            mu = self.vae.encode_mean(x.detach())
        delta = torch.zeros_like(mu, requires_grad=True)
        with torch.enable_grad():
            generated = self.vae.decode(mu + delta)
            (latent_grad,) = torch.autograd.grad(generated, delta, grad_outputs=grad.to(generated.dtype))
        with torch.no_grad():
            step = self.attack.step_size * ascent_direction(latent_grad, self.attack.norm)
            return (x.detach() - generated.detach() + self.vae.decode(mu + step)).to(x.dtype)

    def attack_latent(self, x: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        """(x', delta): the adversarial view and the latent perturbation that made it."""
        with torch.no_grad():
            mu = self.vae.encode_mean(x.detach())
            residual = x.detach() - self.vae.decode(mu) if self.decompose_residual else torch.zeros_like(x)

        def build(delta: torch.Tensor) -> torch.Tensor:
            return residual + self.vae.decode(mu + delta)  # x~(delta), Eq. 7

        delta = self.attack.run(mu, loss_fn, build)
        with torch.no_grad():
            return build(delta), delta


IDAA = IdentityDisentangledAdversary


class LatentNoise(Adversary):
    """Ablation: a random-sign latent step of size eps with no gradient (isolates the adversarial direction)."""

    name = "latent-noise"

    def __init__(self, vae: VAE, eps: float = 0.15) -> None:
        self.vae = vae.freeze()
        self.eps = check_eps(eps, "latent-noise")

    def to(self, device: torch.device | str) -> LatentNoise:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, loss_fn: LossFn, source: torch.Tensor | None = None) -> torch.Tensor:
        mu = self.vae.encode_mean(x)
        residual = x - self.vae.decode(mu)
        sign = torch.randint(0, 2, mu.shape, device=mu.device).to(mu.dtype) * 2 - 1
        return residual + self.vae.decode(mu + self.eps * sign)
