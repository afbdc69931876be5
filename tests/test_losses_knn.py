"""Losses against naive loop references, and kNN against a brute-force vote."""

import math

import pytest
import torch

from idaa.evaluate.knn import knn_predict
from idaa.losses import anchored_info_nce, nt_xent


def naive_nt_xent(z1, z2, tau):
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        denominator = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(n2) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[partner]) / tau) / denominator)
    return total / n2


def naive_anchored(anchors, candidates, tau):
    a = anchors / anchors.norm(dim=1, keepdim=True)
    c = candidates / candidates.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(len(c)):
        logits = [float(c[i] @ a[j]) / tau for j in range(len(a))]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / len(c)


@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_naive(n, tau):
    z1, z2 = torch.randn(n, 7, dtype=torch.float64), torch.randn(n, 7, dtype=torch.float64)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(naive_nt_xent(z1, z2, tau), rel=1e-9)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_anchored_info_nce_matches_naive(n):
    a, c = torch.randn(n, 6, dtype=torch.float64), torch.randn(n, 6, dtype=torch.float64)
    assert anchored_info_nce(a, c, 0.5).item() == pytest.approx(naive_anchored(a, c, 0.5), rel=1e-9)


def test_loss_gradients_match_autograd_of_the_naive_form():
    z1 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)

    def reference(a, b):  # the same loss written as an explicit sum, differentiable
        z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
        terms = []
        for i in range(8):
            others = torch.stack([z[i] @ z[j] / 0.5 for j in range(8) if j != i])
            terms.append(torch.logsumexp(others, 0) - z[i] @ z[(i + 4) % 8] / 0.5)
        return torch.stack(terms).mean()

    g_fast = torch.autograd.grad(nt_xent(z1, z2, 0.5), (z1, z2))
    g_ref = torch.autograd.grad(reference(z1, z2), (z1, z2))
    for fast, ref in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(fast, ref, atol=1e-10)


def brute_force_knn(bank, labels, queries, classes, k, t):
    bank = bank / bank.norm(dim=1, keepdim=True)
    queries = queries / queries.norm(dim=1, keepdim=True)
    out = []
    for q in queries:
        sims = sorted(((float(q @ b), int(y)) for b, y in zip(bank, labels, strict=True)), reverse=True)[:k]
        votes = [0.0] * classes
        for s, y in sims:
            votes[y] += math.exp(s / t)
        out.append(max(range(classes), key=lambda c: votes[c]))
    return torch.tensor(out)


@pytest.mark.parametrize(("k", "t"), [(1, 0.1), (7, 0.1), (50, 0.5), (500, 0.1)])
def test_knn_matches_brute_force(k, t):
    torch.manual_seed(k)
    bank, labels = torch.randn(300, 16, dtype=torch.float64), torch.randint(0, 5, (300,))
    queries = torch.randn(40, 16, dtype=torch.float64)
    fast = knn_predict(bank, labels, queries, 5, k=k, temperature=t, batch_size=7)  # several chunks
    assert torch.equal(fast, brute_force_knn(bank, labels, queries, 5, min(k, 300), t))


def test_knn_uses_every_bank_entry():
    bank = torch.randn(13, 8, dtype=torch.float64)  # 13 entries: a partial last batch for fixed-slot banks
    labels = torch.zeros(13, dtype=torch.long)
    labels[-1] = 1
    assert knn_predict(bank, labels, bank[-1:].clone(), 2, k=1, batch_size=4).item() == 1
