"""FixMatch's loss terms as pure functions (Sohn et al. 2020, Eq. 1-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_labels(weak_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard labels, 0/1 float mask) from the weak branch: argmax of softmax, kept where max prob >= threshold."""
    probs = torch.softmax(weak_logits.detach().float(), dim=-1)
    confidence, targets = probs.max(dim=-1)
    return targets, (confidence >= threshold).float()


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_u = (1 / mu B) sum_b mask_b * CE(targets_b, logits_b): unconfident samples count in the denominator."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * mask).mean()
