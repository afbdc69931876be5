"""The online kNN monitor of pretraining: the training images (eval view) as the bank, the test split as queries.

Under DDP the work is shared instead of left to rank 0: each rank embeds a disjoint part of the bank and of
the queries, the bank's features and labels are all-gathered, each rank scores its own queries against the
whole bank, and the correct counts are summed. Embedding is per image (eval-mode BN), so the accuracy is the
one a single process gets. Every rank must call the monitor.
"""

from __future__ import annotations

import torch

from idaa import distributed as dist
from idaa.data.protocol import Source
from idaa.data.views import build_view_policy
from idaa.errors import IdaaError
from idaa.evaluate.knn import knn_predict
from idaa.methods import Method
from idaa.train.config import PretrainConfig

__all__ = ["KNNMonitor"]

BATCH = 512


class KNNMonitor:
    """Online kNN accuracy: training images (eval view) as the bank, the test split as queries.

    `train` and `test` are any `Source` (in memory, streamed or shards): each rank embeds its disjoint share,
    `labelled_share(rank, world, batch_size, workers)`.
    """

    def __init__(self, train: Source, test: Source, cfg: PretrainConfig, device: torch.device,
                 workers: int = 0) -> None:
        self.train, self.test, self.cfg, self.device, self.workers = train, test, cfg, device, workers
        self.view = build_view_policy("eval", train.image_size, train.mean, train.std).to(device)
        self.num_classes = max(len(train.classes), int(train.labels.max()) + 1)

    @torch.no_grad()
    def __call__(self, method: Method) -> float:
        """Top-1 kNN accuracy in percent, the same on every rank."""
        was_training = method.training
        method.eval()
        try:
            bank, bank_labels = self._embed(method, self.train)
            queries, query_labels = self._embed(method, self.test)
        finally:
            method.train(was_training)
        bank, bank_labels = dist.gather_rows(bank), dist.gather_rows(bank_labels)
        if len(bank) == 0:
            raise IdaaError("the kNN bank is empty: no training image reached the monitor")
        predicted = knn_predict(bank, bank_labels, queries, self.num_classes, self.cfg.knn_k,
                                self.cfg.knn_temperature) if len(queries) else query_labels
        counts = torch.tensor([int((predicted == query_labels).sum()), len(query_labels)], device=self.device)
        correct, total = dist.sum_over_ranks(counts).tolist()
        return 100.0 * correct / max(total, 1)

    def _embed(self, method: Method, split: Source) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (float, on the device) and labels of this rank's share of `split`."""
        features, labels = [], []
        for images, targets in split.labelled_share(dist.rank(), dist.world_size(), BATCH, self.workers):
            features.append(method.embed_for_eval(self.view(images.to(self.device, non_blocking=True))).float())
            labels.append(targets.to(self.device))
        if not features:  # a rank without images still joins the gathers, with zero rows of the right width
            width = method.embed_for_eval(self.view(torch.zeros(1, 3, split.image_size, split.image_size,
                                                                dtype=torch.uint8, device=self.device))).shape[1]
            return torch.zeros(0, width, device=self.device), torch.zeros(0, dtype=torch.int64, device=self.device)
        return torch.cat(features), torch.cat(labels)
