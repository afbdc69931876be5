"""Self-supervised losses as pure functions of embeddings (no networks here).

Each is checked in tests against a loop-by-loop reference written from the original paper or code. Under
data-parallel training the rows of a loss are this rank's samples and the candidates/negatives are gathered
from every rank (`idaa.distributed.gather`, differentiable); in one process the gather is the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from idaa.distributed import gather


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings (autocast) are promoted: the exp/log of a loss needs fp32 range."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2N embeddings must pick its partner among the other 2N - 1 (Chen et al. 2020)."""
    z1, z2 = F.normalize(_full(z1), dim=1), F.normalize(_full(z2), dim=1)
    (all1, offset), (all2, _) = gather(z1), gather(z2)
    n, total = len(z1), len(all1)
    rows = torch.cat([z1, z2])
    logits = rows @ torch.cat([all1, all2]).T / temperature
    own = torch.arange(n, device=z1.device) + offset
    self_cols = torch.cat([own, own + total])
    logits[torch.arange(2 * n, device=z1.device), self_cols] = float("-inf")
    return F.cross_entropy(logits, torch.cat([own + total, own]))


def anchored_info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """The paper's attack loss (the equation after Eq. 9): candidate i must identify its own anchor i.

    Anchors are the clean embeddings and are used as given (callers detach them); candidates come from x~.
    """
    a, offset = gather(F.normalize(_full(anchors), dim=1))
    c = F.normalize(_full(candidates), dim=1)
    targets = torch.arange(len(c), device=c.device) + offset
    return F.cross_entropy(c @ a.T / temperature, targets)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Plain InfoNCE, Eq. 1: f(A(x_i)) must pick h(B(x_i)) among the batch's h(B(x_j)); one direction (CLAE's Plain)."""
    a = F.normalize(_full(z1), dim=1)
    b, offset = gather(F.normalize(_full(z2), dim=1))
    return F.cross_entropy(a @ b.T / temperature, torch.arange(len(a), device=a.device) + offset)


def uel_batch_criterion(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Ye et al. 2019's batch criterion (UEL), as in their released BatchCriterion with m = 1.

    Over the 2N embeddings, P_ij = exp(<z_i, z_j>/T) / sum_{k != i} exp(<z_i, z_k>/T); with i+ the partner view,
    the loss is -(1/2N) sum_i [log P_ii+ + sum_{j != i, i+} log(1 - P_ij)]. As in the reference code, the second
    argument of every inner product is treated as a constant (only the row embedding receives gradient).
    """
    z1, z2 = F.normalize(_full(z1), dim=1), F.normalize(_full(z2), dim=1)
    (all1, offset), (all2, _) = gather(z1.detach()), gather(z2.detach())  # columns are constants, as in UEL
    n, total = len(z1), len(all1)
    z = torch.cat([z1, z2])
    rows = torch.arange(2 * n, device=z.device)
    own = torch.arange(n, device=z.device) + offset
    self_cols, partner_cols = torch.cat([own, own + total]), torch.cat([own + total, own])
    sims = torch.exp(z @ torch.cat([all1, all2]).T / temperature)
    sims = sims.index_put((rows, self_cols), sims.new_zeros(()))
    denom = sims.sum(dim=1)
    prob = sims / denom[:, None]  # row i: probability that sample k is recognised as instance i; self 0
    pos = prob[rows, partner_cols]
    neg = torch.log1p(-prob).sum(dim=1) - torch.log1p(-pos)  # every column but self (0) and the partner
    return -(torch.log(pos) + neg).sum() / (2 * n)


def _pos_neg(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """exp-similarities of each of the 2N embeddings to its partner (2N) and to its 2N-2 negatives (2N x 2N-2)."""
    z1, z2 = F.normalize(_full(z1), dim=1), F.normalize(_full(z2), dim=1)
    (all1, offset), (all2, _) = gather(z1), gather(z2)
    n, total = len(z1), len(all1)
    own = torch.arange(n, device=z1.device) + offset
    keep = torch.ones(2 * n, 2 * total, dtype=torch.bool, device=z1.device)
    rows = torch.arange(2 * n, device=z1.device)
    keep[rows, torch.cat([own, own + total])] = False
    keep[rows, torch.cat([own + total, own])] = False
    neg = torch.exp(torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / temperature)
    neg = neg.masked_select(keep).view(2 * n, 2 * total - 2)
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
