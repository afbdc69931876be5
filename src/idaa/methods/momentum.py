"""Methods with a momentum (EMA) encoder: BYOL (Grill et al. 2020) and MoCo v2 (He et al. 2020; Chen et al. 2020).

The target/key encoder is a frozen copy updated in `after_step`, from the online weights only; the MoCo queue
receives the keys of the clean views only, after the step, so the attack and the adversarial term never see
their own keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from idaa.adversaries.base import LossFn
from idaa.distributed import gather_no_grad
from idaa.errors import IdaaError
from idaa.losses import moco_info_nce, negative_cosine
from idaa.methods.base import Method, State, check_attack_mode, check_positive, cosine_momentum, ema_update, frozen_copy
from idaa.nets.heads import MLPHead
from idaa.nets.resnet import Backbone


def _check_tau(tau: float, method: str) -> float:
    if not 0 <= tau <= 1:
        raise IdaaError(f"{method} option base_tau must be in [0, 1], got {tau}")
    return tau


class BYOL(Method):
    """Online backbone + projector + predictor regress the EMA target's projection; loss 2 - 2 cos, symmetric.

    tau rises from `base_tau` (0.996) to 1 along a cosine. Attack: maximise 2 - 2 cos(p(x~), target(v1)).
    The adversarial term is the same symmetric loss between v1 and x' (the target sees x' through its
    adversarial BN, without gradient).
    """

    name = "byol"
    view_policy = "simclr"
    batch_state_keys = ("p1", "t1")

    def __init__(self, backbone: Backbone, temperature: float | None = None, attack_loss: str = "anchored",
                 proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096,
                 base_tau: float = 0.996) -> None:
        super().__init__(backbone)
        check_attack_mode(attack_loss, ("anchored",), self.name)
        self.projector = MLPHead([backbone.out_dim, proj_hidden, proj_dim])
        self.predictor = MLPHead([proj_dim, pred_hidden, proj_dim])
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)
        self.base_tau = _check_tau(base_tau, self.name)

    def _online(self, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x, adv=adv)))

    @torch.no_grad()
    def _target(self, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x, adv=adv))

    @staticmethod
    def regression(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 2 + 2 * negative_cosine(p, t)

    def clean_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, State]:
        p1, p2 = self._online(v1), self._online(v2)
        t1, t2 = self._target(v1), self._target(v2)
        return (self.regression(p1, t2) + self.regression(p2, t1)) / 2, {"p1": p1, "t1": t1}

    def attack_loss(self, state: State) -> LossFn:
        return lambda x: self.regression(self._online(x, adv=True), state["t1"])

    def clean_attack_value(self, state: State) -> torch.Tensor:
        return self.regression(state["p1"], state["t1"])

    def adversarial_loss(self, state: State, x_adv: torch.Tensor) -> torch.Tensor:
        p = self._online(x_adv, adv=True)
        t = self._target(x_adv, adv=True)
        return (self.regression(state["p1"], t) + self.regression(p, state["t1"])) / 2

    def after_step(self, progress: float) -> None:
        tau = cosine_momentum(self.base_tau, progress)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)


class MoCo(Method):
    """MoCo v2: query encoder + MLP head (no BN), EMA key encoder (tau 0.99), a queue of negatives, tau 0.2.

    The loss is symmetrised over the two views (as solo-learn and most CIFAR recipes do) and both views' keys
    are enqueued. Attack: maximise the InfoNCE of q(x~) against the clean key k(v1) and the queue; the
    adversarial term is the same loss for q(x').
    """

    name = "moco"
    view_policy = "simclr"
    batch_state_keys = ("q1", "k1")

    def __init__(self, backbone: Backbone, temperature: float | None = None, attack_loss: str = "anchored",
                 proj_hidden: int = 2048, proj_dim: int = 128, queue_size: int = 4096,
                 base_tau: float = 0.99) -> None:
        super().__init__(backbone)
        check_attack_mode(attack_loss, ("anchored",), self.name)
        self.temperature = check_positive("temperature", temperature or 0.2, self.name)
        if not isinstance(queue_size, int) or queue_size < 1:
            raise IdaaError(f"moco option queue_size must be an integer >= 1, got {queue_size!r}")
        self.projector = MLPHead([backbone.out_dim, proj_hidden, proj_dim], bn=False)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.base_tau = _check_tau(base_tau, self.name)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None

    def _query(self, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
        return self.projector(self.backbone(x, adv=adv))

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(self.key_backbone(x)), dim=1)

    def clean_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, State]:
        q1, q2 = self._query(v1), self._query(v2)
        k1, k2 = self._key(v1), self._key(v2)
        queue = self.queue.clone()
        loss = (moco_info_nce(q1, k2, queue, self.temperature) + moco_info_nce(q2, k1, queue, self.temperature)) / 2
        if self.training:  # every rank enqueues every rank's keys, so the queues stay identical
            self._pending = gather_no_grad(torch.cat([k1, k2]))
        return loss, {"q1": q1, "k1": k1, "queue": queue}

    def attack_loss(self, state: State) -> LossFn:
        return lambda x: moco_info_nce(self._query(x, adv=True), state["k1"], state["queue"], self.temperature)

    def clean_attack_value(self, state: State) -> torch.Tensor:
        return moco_info_nce(state["q1"], state["k1"], state["queue"], self.temperature)

    def adversarial_loss(self, state: State, x_adv: torch.Tensor) -> torch.Tensor:
        return moco_info_nce(self._query(x_adv, adv=True), state["k1"], state["queue"], self.temperature)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` at the queue pointer (wrapping around) and advance it."""
        size = len(self.queue)
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def after_step(self, progress: float) -> None:
        ema_update(self.key_backbone, self.backbone, self.base_tau)
        ema_update(self.key_projector, self.projector, self.base_tau)
        if self._pending is not None:
            self.enqueue(self._pending)
            self._pending = None
