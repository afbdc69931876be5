"""What every method supplies to the one training loop: a clean loss, an attack loss and an adversarial term."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from idaa.adversaries.base import LossFn
from idaa.errors import IdaaError
from idaa.nets.resnet import Backbone

State = dict[str, Any]


class Method(nn.Module, ABC):
    """A self-supervised method around a dual-BN backbone.

    `clean_loss(v1, v2)` returns the method's loss on two views plus a state (e.g. the clean embeddings) that
    `attack_loss(state)` and `adversarial_loss(state, x_adv)` reuse, so no clean forward is ever recomputed.
    Adversarial inputs always go through the backbone's adversarial BN. `after_step(progress)` runs after each
    optimiser step (momentum encoders, queues), with progress in [0, 1] over the whole run.
    """

    name: str = "method"
    view_policy: str = "simclr"
    batch_state_keys: tuple[str, ...] = ()  # state entries with one row per sample (sliced by attack_fraction)

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.attack_graph = "separate"  # "clean": the attack's gradient from v1's own graph; "shared": from the
        # clean loss's own backward (see idaa.train.step.shared_backward)
        self.adversarial_anchor = "live"  # "detached": L(v1, x') trains through x' only (no second v1 backward)
        self.attack_fraction = 1.0  # attack (and add x' for) only the first fraction of the batch

    @abstractmethod
    def clean_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, State]:
        """The method's own loss on two random views."""

    @abstractmethod
    def attack_loss(self, state: State) -> LossFn:
        """The function of x~ that the adversary maximises (anchors taken from the clean pass, detached)."""

    @abstractmethod
    def adversarial_loss(self, state: State, x_adv: torch.Tensor) -> torch.Tensor:
        """L(v1, x'): the method's loss between the clean view and the adversarial view."""

    def forward(self, v1: torch.Tensor, v2: torch.Tensor | None, adversary: Any = None,
                source: torch.Tensor | None = None, alpha: float = 1.0, part: str = "step",
                state: State | None = None, grad: torch.Tensor | None = None) -> Any:
        """One step's losses (total, clean, adversarial, x'): L(v1, v2) + alpha * L(v1, x'), x' made from v1.

        Everything happens inside `forward` so that DistributedDataParallel sees the whole step. The attack
        reuses the clean pass's state (no anchor is recomputed) and takes input gradients only. With
        `attack_graph="clean"` the attack needs no forward of its own: at delta = 0, x~ equals v1 exactly
        (R + G = x), so its input gradient comes from v1's clean graph (main BN instead of the adversarial one).
        `attack_graph="shared"` splits the step in two calls (see `idaa.train.step.shared_backward`):
        `part="clean"` returns (L(v1, v2), state); `part="adversarial"` takes that state and dL/dv1 (`grad`)
        and returns (L(v1, x'), x').
        """
        if part == "clean":
            return self.clean_loss(v1, v2)
        if part == "adversarial":
            return self._adversarial_part(v1, adversary, state, grad)
        clean_graph = adversary is not None and self.attack_graph == "clean" and adversary.uses_gradient
        if clean_graph:
            v1 = v1.detach().requires_grad_(True)
        clean, state = self.clean_loss(v1, v2)
        if adversary is None:
            return clean, clean, None, None
        m = self.attacked_rows(len(v1))
        part = state if m == len(v1) else self.subset_state(state, m)
        if clean_graph:
            (grad,) = torch.autograd.grad(self.clean_attack_value(state), v1, retain_graph=True)
            x_adv = adversary.perturb_from_gradient(v1.detach()[:m], grad[:m])
        else:
            x_adv = adversary.perturb(v1.detach()[:m], self.attack_loss(part),
                                      source=None if source is None else source[:m])
        adversarial = self.adversarial_loss(self.anchored(part), x_adv)
        return clean + alpha * adversarial, clean, adversarial, x_adv

    def _adversarial_part(self, v1: torch.Tensor, adversary: Any, state: State | None,
                          grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """L(v1, x') with x' from the clean loss's own input gradient (the second half of a shared step)."""
        if state is None or grad is None:
            raise IdaaError("the adversarial part of a shared-graph step needs the clean state and dL/dv1")
        m = self.attacked_rows(len(v1))
        part = state if m == len(v1) else self.subset_state(state, m)
        x_adv = adversary.perturb_from_gradient(v1.detach()[:m], grad[:m])
        return self.adversarial_loss(self.anchored(part), x_adv), x_adv

    def attacked_rows(self, n: int) -> int:
        """How many rows of an n-row batch the attack perturbs (`attack_fraction`)."""
        return n if self.attack_fraction >= 1 else max(1, round(self.attack_fraction * n))

    def anchored(self, state: State) -> State:
        """The clean state L(v1, x') sees: as is, or detached (`adversarial_anchor="detached"`: through x' only)."""
        if self.adversarial_anchor != "detached":
            return state
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def subset_state(self, state: State, m: int) -> State:
        """The state of the first m samples (for `attack_fraction`)."""
        return {k: v[:m] if k in self.batch_state_keys else v for k, v in state.items()}

    def clean_attack_value(self, state: State) -> torch.Tensor:
        """The attack loss at delta = 0 computed from the clean pass's own (non-detached) outputs."""
        raise IdaaError(f"--attack-graph clean is not available for {self.name}")

    def after_step(self, progress: float) -> None:
        """Hook after each optimiser step; methods with momentum encoders or queues update them here."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameters for the optimiser: everything trainable (momentum targets are frozen copies)."""
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


def check_attack_mode(mode: str, allowed: tuple[str, ...], method: str) -> str:
    if mode not in allowed:
        raise IdaaError(f"--attack-loss {mode!r} is not available for {method}; choose from {', '.join(allowed)}")
    return mode


def check_positive(name: str, value: float, method: str) -> float:
    if not isinstance(value, int | float) or not value > 0:
        raise IdaaError(f"{method} option {name} must be > 0, got {value!r}")
    return float(value)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A parameter-frozen deep copy: the starting point of a momentum (EMA) encoder."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: tau rises from `base` to 1 along a half cosine over training."""
    import math

    return 1 - (1 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2
