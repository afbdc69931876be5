"""Control: x' is a third random view of the source images, with no adversary at all."""

from __future__ import annotations

from collections.abc import Callable

import torch

from idaa.adversaries.base import Adversary, LossFn
from idaa.errors import IdaaError


class RandomView(Adversary):
    """Same 3-view objective and dual BN as IDAA, but x' = A(source): separates the extra view's gain."""

    name = "random-view"

    def __init__(self, view_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.view_fn = view_fn

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, loss_fn: LossFn, source: torch.Tensor | None = None) -> torch.Tensor:
        if source is None:
            raise IdaaError("random-view needs the uint8 source batch: call perturb(x, loss_fn, source=images)")
        view = self.view_fn(source)
        if view.shape != x.shape:
            raise IdaaError(f"random-view made views of shape {tuple(view.shape)}, expected {tuple(x.shape)}")
        return view
