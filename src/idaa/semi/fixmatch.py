"""FixMatch with an adversarial strong branch: L = L_s + lambda_u * (L_u(strong) + alpha * L_u(x'_strong))."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from idaa.adversaries.base import Adversary, LossFn
from idaa.nets.resnet import Backbone
from idaa.semi.losses import masked_cross_entropy, pseudo_labels


class Classifier(nn.Module):
    """A dual-BN backbone and a linear head; `forward(x, adv=True)` normalises with the adversarial BNs."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
        return self.head(self.backbone(x, adv=adv))


class EMA:
    """Exponential moving average of a model's weights (FixMatch evaluates this copy); buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = decay * ema + (1 - decay) * current, for every parameter; BN statistics follow the model."""
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


@dataclass
class SemiLosses:
    """The terms of one step; `targets`/`mask` are the pseudo-labels (None for the supervised baseline)."""

    total: torch.Tensor
    supervised: torch.Tensor
    unlabelled: torch.Tensor | None = None
    adversarial: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def strong_branch_attack(model: Classifier, targets: torch.Tensor, mask: torch.Tensor) -> LossFn:
    """The attack loss: masked CE of the adversarial-BN prediction against the pseudo-labels (to maximise)."""
    return lambda x: masked_cross_entropy(model(x, adv=True), targets, mask)


def fixmatch_losses(model: Classifier, adversary: Adversary | None, labelled: torch.Tensor, targets_l: torch.Tensor,
                    weak: torch.Tensor, strong: torch.Tensor, source: torch.Tensor | None = None,
                    threshold: float = 0.95, lambda_u: float = 1.0, alpha: float = 1.0) -> SemiLosses:
    """One FixMatch step's losses; with an adversary, x' is made from the strong views against their pseudo-labels.

    The clean inputs share one forward (as FixMatch does, so BN sees the whole batch); x' goes through the
    adversarial BN. `source` is the uint8 unlabelled batch, which the random-view control draws from.
    """
    n_l, n_u = len(labelled), len(weak)
    logits = model(torch.cat([labelled, weak, strong]))
    logits_l, logits_weak, logits_strong = logits.split([n_l, n_u, n_u])
    supervised = F.cross_entropy(logits_l.float(), targets_l)
    targets, mask = pseudo_labels(logits_weak, threshold)
    unlabelled = masked_cross_entropy(logits_strong, targets, mask)
    if adversary is None:
        return SemiLosses(supervised + lambda_u * unlabelled, supervised, unlabelled, None, targets, mask)
    if bool(mask.any()):
        x_adv = adversary.perturb(strong, strong_branch_attack(model, targets, mask), source=source)
        adversarial = masked_cross_entropy(model(x_adv, adv=True), targets, mask)
    else:  # no confident pseudo-label: the adversarial term is exactly 0 whatever x' is, so skip the attack
        adversarial = unlabelled.new_zeros(())
    total = supervised + lambda_u * (unlabelled + alpha * adversarial)
    return SemiLosses(total, supervised, unlabelled, adversarial, targets, mask)


def supervised_losses(model: Classifier, labelled: torch.Tensor, targets_l: torch.Tensor) -> SemiLosses:
    """The baseline: cross-entropy on the (weakly augmented) labelled batch only."""
    supervised = F.cross_entropy(model(labelled).float(), targets_l)
    return SemiLosses(supervised, supervised)
