"""Self-supervised losses as pure functions of embeddings (no networks here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2N embeddings must pick its partner among the other 2N - 1 (Chen et al. 2020)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def anchored_info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """The paper's attack loss (the equation after Eq. 9): candidate i must identify its own anchor i.

    Anchors are the clean embeddings and are used as given (callers detach them); candidates come from x~.
    """
    a = F.normalize(anchors, dim=1)
    c = F.normalize(candidates, dim=1)
    targets = torch.arange(len(c), device=c.device)
    return F.cross_entropy(c @ a.T / temperature, targets)
