"""`idaa embed`: a 2-d map of a checkpoint's test-set features, coloured by class (embed.png + embed.csv).

Features are the backbone's, L2-normalised (the geometry the kNN monitor scores), from the run folder's
feature cache when it matches. They are reduced to 2-d by UMAP when umap-learn is installed (`pip install
'idaa[umap]'`), else by scikit-learn's t-SNE; both are seeded, so a rerun draws the same map.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idaa.analysis.plots import new_figure
from idaa.checkpoints import checkpoint_data, load_method
from idaa.data.memory import balanced_indices
from idaa.data.sources import open_dataset
from idaa.data.views import build_view_policy
from idaa.devices import resolve_device
from idaa.errors import IdaaError, one_line
from idaa.evaluate.features import FeatureCache
from idaa.fileio import atomic_write_bytes

METHODS = ("auto", "umap", "tsne")
MIN_POINTS = 10
LEGEND_CLASSES = 20  # beyond this a legend hides the map: the CSV still names every class


def embed_map(checkpoint: str | Path, dataset: str | None = None, data_dir: str | None = None,
              limit: int | None = None, method: str = "auto", out: str | Path | None = None,
              device: str = "auto", seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Write <out>/embed.png and <out>/embed.csv (default out: the checkpoint's folder); returns a summary."""
    if method not in METHODS:
        raise IdaaError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if limit is not None and limit < MIN_POINTS:
        raise IdaaError(f"--limit must be >= {MIN_POINTS} (a 2-d map of fewer points says nothing), got {limit}")
    reducer = _pick_method(method)
    start = time.perf_counter()
    dev = resolve_device(device)
    model, blob = load_method(checkpoint, dev)
    cfg, meta = blob["config"], blob["data"]
    data = checkpoint_data(cfg, dataset, data_dir)  # streamed folders: centre crops at the run's size
    name, root = data.name, data.data_dir
    test = open_dataset(name, root, split="test", options=data.options, default_size=meta["image_size"])
    if test.image_size != meta["image_size"]:
        raise IdaaError(f"checkpoint was trained on {meta['image_size']} px images, '{name}' has {test.image_size} px")
    indices = torch.arange(len(test))
    if limit is not None and limit < len(test):
        indices = balanced_indices(test.labels, limit, seed)
        test = test.subset(indices)
    if len(test) < MIN_POINTS:
        raise IdaaError(f"the {name} test split has {len(test)} images; an embedding map needs {MIN_POINTS}")
    view = build_view_policy("eval", test.image_size, meta["mean"], meta["std"]).to(dev)
    view_key = {"policy": "eval", "image_size": test.image_size, "mean": list(meta["mean"]), "std": list(meta["std"])}
    cached = FeatureCache(checkpoint).get(lambda x: model.embed_for_eval(x, "backbone"), test, "test", "backbone",
                                          view, view_key, dev, data_dir=root, progress=progress)
    features = torch.nn.functional.normalize(cached.features.float(), dim=1).numpy()
    points = _reduce(features, reducer, seed)
    folder = Path(out) if out is not None else Path(checkpoint).parent
    labels = test.labels.numpy()
    names = [_class_name(test.classes, int(y)) for y in labels]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        csv_path, png_path = folder / "embed.csv", folder / "embed.png"
        _write_csv(csv_path, indices.numpy(), labels, names, points)
        title = f"{cfg.get('method')} + {cfg.get('adversary')}: {name} test features ({reducer.upper()})"
        _write_png(png_path, points, labels, names, title)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise IdaaError(f"cannot write the embedding map to '{folder}' ({reason})") from None
    return {"png": str(png_path), "csv": str(csv_path), "method": reducer, "dataset": name, "n": len(test),
            "classes": len(set(labels.tolist())), "seconds": time.perf_counter() - start}


def map_after_training(run_dir: str | Path, device: torch.device | str, seed: int = 0, progress: bool = False) -> None:
    """`pretrain --embed-map`: the map of the finished run, in its folder; a dataset that cannot be mapped is a note."""
    import sys

    try:
        info = embed_map(Path(run_dir) / "last.ckpt", device=str(device), seed=seed, progress=progress)
    except IdaaError as exc:  # e.g. no labelled test split: the training itself succeeded
        print(f"note: no embedding map: {one_line(exc)}", file=sys.stderr)
        return
    print(f"embedding map ({info['method']}, {info['n']} test images) -> {info['png']}, {info['csv']}")


def _pick_method(method: str) -> str:
    """'auto' -> umap when umap-learn imports, else tsne; 'umap' without umap-learn is a one-line error."""
    if method == "tsne":
        return "tsne"
    try:
        import umap  # umap-learn; it pulls numba, so it is an extra
    except ImportError:
        umap = None
    if getattr(umap, "UMAP", None) is None:  # absent, or another package named umap
        if method == "umap":
            raise IdaaError("--method umap needs umap-learn: pip install 'idaa[umap]' (or use --method tsne)")
        return "tsne"
    return "umap"


def _reduce(features: np.ndarray, reducer: str, seed: int) -> np.ndarray:
    n = len(features)
    if reducer == "umap":
        import warnings

        import umap

        with warnings.catch_warnings():  # a fixed random_state forces one thread; umap warns about it
            warnings.simplefilter("ignore", UserWarning)
            model = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
            return np.asarray(model.fit_transform(features), dtype=np.float64)
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    perplexity = float(min(30.0, (n - 1) / 3))  # t-SNE needs perplexity < n
    # one thread: beside torch's own OpenMP runtime, scikit-learn's threads spin-wait on a busy machine (10-30x
    # slower measured on 2 shared cores); single-threaded, 10k CIFAR-size features take about 2 minutes
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def _class_name(classes: list[str], label: int) -> str:
    if label < 0:
        return "unlabelled"
    return classes[label] if label < len(classes) else str(label)


def _write_csv(path: Path, indices: np.ndarray, labels: np.ndarray, names: list[str], points: np.ndarray) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["index", "label", "class", "x", "y"])
    for i, y, name, (px, py) in zip(indices.tolist(), labels.tolist(), names, points.tolist(), strict=True):
        writer.writerow([i, y, name, f"{px:.6g}", f"{py:.6g}"])
    data = text.getvalue().encode()
    atomic_write_bytes(path, lambda handle: handle.write(data))


def _write_png(path: Path, points: np.ndarray, labels: np.ndarray, names: list[str], title: str) -> None:
    from matplotlib import colormaps

    fig = new_figure(7.5, 6)
    ax = fig.add_subplot(1, 1, 1)
    classes = sorted(set(labels.tolist()))
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
    for k, label in enumerate(classes):
        mask = labels == label
        color = "0.6" if label < 0 else cmap(k / max(len(classes) - 1, 1) if len(classes) > 20 else k)
        ax.scatter(points[mask, 0], points[mask, 1], s=8, color=color, alpha=0.8, linewidths=0,
                   label=names[int(np.argmax(mask))])
    if len(classes) <= LEGEND_CLASSES:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    data = buffer.getvalue()
    atomic_write_bytes(path, lambda handle: handle.write(data))
