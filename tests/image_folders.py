"""Small labelled image folders of random-size JPEGs and PNGs for the streaming tests (no data download)."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, counts: dict[str, int], seed: int, sizes: tuple[int, int],
                       lowest: int = 0) -> Path:
    """root/<part>/{cat,dog}/<i>.jpg|png with counts[part] images per class, noise pixels in [lowest, 255]."""
    rng = np.random.default_rng(seed)
    for part, count in counts.items():
        for c in ("cat", "dog"):
            folder = root / part / c
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = (int(v) for v in rng.integers(*sizes, 2))
                pixels = rng.integers(lowest, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root
