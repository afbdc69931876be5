"""The IDAA term for a training step you own: L = L(v1, v2) + alpha * L(v1, x'), x' = adversary.perturb(v1, ...).

Framework-free (plain PyTorch); `idaa.integrations.lightning` wraps it for a LightningModule. The user gives
a `model` (views -> embeddings, e.g. backbone + projector) and a `criterion(z1, z2)` (its SSL loss on two
batches of embeddings). Only x~ and x' go through the adversarial BN of dual-BN layers (AdvProp, SPEC 1);
the clean anchors z1 come from the clean pass and are never recomputed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from idaa.adversaries.base import Adversary, LossFn
from idaa.errors import IdaaError
from idaa.losses import anchored_info_nce
from idaa.nets.dual_bn import DualBatchNorm2d, adversarial_bn
from idaa.nets.resnet import Backbone

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ATTACK_LOSSES = ("symmetric", "anchored")


@dataclass
class TermLosses:
    """One step's losses: total = clean + alpha * adversarial; `x_adv` is the adversarial view x'."""

    total: torch.Tensor
    clean: torch.Tensor
    adversarial: torch.Tensor
    x_adv: torch.Tensor


class AdversarialTerm:
    """Adds alpha * L(v1, x') to a user's loss; the adversary only ever sees a function of images.

    `attack_loss="symmetric"` (default, any criterion): the adversary maximises criterion(z1, model(x~)) with
    z1 detached, as the authors' code does. `"anchored"`: the paper's anchored InfoNCE (the equation after
    Eq. 9) at `temperature`, for contrastive criteria.
    """

    def __init__(self, adversary: Adversary, alpha: float = 1.0, attack_loss: str = "symmetric",
                 temperature: float = 0.5) -> None:
        if not isinstance(adversary, Adversary):
            raise IdaaError(f"the IDAA term needs an idaa Adversary (e.g. idaa.IDAA(vae)), got "
                            f"{type(adversary).__name__}")
        if attack_loss not in ATTACK_LOSSES:
            raise IdaaError(f"attack_loss must be one of {', '.join(ATTACK_LOSSES)}, got {attack_loss!r}")
        if not alpha >= 0 or not temperature > 0:
            raise IdaaError(f"alpha must be >= 0 and temperature > 0, got alpha={alpha}, temperature={temperature}")
        self.adversary, self.alpha = adversary, float(alpha)
        self.attack_loss, self.temperature = attack_loss, float(temperature)
        self._device: torch.device | None = None
        self._warned = False

    def __call__(self, model: nn.Module, criterion: Criterion, v1: torch.Tensor, v2: torch.Tensor,
                 source: torch.Tensor | None = None) -> TermLosses:
        """Clean loss, x' from v1 against the clean anchors, then the 3-view objective."""
        self._follow(v1.device)
        self._check_dual_bn(model)
        z1 = model(v1)
        clean = criterion(z1, model(v2))
        x_adv = self.adversary.perturb(v1.detach(), self.attack_fn(model, criterion, z1.detach()), source=source)
        with adversarial_mode(model):
            adversarial = criterion(z1, model(x_adv))
        return TermLosses(clean + self.alpha * adversarial, clean, adversarial, x_adv)

    def attack_fn(self, model: nn.Module, criterion: Criterion, anchors: torch.Tensor) -> LossFn:
        """The function of x~ that the adversary maximises; x~ passes through the adversarial BN."""

        def loss(x: torch.Tensor) -> torch.Tensor:
            with adversarial_mode(model):
                candidates = model(x)
            if self.attack_loss == "anchored":
                return anchored_info_nce(anchors, candidates, self.temperature)
            return criterion(anchors, candidates)

        return loss

    def _follow(self, device: torch.device) -> None:
        """Keep the adversary's networks (the frozen VAE) on the batch's device; they are not model parameters."""
        if device != self._device:
            self.adversary.to(device)
            self._device = device

    def _check_dual_bn(self, model: nn.Module) -> None:
        if self._warned or any(isinstance(m, DualBatchNorm2d) for m in model.modules()):
            return
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            warnings.warn("the model has no dual BN, so x' shares the clean BN statistics; call "
                          "idaa.integrations.convert_to_dual_bn(model) before making the optimiser for the paper's "
                          "separate adversarial BN", stacklevel=3)
        self._warned = True


@contextmanager
def adversarial_mode(model: nn.Module) -> Iterator[None]:
    """Inside: every dual BN of `model` normalises with its adversarial twin, idaa backbones included."""
    hooks = [m.register_forward_pre_hook(_adversarial_kwarg, with_kwargs=True)
             for m in model.modules() if isinstance(m, Backbone)]  # Backbone.forward sets its BNs from `adv`
    try:
        with adversarial_bn(model):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def convert_to_dual_bn(module: nn.Module, adv_momentum: float = 0.01) -> nn.Module:
    """Give every BatchNorm2d of `module` an adversarial twin (in place; returns `module`).

    The original layer becomes the main BN (same parameters, so an optimiser made earlier still holds them,
    but it will not hold the twins: convert first); the twin starts as a copy with AdvProp's momentum 0.01.
    """
    for parent in list(module.modules()):
        if isinstance(parent, DualBatchNorm2d):
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                dual = DualBatchNorm2d(child.num_features, adv_momentum)
                dual.main, dual.adv = child, copy.deepcopy(child)
                dual.adv.momentum = adv_momentum
                setattr(parent, name, dual)
    return module


def _adversarial_kwarg(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict]:
    return args, {**kwargs, "adv": True}
