"""Augmentation gallery (paper Fig. 4): what IDAA and CLAE change in a random view, and the VAE's split of it.

Rows: x, A(x), G(A(x)), R(A(x)), IDAA x', its amplified change x' - A(x), CLAE x', its amplified change (the
changes are signed, grey = none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from idaa.analysis.setup import AttackSetup, attacked_views
from idaa.data.views import build_view_policy
from idaa.errors import IdaaError
from idaa.imaging import save_grid, stretch, to_unit_range

ROW_LABELS = ("x", "A(x)", "G(A(x))", "R(A(x))", "IDAA x'", "IDAA x'-A(x)", "CLAE x'", "CLAE x'-A(x)")


def _spread_over_classes(labels: torch.Tensor) -> torch.Tensor:
    """An order that takes one image per class in turn, so the first few shown images have distinct classes."""
    classes = labels.clamp_min(0)
    rank = torch.zeros_like(classes)
    for c in classes.unique():
        members = (classes == c).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    return torch.argsort(rank * (int(classes.max()) + 1) + classes, stable=True)


def _amplified(diff: torch.Tensor, std: tuple[float, ...]) -> tuple[torch.Tensor, float]:
    """The signed change in pixel units around grey, scaled so the row's largest change saturates; + the gain.

    Signed rather than |diff|: CLAE's FGSM step has the same size eps everywhere, only its sign carries a pattern.
    """
    pixels = diff * torch.as_tensor(std, device=diff.device).view(1, -1, 1, 1)
    gain = 0.5 / max(pixels.abs().amax().item(), 1e-8)
    return (0.5 + pixels * gain).clamp(0, 1), gain


def make_gallery(setup: AttackSetup, path: str | Path, n: int = 8, context: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Attack `context` images (the shown `n` among them, so the anchored loss sees a training-sized batch)
    and write the grid; returns the settings and the mean absolute change per adversary (pixel units)."""
    if n < 1:
        raise IdaaError(f"--n must be >= 1, got {n}")
    context = int(context or setup.config.get("batch_size") or 256)
    context = max(min(context, len(setup.data)), n, 2)
    if n > len(setup.data):
        raise IdaaError(f"--n {n} is larger than the {setup.data.name} split ({len(setup.data)} images)")
    batch = setup.data.take(context, seed=seed)
    images = batch.images[_spread_over_classes(batch.labels)]
    torch.manual_seed(seed)
    views = attacked_views(setup, images, on="v1")
    mean, std = setup.data.mean, setup.data.std
    anchor = views["anchor"][:n]
    with torch.no_grad():
        generated, residual = setup.adversaries["idaa"].decompose(anchor)  # type: ignore[attr-defined]
    plain = build_view_policy("eval", setup.data.image_size, mean, std).to(setup.device)
    rows = [to_unit_range(plain(images[:n].to(setup.device)), mean, std), to_unit_range(anchor, mean, std),
            to_unit_range(generated, mean, std), stretch(residual)]
    change, gains = {}, {}
    for name in ("idaa", "clae"):
        diff = views[name][:n] - anchor
        amplified, gains[name] = _amplified(diff, std)
        rows += [to_unit_range(views[name][:n], mean, std), amplified]
        pixel_diff = (views[name] - views["anchor"]).abs() * torch.as_tensor(std, device=diff.device).view(1, -1, 1, 1)
        change[name] = pixel_diff.mean().item()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdaaError(f"cannot create output folder '{path.parent}' ({exc.strerror or type(exc).__name__})") from None
    save_grid(rows, path, labels=ROW_LABELS)
    info = {"png": str(path), "source": setup.source, "dataset": setup.data.name, "n": n, "context": context,
            "eps": setup.eps, "mean_abs_change": change, "amplification": gains, "rows": list(ROW_LABELS),
            "notes": list(setup.notes)}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info
