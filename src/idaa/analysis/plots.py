"""Plot helpers: matplotlib figures drawn off-screen (no pyplot, so no global backend is touched)."""

from __future__ import annotations

from typing import Any

import numpy as np

AUGMENTATION_LABELS = {"random": "random", "clae": "CLAE", "idaa": "IDAA"}
AUGMENTATION_COLORS = {"random": "#2ca02c", "clae": "#d62728", "idaa": "#1f77b4"}


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure with an Agg canvas; `fig.savefig(path)` writes it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def kde(values: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian kernel density estimate on a grid spanning the data (Scott's bandwidth)."""
    values = np.asarray(values, dtype=np.float64)
    spread = values.std()
    bandwidth = max(spread * len(values) ** (-1 / 5), 1e-3 * (abs(values).max() + 1e-12), 1e-9)
    grid = np.linspace(values.min() - 3 * bandwidth, values.max() + 3 * bandwidth, points)
    z = (grid[:, None] - values[None, :]) / bandwidth
    density = np.exp(-0.5 * z**2).sum(axis=1) / (len(values) * bandwidth * np.sqrt(2 * np.pi))
    return grid, density
