"""The online kNN monitor of pretraining: the training images (eval view) as the bank, the test split as queries."""

from __future__ import annotations

import torch

from idaa.data.datasets import ImageDataset
from idaa.data.views import build_view_policy
from idaa.evaluate.knn import extract_features, knn_accuracy
from idaa.methods import Method
from idaa.train.config import PretrainConfig

__all__ = ["KNNMonitor"]


class KNNMonitor:
    """Online kNN accuracy: training images (eval view) as the bank, the test split as queries."""

    def __init__(self, train: ImageDataset, test: ImageDataset, cfg: PretrainConfig, device: torch.device) -> None:
        self.train, self.test, self.cfg, self.device = train, test, cfg, device
        self.view = build_view_policy("eval", train.image_size, train.mean, train.std).to(device)
        self.num_classes = max(len(train.classes), int(train.labels.max()) + 1)

    def __call__(self, method: Method) -> float:
        was_training = method.training
        method.eval()
        bank = extract_features(method.embed_for_eval, self.train.images, self.view, self.device)
        queries = extract_features(method.embed_for_eval, self.test.images, self.view, self.device)
        method.train(was_training)
        return knn_accuracy(bank, self.train.labels.to(self.device), queries, self.test.labels, self.num_classes,
                            self.cfg.knn_k, self.cfg.knn_temperature)
