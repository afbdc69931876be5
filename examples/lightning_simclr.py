"""SimCLR as your own LightningModule, with IDAA added by `idaa.integrations.lightning` (lines marked `# IDAA`).

    pip install 'idaa[lightning]'
    python examples/lightning_simclr.py --vae runs/demo/vae/vae.pt --steps 100

Without --vae a randomly initialised (untrained) VAE is used, which only shows the mechanics.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from idaa import IDAA, VAE, MLPHead, build_backbone, load_vae
from idaa.adversaries import Adversary
from idaa.data.memory import load_dataset
from idaa.data.views import build_view_policy
from idaa.integrations.lightning import IDAAMixin
from idaa.losses import nt_xent


class SimCLR(IDAAMixin, L.LightningModule):
    """A plain SimCLR module; with an adversary, its loss gains alpha * NT-Xent(v1, x')."""

    def __init__(self, adversary: Adversary | None, image_size: int, mean: Sequence[float], std: Sequence[float],
                 width: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        self.backbone = build_backbone("resnet18-cifar", width=width)  # dual BN built in
        self.projector = MLPHead([self.backbone.out_dim, 128, 64])
        self.augment = build_view_policy("simclr", image_size, mean, std)  # batched views on the module's device
        self.lr = lr
        if adversary is not None:
            self.configure_idaa(adversary, alpha=1.0)  # IDAA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (images,) = batch
        v1, v2 = self.augment(images), self.augment(images)
        if getattr(self, "idaa_term", None) is None:
            loss = nt_xent(self(v1), self(v2))
        else:
            loss = self.idaa_loss(self, nt_xent, v1, v2)  # IDAA: NT-Xent(v1, v2) + alpha * NT-Xent(v1, x')
        self.log("loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train for --steps steps on digits; returns the last step's losses."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default=None, help="a trained vae.pt (idaa vae train); default: an untrained one")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 base width")
    parser.add_argument("--eps", type=float, default=0.15)
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    data = load_dataset("digits")
    vae = load_vae(args.vae) if args.vae else VAE(data.image_size, latent_dim=64, hidden=32)  # IDAA
    model = SimCLR(IDAA(vae, eps=args.eps), data.image_size, data.mean, data.std, width=args.width)  # IDAA
    loader = DataLoader(TensorDataset(data.images), batch_size=args.batch_size, shuffle=True, drop_last=True)
    trainer = L.Trainer(max_steps=args.steps, accelerator=args.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(model, loader)
    last = model.idaa_last
    result = {"steps": float(trainer.global_step), "loss": float(last.total), "clean_loss": float(last.clean),
              "adversarial_loss": float(last.adversarial)}
    print(f"{trainer.global_step} steps: loss {result['loss']:.4f} = clean {result['clean_loss']:.4f} "
          f"+ adversarial {result['adversarial_loss']:.4f}")
    return result


if __name__ == "__main__":
    main()
