"""Linear evaluation and transfer of a pretraining checkpoint (SPEC 4): frozen backbone, cached features, eval.json.

`idaa eval linear` probes the checkpoint on its own dataset; `idaa eval transfer` runs the same protocol on
another one (Table 4/9 style), resizing its images on the device to the checkpoint's training size and
normalising them with the pretraining dataset's statistics, which is what the frozen network expects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idaa.checkpoints import CheckpointData, checkpoint_data, load_method
from idaa.data.options import StreamOptions
from idaa.data.protocol import Source
from idaa.data.sources import open_dataset
from idaa.data.unreadable import readable
from idaa.data.views import ViewPolicy, build_view_policy
from idaa.devices import resolve_device
from idaa.errors import IdaaError
from idaa.evaluate.features import Embed, FeatureCache, extract_features
from idaa.evaluate.linear import (
    VAL_FRACTION,
    LinearProbe,
    fit_augmented,
    holdout_split,
    select_and_fit,
    topk_accuracy,
)
from idaa.evaluate.results import write_result
from idaa.tracking import log_to_run

FEATURE_SOURCES = ("backbone", "projector")
AUGMENT_POLICY = "fixmatch-weak"  # flip + up to 12.5% pad-and-crop shift: the standard CIFAR supervised views


@dataclass
class LinearEvalOptions:
    """What `idaa eval linear|transfer` can set; None means the checkpoint's own value or the default."""

    dataset: str | None = None
    data_dir: str | None = None
    features: str = "backbone"
    limit: int | None = None
    device: str = "auto"
    seed: int = 0
    augment: bool = False
    epochs: int | None = None
    batch_size: int = 512
    progress: bool = True
    out: str | None = None
    cache: bool = True
    sources: StreamOptions | None = None  # --stream/--workers/--bad-images


def check_options(opts: LinearEvalOptions) -> None:
    """Bad flag values are one-line errors before anything is loaded."""
    if opts.features not in FEATURE_SOURCES:
        raise IdaaError(f"--features must be backbone or projector, got {opts.features!r}")
    for flag, value in (("--limit", opts.limit), ("--epochs", opts.epochs), ("--batch-size", opts.batch_size)):
        if value is not None and value < 1:
            raise IdaaError(f"{flag} must be >= 1, got {value}")
    if opts.epochs is not None and not opts.augment:
        raise IdaaError("--epochs applies to the augmented protocol only; add --augment (the default protocol "
                        "trains to convergence)")


def _labelled(data: Source, split: str) -> Source:
    if len(data) == 0 or bool((data.labels < 0).any()):
        raise IdaaError(f"linear evaluation needs labelled images; the {data.name} {split} split has unlabelled ones")
    return readable(data)  # under --bad-images skip without the files that do not decode


def transfer_tag(dataset: str, data_dir: str | None) -> str:
    """The name a transfer result goes by: the dataset, or for a `folder` dataset the folder's own name."""
    if dataset == "folder" and data_dir:
        return Path(data_dir).resolve().name or "folder"
    return dataset


def linear_eval(checkpoint: str, opts: LinearEvalOptions, transfer: bool = False) -> dict[str, Any]:
    """Linear evaluation (or transfer) of `checkpoint`; writes and returns the result record."""
    check_options(opts)
    if transfer and opts.dataset is None:
        raise IdaaError("eval transfer needs --dataset (and --data-dir unless it is digits)")
    started = time.perf_counter()
    dev = resolve_device(opts.device)
    method, blob = load_method(checkpoint, dev)
    if opts.features == "projector" and not hasattr(method, "projector"):
        raise IdaaError(f"method {method.name!r} has no projector; use --features backbone")
    cfg, meta = blob["config"], blob["data"]
    data = checkpoint_data(cfg, opts.dataset, opts.data_dir, opts.sources)
    name, data_dir, size = data.name, data.data_dir, int(meta["image_size"])
    train, test = _train_and_test(data, size, opts, transfer)
    num_classes = max(len(train.classes), int(train.labels.max()) + 1, int(test.labels.max()) + 1)
    eval_view = build_view_policy("eval", size, meta["mean"], meta["std"]).to(dev)
    view_key = {"policy": "eval", "image_size": size, "mean": list(meta["mean"]), "std": list(meta["std"])}
    tag = transfer_tag(name, data_dir) if transfer else None

    def embed(x: torch.Tensor) -> torch.Tensor:
        return method.embed_for_eval(x, opts.features)

    cache = FeatureCache(checkpoint, enabled=opts.cache)
    common = {"embed": embed, "source": opts.features, "view_fn": eval_view, "view": view_key, "device": dev,
              "data_dir": data_dir, "tag": tag, "batch_size": opts.batch_size, "progress": opts.progress}
    torch.manual_seed(opts.seed)
    if opts.augment:
        probe, protocol, train_time = _augmented_probe(embed, train, eval_view, size, meta, dev, num_classes, opts)
    else:
        train_feats = cache.get(data=train, split="train", **common)
        probe_start = time.perf_counter()
        probe, protocol = select_and_fit(train_feats.features, train.labels, num_classes, seed=opts.seed)
        train_time = {"extract_train_s": train_feats.seconds, "train_cache_hit": train_feats.hit,
                      "probe_s": time.perf_counter() - probe_start}
    test_feats = cache.get(data=test, split="test", **common)
    scores = topk_accuracy(probe.logits(test_feats.features), test.labels, (1, 5))  # the one look at the test set
    result = {
        "kind": "transfer" if transfer else "linear", "checkpoint": str(checkpoint),
        "checkpoint_sha256": cache.checkpoint_sha256, "method": cfg.get("method"),
        "adversary": cfg.get("adversary"), "pretrain_dataset": meta.get("name"), "dataset": name,
        "transfer_name": tag, "data_dir": data_dir, "features": opts.features,
        "feature_dim": int(test_feats.features.shape[1]), "train_images": len(train), "test_images": len(test),
        "num_classes": num_classes, "resized": train.image_size != size, "augment": opts.augment,
        "protocol": protocol, "linear_top1": scores[1], "linear_top5": scores[5],
        "times": {**train_time, "extract_test_s": test_feats.seconds, "test_cache_hit": test_feats.hit,
                  "total_s": time.perf_counter() - started, "device": str(dev)},
        "seed": opts.seed, "config": cfg,
    }
    out = Path(opts.out) if opts.out else Path(checkpoint).parent / (
        f"eval_transfer_{tag}.json" if transfer else "eval.json")
    write_result(out, result)
    prefix = f"eval/transfer_{tag}" if transfer else "eval/linear"  # to the run's trackers, if any
    log_to_run(Path(checkpoint).parent, {f"{prefix}_top1": scores[1], f"{prefix}_top5": scores[5]}, [out])
    result["out"] = str(out)
    return result


def _train_and_test(data: CheckpointData, size: int, opts: LinearEvalOptions,
                    transfer: bool) -> tuple[Source, Source]:
    """The labelled train (a seeded subset under --limit) and test splits; streamed images cropped to `size`."""
    train = _labelled(open_dataset(data.name, data.data_dir, "train", options=data.options, default_size=size), "train")
    test = _labelled(open_dataset(data.name, data.data_dir, "test", options=data.options, like=train), "test")
    if opts.limit is not None:
        train = train.take(min(opts.limit, len(train)), seed=opts.seed)
    if not transfer and train.image_size != size:
        raise IdaaError(f"checkpoint was trained on {size} px images and '{data.name}' has {train.image_size} px; "
                        "use `idaa eval transfer` to resize")
    return train, test


def _augmented_probe(embed: Embed, train: Source, eval_view: ViewPolicy, size: int, meta: dict[str, Any],
                     dev: torch.device, num_classes: int,
                     opts: LinearEvalOptions) -> tuple[LinearProbe, dict[str, Any], dict[str, Any]]:
    """The paper's protocol: fresh random crops/flips of every training image each epoch (no cache there)."""
    epochs = opts.epochs or 10
    aug_view = build_view_policy(AUGMENT_POLICY, size, meta["mean"], meta["std"]).to(dev)
    _, val_idx = holdout_split(train.labels, VAL_FRACTION, opts.seed)
    start = time.perf_counter()
    val_x = extract_features(embed, train.images[val_idx], eval_view, dev, opts.batch_size).cpu()
    val_s = time.perf_counter() - start

    def epoch_features(epoch: int) -> torch.Tensor:
        return extract_features(embed, train.images, aug_view, dev, opts.batch_size,
                                f"augmented epoch {epoch + 1}/{epochs}", opts.progress).cpu()

    start = time.perf_counter()
    probe, protocol = fit_augmented(epoch_features, train.labels, val_x, val_idx, num_classes, epochs,
                                    batch_size=min(opts.batch_size, 256), seed=opts.seed)
    protocol["policy"] = AUGMENT_POLICY
    times = {"extract_val_s": val_s, "extract_augmented_s": protocol["augmented_extraction_s"],
             "probe_s": protocol["probe_train_s"], "augmented_total_s": time.perf_counter() - start}
    return probe, protocol, times

