"""The linear probe: a softmax classifier on frozen, standardised features, with held-out model selection.

Default protocol (cached features): full-batch L-BFGS on the L2-regularised cross-entropy, which converges to
the optimum of a convex problem in a few hundred iterations. The weight decay is chosen on a seeded, class-
balanced 10% of the *training* set (the probe is fitted on the other 90%), then the probe is refitted on the
whole training set with the chosen value. The test set is not an argument of anything here but `score`,
which the caller runs once at the end.

Augmented protocol (the paper's): every epoch draws fresh random views of the training images, so there is no
fixed feature matrix; one linear head per grid value is trained on the 90% part and one on all of it, in
parallel on the same views (one backbone pass per epoch for the whole grid), with Adam and a cosine schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from idaa.errors import IdaaError

WEIGHT_DECAYS: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
VAL_FRACTION = 0.1


def holdout_split(labels: torch.Tensor, fraction: float = VAL_FRACTION,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, val) sorted index tensors into `labels`: `fraction` of every class (at least one) goes to val.

    Seeded and class-balanced so that selection on val is repeatable and every class is represented.
    """
    if not 0 < fraction < 1:
        raise IdaaError(f"validation fraction must be in (0, 1), got {fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < 2:
            raise IdaaError(f"class {c} has {len(members)} training image(s); the probe's held-out split needs 2")
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        val.append(members[torch.randperm(len(members), generator=generator)[:take]])
    val_idx = torch.sort(torch.cat(val)).values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val_idx] = False
    return mask.nonzero().squeeze(1), val_idx


@dataclass
class Standardizer:
    """Per-dimension (x - mean) / std with statistics from the fitting set only; constant dims pass as 0."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardizer:
        std = x.std(dim=0)
        return cls(x.mean(dim=0), torch.where(std > 1e-6, std, torch.ones_like(std)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class LinearProbe:
    """A fitted linear classifier on standardised features: logits = standardise(x) @ weight + bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    scaler: Standardizer
    info: dict[str, Any] = field(default_factory=dict)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaler(x.to(self.weight.dtype)) @ self.weight + self.bias


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """{k: percent of rows whose label is among the k largest logits}; k is capped at the number of classes."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.view(-1, 1)
    return {k: 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 1000,
              tolerance: float = 1e-6, init: tuple[torch.Tensor, torch.Tensor] | None = None) -> LinearProbe:
    """Minimise mean cross-entropy + weight_decay / 2 * ||W||^2 over (W, b) with full-batch L-BFGS.

    `x` is standardised here (statistics of `x` itself); `init` warm-starts from a previous solution, which
    makes a decreasing weight-decay path cheap. Convergence = max |gradient| below `tolerance`; the problem
    is solved in float64 so that criterion is reachable (float32 stalls around 1e-5).
    """
    x = x.double()
    scaler = Standardizer.fit(x)
    xs = scaler(x)
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype) if init is None else init[0].double().clone()
    bias = torch.zeros(num_classes, dtype=x.dtype) if init is None else init[1].double().clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tolerance, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        initial = optimizer.step(objective).detach().item()
        final = objective().detach().item()
    grad = max(weight.grad.abs().max().item(), bias.grad.abs().max().item())
    iterations = int(optimizer.state[optimizer._params[0]].get("n_iter", 0))
    info = {"weight_decay": weight_decay, "iterations": iterations, "loss": final, "max_grad": grad,
            "converged": grad <= tolerance, "initial_loss": initial}
    return LinearProbe(weight.detach(), bias.detach(), scaler, info)


def select_and_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0,
                   grid: tuple[float, ...] = WEIGHT_DECAYS, max_iter: int = 1000) -> tuple[LinearProbe, dict]:
    """Choose the weight decay on a held-out 10% of the training features, then refit on all of them.

    Returns the refitted probe and the protocol record (grid, validation top-1 per value, chosen value,
    split sizes, iterations). Only training features and labels are seen here.
    """
    fit_idx, val_idx = holdout_split(y, VAL_FRACTION, seed)
    start = time.perf_counter()
    val_top1: dict[str, float] = {}
    candidates, previous = [], None
    for wd in sorted(grid, reverse=True):  # strong to weak regularisation: each solution warm-starts the next
        probe = fit_lbfgs(x[fit_idx], y[fit_idx], num_classes, wd, max_iter, init=previous)
        previous = (probe.weight, probe.bias)
        val_top1[repr(wd)] = topk_accuracy(probe.logits(x[val_idx]), y[val_idx], (1,))[1]
        candidates.append((wd, probe))
    # best validation top-1; ties go to the stronger regularisation (met first)
    best_wd, best = max(candidates, key=lambda c: (val_top1[repr(c[0])], c[0]))
    selection_s = time.perf_counter() - start
    final = fit_lbfgs(x, y, num_classes, best_wd, max_iter, init=(best.weight, best.bias))
    record = {"optimizer": "L-BFGS (full batch, strong Wolfe)", "objective": "mean cross-entropy + wd/2 ||W||^2",
              "standardise": True, "grid": list(grid), "val_fraction": VAL_FRACTION, "split_seed": seed,
              "fit_images": len(fit_idx), "val_images": len(val_idx), "val_top1": val_top1,
              "chosen_weight_decay": best_wd, "max_iter": max_iter,
              "selection_iterations": {repr(wd): p.info["iterations"] for wd, p in candidates},
              "final_fit": final.info, "selection_s": selection_s,
              "refit_s": time.perf_counter() - start - selection_s}
    return final, record


def fit_augmented(epoch_features: Callable[[int], torch.Tensor], y: torch.Tensor, val_x: torch.Tensor,
                  val_idx: torch.Tensor, num_classes: int, epochs: int, batch_size: int = 256, lr: float = 5e-2,
                  grid: tuple[float, ...] = WEIGHT_DECAYS, seed: int = 0) -> tuple[LinearProbe, dict]:
    """The augmented protocol: `epoch_features(e)` gives features of fresh random views of all N training images.

    For every weight decay two heads learn side by side on the same minibatches: one on the fit part (rows not
    in `val_idx`) for selection on `val_x` (clean views of the held-out images), one on every row for the
    final probe. Standardisation uses the first epoch's features.
    """
    n, heads = len(y), len(grid)
    fit_row = torch.ones(n, dtype=torch.bool)
    fit_row[val_idx] = False
    decay = torch.tensor(list(grid) * 2)
    generator = torch.Generator().manual_seed(seed)
    steps, total = 0, epochs * math.ceil(n / batch_size)
    scaler, weight, bias, optimizer = None, None, None, None
    extract_s, train_s = 0.0, 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        feats = epoch_features(epoch)
        extract_s += time.perf_counter() - start
        start = time.perf_counter()
        if scaler is None:
            scaler = Standardizer.fit(feats)
            weight = torch.zeros(2 * heads, feats.shape[1], num_classes, requires_grad=True)
            bias = torch.zeros(2 * heads, 1, num_classes, requires_grad=True)
            optimizer = torch.optim.Adam([weight, bias], lr=lr)
        feats = scaler(feats)
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            for group in optimizer.param_groups:  # cosine decay over all steps
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * steps / total))
            # selection heads (first half) learn only from fit rows; final heads from every row
            use = torch.cat([fit_row[batch].float().expand(heads, -1), torch.ones(heads, len(batch))])
            with torch.enable_grad():
                logits = torch.einsum("bd,hdc->hbc", feats[batch], weight) + bias
                ce = F.cross_entropy(logits.flatten(0, 1), y[batch].repeat(2 * heads), reduction="none")
                per_head = (ce.view(2 * heads, -1) * use).sum(1) / use.sum(1).clamp(min=1)
                loss = (per_head + 0.5 * decay * weight.pow(2).sum((1, 2))).sum()
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            steps += 1
        train_s += time.perf_counter() - start
    if scaler is None or weight is None or bias is None:
        raise IdaaError("the augmented linear protocol needs --epochs >= 1")
    with torch.no_grad():
        val_logits = torch.einsum("bd,hdc->hbc", scaler(val_x), weight[:heads]) + bias[:heads]
    val_top1 = {repr(wd): topk_accuracy(val_logits[h], y[val_idx], (1,))[1] for h, wd in enumerate(grid)}
    best = max(range(heads), key=lambda h: (val_top1[repr(grid[h])], grid[h]))
    probe = LinearProbe(weight[heads + best].detach().clone(), bias[heads + best, 0].detach().clone(), scaler)
    record = {"optimizer": "Adam, cosine schedule", "objective": "mean cross-entropy + wd/2 ||W||^2",
              "standardise": "first epoch's statistics", "grid": list(grid), "val_fraction": VAL_FRACTION,
              "split_seed": seed, "fit_images": int(fit_row.sum()), "val_images": len(val_idx),
              "val_top1": val_top1, "chosen_weight_decay": grid[best], "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "steps": steps, "augmented_extraction_s": extract_s, "probe_train_s": train_s}
    return probe, record
