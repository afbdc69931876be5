"""The labelled/unlabelled split of semi-supervised training: seeded, class-balanced, disjoint, saved with the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from idaa.errors import IdaaError
from idaa.train.run_dir import atomic_write_bytes

SPLIT_FILE = "labelled_indices.json"


def class_balanced_split(labels: torch.Tensor, n_labels: int, num_classes: int,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labelled, unlabelled) sorted index tensors: n_labels / num_classes images of every class are labelled.

    FixMatch's protocol (40/250/4000 labels on CIFAR-10): the same number of labels per class, drawn with a
    seeded generator so a supervised baseline can train on exactly the same images; the rest is unlabelled.
    """
    labels = torch.as_tensor(labels).to(torch.int64).cpu()
    if bool((labels < 0).any()):
        raise IdaaError("semi-supervised training needs a fully labelled training split (found unlabelled images)")
    if isinstance(n_labels, bool) or not isinstance(n_labels, int) or n_labels < 1:
        raise IdaaError(f"--labels must be a positive integer, got {n_labels!r}")
    if n_labels < num_classes:
        raise IdaaError(f"--labels {n_labels} is fewer than the {num_classes} classes: every class needs a label")
    if n_labels % num_classes:
        raise IdaaError(f"--labels {n_labels} must be a multiple of the number of classes ({num_classes}) so "
                        "every class gets the same number of labels")
    if n_labels >= len(labels):
        raise IdaaError(f"--labels {n_labels} leaves no unlabelled images: the training set has {len(labels)}")
    per_class = n_labels // num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < per_class:
            raise IdaaError(f"class {c} has {len(members)} training images, fewer than the {per_class} labels per "
                            f"class that --labels {n_labels} asks for")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    labelled = torch.sort(torch.cat(chosen)).values
    is_unlabelled = torch.ones(len(labels), dtype=torch.bool)
    is_unlabelled[labelled] = False
    return labelled, is_unlabelled.nonzero().squeeze(1)


def save_split(path: str | Path, labelled: torch.Tensor, unlabelled: torch.Tensor, meta: dict[str, Any]) -> None:
    """Write the labelled indices (into the training split) and what they were drawn from, atomically."""
    record = {**meta, "num_labelled": len(labelled), "num_unlabelled": len(unlabelled),
              "labelled": [int(i) for i in labelled]}
    text = json.dumps(record, indent=1).encode()
    atomic_write_bytes(Path(path), lambda handle: handle.write(text))

