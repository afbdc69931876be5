"""Adversaries with the `perturb(x, loss_fn) -> x'` contract, and a factory by name."""

from __future__ import annotations

from collections.abc import Callable

import torch

from idaa.adversaries.base import Adversary, LossFn
from idaa.adversaries.clae import CLAE, PixelAdversary
from idaa.adversaries.idaa import IDAA, IdentityDisentangledAdversary, LatentNoise
from idaa.adversaries.random_view import RandomView
from idaa.errors import IdaaError
from idaa.nets.vae import VAE

ADVERSARIES = ("none", "idaa", "clae", "idaa-nodecomp", "latent-noise", "random-view")
VAE_ADVERSARIES = ("idaa", "idaa-nodecomp", "latent-noise")  # the ones that need a trained VAE (--vae)
_DEFAULT_EPS = {"idaa": 0.15, "idaa-nodecomp": 0.15, "latent-noise": 0.15, "clae": 0.03}


def build_adversary(name: str, *, vae: VAE | None = None, eps: float | None = None, steps: int = 1,
                    step_size: float | None = None, norm: str = "linf", random_start: bool = False,
                    view_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Adversary | None:
    """The adversary called `name` (None for 'none'); VAE-based ones need `vae`, random-view needs `view_fn`."""
    if name not in ADVERSARIES:
        raise IdaaError(f"unknown adversary {name!r}; choose from {', '.join(ADVERSARIES)}")
    if name == "none":
        return None
    eps = _DEFAULT_EPS.get(name, 0.0) if eps is None else eps
    if name == "clae":
        return CLAE(eps, steps, step_size, norm, random_start)
    if name == "random-view":
        if view_fn is None:
            raise IdaaError("random-view needs a view policy")
        return RandomView(view_fn)
    if vae is None:
        raise IdaaError(f"adversary '{name}' needs a trained VAE: pass --vae VAE.pt (make one with 'idaa vae train')")
    if name == "latent-noise":
        return LatentNoise(vae, eps)
    return IDAA(vae, eps, steps, step_size, norm, random_start, decompose=(name == "idaa"))


__all__ = ["ADVERSARIES", "CLAE", "IDAA", "Adversary", "IdentityDisentangledAdversary", "LatentNoise", "LossFn",
           "PixelAdversary", "RandomView", "VAE_ADVERSARIES", "build_adversary"]
