"""Weighted kNN classifier on L2-normalised features (Wu et al. 2018): k=200, T=0.1 by default."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from idaa.checkpoints import load_method
from idaa.data.datasets import load_dataset
from idaa.data.views import build_view_policy
from idaa.devices import resolve_device
from idaa.errors import IdaaError


@torch.no_grad()
def extract_features(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     view: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                     batch_size: int = 512) -> torch.Tensor:
    """Features of every image (uint8, any device) through `view` then `embed`, on `device`, in order."""
    chunks = [embed(view(chunk.to(device, non_blocking=True))).float() for chunk in images.split(batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, metric: str = "cosine",
                batch_size: int = 1024) -> torch.Tensor:
    """Predicted labels for `queries`: the k nearest bank entries vote with weight exp(sim / T).

    Every bank entry is used (no slot is dropped or overwritten); `metric` 'euclidean' uses -distance as sim.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"kNN metric must be cosine or euclidean, got {metric!r}")
    if metric == "cosine":
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    k = min(k, len(bank))
    predictions = []
    for chunk in queries.split(batch_size):
        sim = chunk @ bank.T if metric == "cosine" else -torch.cdist(chunk, bank)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # shifted per row: same vote, no underflow
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1, metric: str = "cosine") -> float:
    """Top-1 accuracy (percent) of the weighted kNN classifier."""
    predicted = knn_predict(bank, bank_labels.to(bank.device), queries, num_classes, k, temperature, metric)
    return 100.0 * (predicted.cpu() == query_labels.cpu()).float().mean().item()


def knn_from_checkpoint(path: str, dataset: str | None = None, data_dir: str | None = None,
                        limit: int | None = None, k: int = 200, temperature: float = 0.1,
                        features: str = "backbone", metric: str = "cosine", device: str = "auto") -> dict:
    """Offline kNN of a checkpoint: bank = the training images it was trained on (or --dataset), queries = test."""
    if k < 1 or not temperature > 0:
        raise IdaaError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if features not in ("backbone", "projector"):
        raise IdaaError(f"--features must be backbone or projector, got {features!r}")
    dev = resolve_device(device)
    method, blob = load_method(path, dev)
    cfg = blob["config"]
    name = dataset or cfg["dataset"]
    root = data_dir if (dataset or data_dir) else cfg["data_dir"]
    train = load_dataset(name, root, split="train")
    limit = limit if limit is not None else (cfg.get("limit") if dataset is None else None)
    if limit is not None:
        train = train.take(min(limit, len(train)), seed=cfg.get("seed", 0))
    test = load_dataset(name, root, split="test")
    if train.image_size != blob["data"]["image_size"]:
        raise IdaaError(f"checkpoint was trained on {blob['data']['image_size']} px images, '{name}' has "
                        f"{train.image_size} px")
    view = build_view_policy("eval", train.image_size, train.mean, train.std).to(dev)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return method.embed_for_eval(x, features)

    bank = extract_features(embed, train.images, view, dev)
    queries = extract_features(embed, test.images, view, dev)
    classes = max(len(train.classes), int(train.labels.max()) + 1)
    top1 = knn_accuracy(bank, train.labels.to(dev), queries, test.labels, classes, k, temperature, metric)
    result = {"checkpoint": str(path), "dataset": name, "bank": len(train), "queries": len(test), "k": k,
              "temperature": temperature, "features": features, "metric": metric, "knn_top1": top1}
    (Path(path).parent / "eval_knn.json").write_text(json.dumps(result, indent=2))
    return result
