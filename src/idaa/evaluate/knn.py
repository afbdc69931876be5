"""Weighted kNN classifier on L2-normalised features (Wu et al. 2018): k=200, T=0.1 by default."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from idaa.checkpoints import CheckpointData, checkpoint_data, load_method
from idaa.data import Source, StreamOptions, build_view_policy, open_dataset, readable
from idaa.devices import resolve_device
from idaa.errors import IdaaError
from idaa.evaluate.features import FeatureCache, extract_features
from idaa.evaluate.results import write_result
from idaa.tracking import log_to_run

__all__ = ["extract_features", "knn_accuracy", "knn_from_checkpoint", "knn_predict"]


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
                        features: str = "backbone", metric: str = "cosine", device: str = "auto",
                        out: str | None = None, progress: bool = False, cache: bool = True,
                        sources: StreamOptions | None = None) -> dict:
    """Offline kNN of a checkpoint: bank = the training images it was trained on (or --dataset), queries = test.

    Features come from the run folder's feature cache (shared with linear evaluation) when it matches.
    """
    _check_arguments(k, temperature, features, metric, limit)
    dev = resolve_device(device)
    method, blob = load_method(path, dev)
    if features == "projector" and not hasattr(method, "projector"):
        raise IdaaError(f"method {method.name!r} has no projector; use --features backbone")
    cfg, meta = blob["config"], blob["data"]
    data = checkpoint_data(cfg, dataset, data_dir, sources)
    train, test = _bank_and_queries(data, cfg, meta, limit if limit is not None else
                                    (cfg.get("limit") if dataset is None else None))
    view = build_view_policy("eval", train.image_size, meta["mean"], meta["std"]).to(dev)
    view_key = {"policy": "eval", "image_size": train.image_size, "mean": list(meta["mean"]),
                "std": list(meta["std"])}

    def embed(x: torch.Tensor) -> torch.Tensor:
        return method.embed_for_eval(x, features)

    store = FeatureCache(path, enabled=cache)
    common = {"embed": embed, "source": features, "view_fn": view, "view": view_key, "device": dev,
              "data_dir": data.data_dir, "progress": progress}
    bank = store.get(data=train, split="train", **common)
    queries = store.get(data=test, split="test", **common)
    classes = max(len(train.classes), int(train.labels.max()) + 1)
    top1 = knn_accuracy(bank.features.to(dev), train.labels.to(dev), queries.features.to(dev), test.labels, classes,
                        k, temperature, metric)
    result = {"kind": "knn", "checkpoint": str(path), "checkpoint_sha256": store.checkpoint_sha256,
              "method": cfg.get("method"), "adversary": cfg.get("adversary"), "dataset": data.name,
              "bank": len(train), "queries": len(test), "k": k, "temperature": temperature, "features": features,
              "metric": metric, "knn_top1": top1,
              "times": {"extract_bank_s": bank.seconds, "bank_cache_hit": bank.hit,
                        "extract_queries_s": queries.seconds, "queries_cache_hit": queries.hit},
              "config": cfg}
    target = Path(out) if out else Path(path).parent / "eval_knn.json"
    write_result(target, result)
    log_to_run(Path(path).parent, {"eval/knn_top1": top1}, [target])  # the run's trackers, if any
    result["out"] = str(target)
    return result


def _check_arguments(k: int, temperature: float, features: str, metric: str, limit: int | None) -> None:
    """Bad flag values are one-line errors before the checkpoint is read."""
    if k < 1 or not temperature > 0:
        raise IdaaError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if features not in ("backbone", "projector"):
        raise IdaaError(f"--features must be backbone or projector, got {features!r}")
    if metric not in ("cosine", "euclidean"):
        raise IdaaError(f"--metric must be cosine or euclidean, got {metric!r}")
    if limit is not None and limit < 1:
        raise IdaaError(f"--limit must be >= 1, got {limit}")


def _bank_and_queries(data: CheckpointData, cfg: dict, meta: dict, limit: int | None) -> tuple[Source, Source]:
    """The labelled training images (a seeded subset under `limit`) and test images, at the checkpoint's size."""
    size = meta["image_size"]
    train = open_dataset(data.name, data.data_dir, split="train", options=data.options, default_size=size)
    if limit is not None:
        train = train.take(min(limit, len(train)), seed=cfg.get("seed", 0))
    test = open_dataset(data.name, data.data_dir, split="test", options=data.options, like=train)
    train, test = readable(train), readable(test)
    if train.image_size != size:
        raise IdaaError(f"checkpoint was trained on {size} px images, '{data.name}' has {train.image_size} px")
    if bool((train.labels < 0).any()) or bool((test.labels < 0).any()):
        raise IdaaError(f"kNN needs labelled images; the {data.name} data has unlabelled ones")
    return train, test
