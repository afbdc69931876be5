"""IDAA in your own LightningModule: mix in `IDAAMixin`, call `configure_idaa` once, return `idaa_loss` from
`training_step`::

    class SimCLR(IDAAMixin, L.LightningModule):
        def __init__(self, vae):
            super().__init__()
            self.backbone, self.projector = ..., ...
            self.configure_idaa(IDAA(vae, eps=0.15))

        def forward(self, x):
            return self.projector(self.backbone(x))

        def training_step(self, batch, batch_idx):
            v1, v2 = augment(batch), augment(batch)
            return self.idaa_loss(self, nt_xent, v1, v2)     # nt_xent(self(v1), self(v2)) + alpha * L(v1, x')

Needs Lightning (`pip install 'idaa[lightning]'`); see `idaa.integrations.term` for what happens inside.
"""

from __future__ import annotations

import torch
from torch import nn

from idaa.adversaries.base import Adversary
from idaa.errors import IdaaError
from idaa.integrations.term import AdversarialTerm, Criterion, TermLosses

try:
    import lightning.pytorch as pl
except ImportError as exc:  # an extra, never a core dependency
    raise ImportError("idaa.integrations.lightning needs Lightning: pip install 'idaa[lightning]'") from exc


class IDAAMixin:
    """Adds the IDAA term to a LightningModule; the adversary (and its frozen VAE) is kept out of the module's
    parameters, state_dict and train()/eval() switches, and follows the batch's device."""

    idaa_term: AdversarialTerm
    idaa_last: TermLosses | None = None  # the last step's losses and x' (for inspection and tests)

    def configure_idaa(self, adversary: Adversary, alpha: float = 1.0, attack_loss: str = "symmetric",
                       temperature: float = 0.5) -> None:
        """Call once in __init__ (after super().__init__()): which adversary, its weight alpha, the attack loss."""
        if not isinstance(self, pl.LightningModule):
            raise IdaaError(f"IDAAMixin goes with a LightningModule: class {type(self).__name__}(IDAAMixin, "
                            "L.LightningModule)")
        self.idaa_term = AdversarialTerm(adversary, alpha, attack_loss, temperature)

    def idaa_loss(self, model: nn.Module, criterion: Criterion, v1: torch.Tensor, v2: torch.Tensor,
                  source: torch.Tensor | None = None) -> torch.Tensor:
        """criterion(model(v1), model(v2)) + alpha * criterion(model(v1), model(x')); logs both parts."""
        if getattr(self, "idaa_term", None) is None:
            raise IdaaError("call self.configure_idaa(adversary) in __init__ before self.idaa_loss(...)")
        losses = self.idaa_term(model, criterion, v1, v2, source)
        self.idaa_last = TermLosses(losses.total.detach(), losses.clean.detach(), losses.adversarial.detach(),
                                    losses.x_adv)  # detached: holding the graph would keep a step's activations
        if getattr(self, "_trainer", None) is not None:  # also usable in a bare call, as in tests
            self.log_dict({"idaa/clean_loss": losses.clean.detach(), "idaa/adversarial_loss":
                           losses.adversarial.detach()}, batch_size=len(v1))
        return losses.total
