"""One optimisation step for any method and adversary: L = L(v1, v2) + alpha * L(v1, x') (SPEC 1)."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
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


def forward_backward(model: nn.Module, adversary: Adversary | None, v1: torch.Tensor, v2: torch.Tensor,
                     source: torch.Tensor | None = None, alpha: float = 1.0,
                     autocast: AbstractContextManager | None = None,
                     scaler: torch.amp.GradScaler | None = None) -> StepLosses:
    """The step's losses, with their gradients accumulated into the parameters (the caller zeroes them first).

    `attack_graph="shared"` runs two backwards (see `shared_backward`); every other mode one, of the total.
    """
    autocast = autocast or nullcontext()
    method = getattr(model, "module", model)
    if adversary is not None and method.attack_graph == "shared":
        return shared_backward(model, adversary, v1, v2, alpha, autocast, scaler)
    with autocast:
        losses = compute_losses(model, adversary, v1, v2, source=source, alpha=alpha)
    (losses.total if scaler is None else scaler.scale(losses.total)).backward()
    return losses


def shared_backward(model: nn.Module, adversary: Adversary, v1: torch.Tensor, v2: torch.Tensor, alpha: float,
                    autocast: AbstractContextManager, scaler: torch.amp.GradScaler | None) -> StepLosses:
    """`--attack-graph shared`: one backward of L(v1, v2) gives the parameter gradients and dL/dv1 at once.

    The attack's direction is the gradient of the method's own clean loss (not of the anchored attack loss),
    so no backward is spent on the attack alone. The backward of alpha * L(v1, x') then accumulates into the
    same gradients; with a live anchor it also runs back through v1's retained graph. Under DDP only this
    second backward synchronises gradients (the first runs under `no_sync`).
    """
    live = getattr(model, "module", model).adversarial_anchor != "detached"
    scaled = (lambda loss: loss) if scaler is None else scaler.scale
    v1 = v1.detach().requires_grad_(True)
    with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
        with autocast:
            clean, state = model(v1, v2, part="clean")
        scaled(clean).backward(retain_graph=live)
    grad = v1.grad if scaler is None or not scaler.is_enabled() else v1.grad / scaler.get_scale()
    with autocast:
        adversarial, x_adv = model(v1.detach(), None, adversary, part="adversarial", state=state, grad=grad)
    scaled(alpha * adversarial).backward()
    total = clean.detach() + alpha * adversarial.detach()
    return StepLosses(total, clean.detach(), adversarial.detach(), x_adv)


def attack_at(adversary: Adversary | None, every: int, from_epoch: int, epoch: int,
              step: int) -> Adversary | None:
    """The adversary if this step attacks (every `every`-th step, from epoch `from_epoch` on), else None.

    A step without an attack computes only the clean loss L(v1, v2): the cheaper "equal-time" schedules.
    """
    if adversary is None or epoch < from_epoch or step % every:
        return None
    return adversary


def apply_speedups(method: nn.Module, channels_last: bool = False, compile_backbone: bool = False) -> nn.Module:
    """Optional step speed-ups: NHWC weights (`channels_last`) and a `torch.compile`d backbone.

    Only the backbone's `features` is compiled (one graph per BN branch: the adversarial flag is a guard), so
    parameter names, checkpoints and the attack's input gradients are unchanged. The compiler backend is
    `inductor` unless IDAA_COMPILE_BACKEND names another (e.g. `aot_eager`, which needs no C++ toolchain).
    """
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if compile_backbone:
        backbone = method.backbone
        backbone.features = torch.compile(backbone.features,
                                          backend=os.environ.get("IDAA_COMPILE_BACKEND", "inductor"))
    return method


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in the layout the backbone's weights use."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
