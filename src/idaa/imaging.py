"""Image grids as PNG files (PIL only: fast to import, nothing to configure)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_unit_range(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised views back to [0, 1] pixels, clipped."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def stretch(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Show a signed difference image: 0.5 grey is zero, scaled by `gain`/max|x| over the batch, clipped."""
    scale = x.abs().amax().clamp_min(1e-8)
    return (0.5 + 0.5 * gain * x / scale).clamp(0, 1)


def save_grid(rows: Sequence[torch.Tensor], path: str | Path, scale: int = 3, pad: int = 2,
              labels: Sequence[str] | None = None) -> Path:
    """Write rows of [0, 1] images (each N x C x H x W, same N) as one PNG, upscaled by `scale`.

    `labels` (one per row) are written in a margin left of the rows.
    """
    n, c, h, w = rows[0].shape
    cell_h, cell_w = h * scale + pad, w * scale + pad
    margin = _label_width(labels) if labels else 0
    canvas = np.full((len(rows) * cell_h + pad, margin + n * cell_w + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        pixels = (row.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            y, x = pad + r * cell_h, margin + pad + i * cell_w
            canvas[y:y + h * scale, x:x + w * scale] = pixels[i]
    image = Image.fromarray(canvas)
    if labels:
        draw = ImageDraw.Draw(image)
        for r, label in enumerate(labels):
            draw.text((pad + 2, pad + r * cell_h + (h * scale) // 2 - 6), label, fill=(0, 0, 0))
    path = Path(path)
    image.save(path)
    return path


def _label_width(labels: Sequence[str]) -> int:
    """Pixels needed left of the grid for the longest row label in PIL's default font."""
    font = ImageFont.load_default()
    return max(int(font.getlength(label)) for label in labels) + 10
