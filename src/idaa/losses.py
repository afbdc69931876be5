"""Self-supervised losses as pure functions of embeddings (no networks here).

Each is checked in tests against a loop-by-loop reference written from the original paper or code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings (autocast) are promoted: the exp/log of a loss needs fp32 range."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2N embeddings must pick its partner among the other 2N - 1 (Chen et al. 2020)."""
    z = F.normalize(_full(torch.cat([z1, z2])), dim=1)
    n = len(z1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def anchored_info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """The paper's attack loss (the equation after Eq. 9): candidate i must identify its own anchor i.

    Anchors are the clean embeddings and are used as given (callers detach them); candidates come from x~.
    """
    a = F.normalize(_full(anchors), dim=1)
    c = F.normalize(_full(candidates), dim=1)
    targets = torch.arange(len(c), device=c.device)
    return F.cross_entropy(c @ a.T / temperature, targets)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Plain InfoNCE, Eq. 1: f(A(x_i)) must pick h(B(x_i)) among the batch's h(B(x_j)); one direction (CLAE's Plain)."""
    a, b = F.normalize(_full(z1), dim=1), F.normalize(_full(z2), dim=1)
    return F.cross_entropy(a @ b.T / temperature, torch.arange(len(a), device=a.device))


def uel_batch_criterion(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Ye et al. 2019's batch criterion (UEL), as in their released BatchCriterion with m = 1.

    Over the 2N embeddings, P_ij = exp(<z_i, z_j>/T) / sum_{k != i} exp(<z_i, z_k>/T); with i+ the partner view,
    the loss is -(1/2N) sum_i [log P_ii+ + sum_{j != i, i+} log(1 - P_ij)]. As in the reference code, the second
    argument of every inner product is treated as a constant (only the row embedding receives gradient).
    """
    z = F.normalize(_full(torch.cat([z1, z2])), dim=1)
    n2 = len(z)
    n = n2 // 2
    partner = torch.cat([torch.arange(n, n2), torch.arange(n)]).to(z.device)
    sims = torch.exp(z @ z.detach().T / temperature)
    sims = sims * (1 - torch.eye(n2, device=z.device))
    denom = sims.sum(dim=1, keepdim=True)
    prob = sims / denom  # row i: probability that sample k is recognised as instance i; diagonal 0
    pos = torch.exp((z * z[partner].detach()).sum(1) / temperature) / denom.squeeze(1)
    log_not = torch.log1p(-prob)  # diagonal: log(1) = 0
    neg = log_not.sum(dim=1) - torch.log1p(-pos)
    return -(torch.log(pos) + neg).sum() / n2


def _pos_neg(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """exp-similarities of each of the 2N embeddings to its partner (2N) and to its 2N-2 negatives (2N x 2N-2)."""
    z1, z2 = F.normalize(_full(z1), dim=1), F.normalize(_full(z2), dim=1)
    z = torch.cat([z1, z2])
    n = len(z1)
    keep = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    idx = torch.arange(n, device=z.device)
    keep[idx, idx + n] = False
    keep[idx + n, idx] = False
    neg = torch.exp(z @ z.T / temperature).masked_select(keep).view(2 * n, 2 * n - 2)
    pos = torch.exp((z1 * z2).sum(1) / temperature)
    return torch.cat([pos, pos]), neg


def debiased_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, tau_plus: float = 0.1) -> torch.Tensor:
    """Chuang et al. 2020's debiased contrastive loss: the negative term corrected for same-class "negatives".

    Ng = max((sum_neg - tau+ * M * pos) / (1 - tau+), M * e^(-1/T)) with M = 2N - 2; loss = -log(pos / (pos + Ng)).
    """
    pos, neg = _pos_neg(z1, z2, temperature)
    m = neg.shape[1]
    ng = (neg.sum(dim=1) - tau_plus * m * pos) / (1 - tau_plus)
    ng = ng.clamp(min=m * math.exp(-1 / temperature))
    return -torch.log(pos / (pos + ng)).mean()


def hcl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, tau_plus: float = 0.1,
             beta: float = 1.0) -> torch.Tensor:
    """Robinson et al. 2020's hard-negative contrastive loss: negatives reweighted by exp(beta * sim / T).

    The importance-weighted negative sum M * sum(w * neg) / sum(w), w = neg^beta, replaces sum(neg) in the
    debiased estimator; beta = 0 gives back `debiased_nce`.
    """
    pos, neg = _pos_neg(z1, z2, temperature)
    m = neg.shape[1]
    weight = neg.pow(beta)
    reweighted = (weight * neg).sum(dim=1) / weight.mean(dim=1)
    ng = (reweighted - tau_plus * m * pos) / (1 - tau_plus)
    ng = ng.clamp(min=m * math.exp(-1 / temperature))
    return -torch.log(pos / (pos + ng)).mean()


def moco_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE: query i against its key i (positive) and the queue's keys (negatives); keys are constants."""
    q = F.normalize(_full(q), dim=1)
    k = F.normalize(_full(k), dim=1).detach()
    queue = F.normalize(_full(queue), dim=1).detach()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam/BYOL's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    return -F.cosine_similarity(_full(p), _full(z.detach()), dim=1).mean()
