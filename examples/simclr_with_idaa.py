"""IDAA dropped into a hand-written PyTorch SimCLR loop: the only IDAA-specific lines are marked `# IDAA`.

    python examples/simclr_with_idaa.py --vae runs/demo/vae/vae.pt --steps 100

Without --vae a randomly initialised (untrained) VAE is used, which only shows the mechanics.
"""

import argparse

import torch
import torch.nn.functional as F

from idaa import IDAA, VAE, MLPHead, build_backbone, load_vae
from idaa.data.memory import load_dataset
from idaa.data.views import build_view_policy


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """SimCLR's symmetric NT-Xent loss."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, targets)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vae", default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    data = load_dataset("digits")
    augment = build_view_policy("simclr", data.image_size, data.mean, data.std)
    backbone = build_backbone("resnet18-cifar", width=16)
    projector = MLPHead([backbone.out_dim, 128, 64])
    params = list(backbone.parameters()) + list(projector.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    vae = load_vae(args.vae) if args.vae else VAE(data.image_size, latent_dim=64, hidden=32)  # IDAA
    adversary = IDAA(vae, eps=0.15)  # IDAA

    for step in range(args.steps):
        images = data.images[torch.randint(len(data), (args.batch_size,))]
        v1, v2 = augment(images), augment(images)
        z1, z2 = projector(backbone(v1)), projector(backbone(v2))
        loss = nt_xent(z1, z2)

        anchors = F.normalize(z1.detach(), dim=1)  # IDAA: the paper's anchored attack loss

        def attack_loss(x: torch.Tensor, anchors: torch.Tensor = anchors) -> torch.Tensor:  # IDAA
            z = F.normalize(projector(backbone(x, adv=True)), dim=1)
            return F.cross_entropy(z @ anchors.T / 0.5, torch.arange(len(z)))

        x_adv = adversary.perturb(v1, attack_loss)  # IDAA: x' = R(v1) + D(mu(v1) + delta)
        loss = loss + nt_xent(z1, projector(backbone(x_adv, adv=True)))  # IDAA: the adversarial view's term

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
