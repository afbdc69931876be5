"""Every method's loss against a loop-by-loop reference (values and gradients), plus hand-computed 3-sample cases."""

import math

import pytest
import torch

from idaa.losses import (
    anchored_info_nce,
    debiased_nce,
    hcl_loss,
    info_nce,
    moco_info_nce,
    negative_cosine,
    nt_xent,
    uel_batch_criterion,
)


def unit(v):
    return v / v.norm()


def dot(a, b, t):
    return torch.exp(unit(a) @ unit(b) / t)


# ---- naive references: python loops over samples, written from the papers' formulas --------------------------


def ref_info_nce(z1, z2, t):
    n = len(z1)
    total = 0
    for i in range(n):
        total = total - torch.log(dot(z1[i], z2[i], t) / sum(dot(z1[i], z2[j], t) for j in range(n)))
    return total / n


def ref_uel(z1, z2, t):
    z = torch.cat([z1, z2])
    n2, n = len(z), len(z1)
    total = 0
    for i in range(n2):
        partner = (i + n) % n2
        denom = sum(dot(z[i], z[k].detach(), t) for k in range(n2) if k != i)
        total = total + torch.log(dot(z[i], z[partner].detach(), t) / denom)
        for j in range(n2):
            if j not in (i, partner):
                total = total + torch.log(1 - dot(z[i], z[j].detach(), t) / denom)
    return -total / n2


def ref_debiased_or_hcl(z1, z2, t, tau_plus, beta=None):
    z = torch.cat([z1, z2])
    n2, n = len(z), len(z1)
    m = n2 - 2
    total = 0
    for i in range(n2):
        partner = (i + n) % n2
        pos = dot(z[i], z[partner], t)
        negs = [dot(z[i], z[j], t) for j in range(n2) if j not in (i, partner)]
        if beta is None:
            neg_sum = sum(negs)
        else:
            weights = [g ** beta for g in negs]
            neg_sum = m * sum(w * g for w, g in zip(weights, negs, strict=True)) / sum(weights)
        ng = torch.clamp((neg_sum - tau_plus * m * pos) / (1 - tau_plus), min=m * math.exp(-1 / t))
        total = total - torch.log(pos / (pos + ng))
    return total / n2


def ref_moco(q, k, queue, t):
    total = 0
    for i in range(len(q)):
        pos = dot(q[i], k[i].detach(), t)
        total = total - torch.log(pos / (pos + sum(dot(q[i], c, t) for c in queue)))
    return total / len(q)


def ref_anchored(anchors, candidates, t):
    total = 0
    for i in range(len(candidates)):
        row = [dot(candidates[i], anchors[j], t) for j in range(len(anchors))]
        total = total - torch.log(row[i] / sum(row))
    return total / len(candidates)


def ref_negative_cosine(p, z):
    return -sum(unit(p[i]) @ unit(z[i].detach()) for i in range(len(p))) / len(p)


def ref_nt_xent(z1, z2, t):
    z = torch.cat([z1, z2])
    n2 = len(z)
    total = 0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        total = total - torch.log(dot(z[i], z[partner], t) / sum(dot(z[i], z[k], t) for k in range(n2) if k != i))
    return total / n2


CASES = {
    "info_nce": (lambda a, b: info_nce(a, b, 0.1), lambda a, b: ref_info_nce(a, b, 0.1)),
    "nt_xent": (lambda a, b: nt_xent(a, b, 0.5), lambda a, b: ref_nt_xent(a, b, 0.5)),
    "uel": (lambda a, b: uel_batch_criterion(a, b, 0.1), lambda a, b: ref_uel(a, b, 0.1)),
    "uel_t05": (lambda a, b: uel_batch_criterion(a, b, 0.5), lambda a, b: ref_uel(a, b, 0.5)),
    "debiased": (lambda a, b: debiased_nce(a, b, 0.5, 0.1), lambda a, b: ref_debiased_or_hcl(a, b, 0.5, 0.1)),
    "debiased_tp0": (lambda a, b: debiased_nce(a, b, 0.2, 0.0), lambda a, b: ref_debiased_or_hcl(a, b, 0.2, 0.0)),
    "hcl": (lambda a, b: hcl_loss(a, b, 0.5, 0.1, 1.0), lambda a, b: ref_debiased_or_hcl(a, b, 0.5, 0.1, 1.0)),
    "hcl_beta05": (lambda a, b: hcl_loss(a, b, 0.5, 0.05, 0.5),
                   lambda a, b: ref_debiased_or_hcl(a, b, 0.5, 0.05, 0.5)),
    "anchored": (lambda a, b: anchored_info_nce(a.detach(), b, 0.5), lambda a, b: ref_anchored(a.detach(), b, 0.5)),
    "negative_cosine": (negative_cosine, ref_negative_cosine),
}


@pytest.mark.parametrize("n", [2, 3, 7])
@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_matches_loop_reference_values_and_gradients(name, n):
    fast, slow = CASES[name]
    torch.manual_seed(n)
    z1 = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    got, want = fast(z1, z2), slow(z1, z2)
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    got_grads = torch.autograd.grad(got, [z1, z2], allow_unused=True)
    want_grads = torch.autograd.grad(want, [z1, z2], allow_unused=True)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n,queue_len", [(2, 1), (4, 9)])
def test_moco_matches_loop_reference(n, queue_len):
    q = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(queue_len, 6, dtype=torch.float64)
    got, want = moco_info_nce(q, k, queue, 0.2), ref_moco(q, k, queue, 0.2)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    gq, = torch.autograd.grad(got, q, retain_graph=True)
    wq, = torch.autograd.grad(want, q)
    torch.testing.assert_close(gq, wq)
    assert torch.autograd.grad(got, k, allow_unused=True)[0] is None  # keys are constants


def test_bf16_embeddings_are_promoted():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    for fn in (info_nce, uel_batch_criterion, debiased_nce, hcl_loss, nt_xent):
        assert fn(z1.bfloat16(), z2.bfloat16()).dtype == torch.float32


# ---- hand-computed 3-sample batches ---------------------------------------------------------------------------
# z1 = z2 = (e1, e2, -e1) in R^2, T = 1: every positive pair has cosine 1 (exp = e). Anchors e1 and -e1 (4 of the
# 6 embeddings, "type A") see negatives with cosines (0, -1, 0, -1); anchor e2 ("type B", 2 of 6) sees four 0s.

E = math.e
A = 1 / E  # exp(-1)


def _three():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    return z.clone(), z.clone()


def test_debiased_three_samples_by_hand():
    tp, m = 0.1, 4
    ng_a = max((2 + 2 * A - tp * m * E) / (1 - tp), m * A)  # negatives: 1, A, 1, A
    ng_b = max((4 - tp * m * E) / (1 - tp), m * A)  # negatives: 1, 1, 1, 1
    want = (4 * -math.log(E / (E + ng_a)) + 2 * -math.log(E / (E + ng_b))) / 6
    assert debiased_nce(*_three(), temperature=1.0, tau_plus=tp).item() == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(0.6048, abs=1e-4)  # the same number, worked out with a calculator


def test_hcl_three_samples_by_hand():
    tp, m = 0.1, 4
    # beta = 1: weights equal the negatives, so the reweighted sum is m * sum(g^2) / sum(g).
    reweighted_a = m * (2 + 2 * A * A) / (2 + 2 * A)
    ng_a = max((reweighted_a - tp * m * E) / (1 - tp), m * A)
    ng_b = max((4 - tp * m * E) / (1 - tp), m * A)
    want = (4 * -math.log(E / (E + ng_a)) + 2 * -math.log(E / (E + ng_b))) / 6
    assert hcl_loss(*_three(), temperature=1.0, tau_plus=tp, beta=1.0).item() == pytest.approx(want, rel=1e-12)
    # harder negatives weigh more, so HCL's loss exceeds Debiased's on this batch
    assert want > debiased_nce(*_three(), temperature=1.0, tau_plus=tp).item()


def test_uel_three_samples_by_hand():
    # type A row (e1): others e2, -e1, e1 (partner), e2, -e1 -> exp: 1, A, E, 1, A
    denom_a = E + 2 + 2 * A
    row_a = math.log(E / denom_a) + 2 * math.log(1 - 1 / denom_a) + 2 * math.log(1 - A / denom_a)
    # type B row (e2): others e1, -e1, e1, e2 (partner), -e1 -> exp: 1, 1, 1, E, 1
    denom_b = E + 4
    row_b = math.log(E / denom_b) + 4 * math.log(1 - 1 / denom_b)
    want = -(4 * row_a + 2 * row_b) / 6
    assert uel_batch_criterion(*_three(), temperature=1.0).item() == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(1.3439, abs=1e-4)  # worked out with a calculator
