"""`idaa demo`: the library core on the embedded digits data (VAE, decomposition, IDAA vs CLAE attacks)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from idaa.adversaries import CLAE, IDAA
from idaa.data.datasets import load_dataset
from idaa.data.views import build_view_policy
from idaa.nets import MLPHead, build_backbone, load_vae
from idaa.train.run_dir import resolve_device
from idaa.train.vae_trainer import VAETrainConfig, train_vae


def run_demo(out: str, vae_epochs: int = 15, device: str = "auto", seed: int = 0, progress: bool = True) -> None:
    """Train a VAE on digits, split views into G and R, and show that both attacks raise a contrastive loss."""
    root = Path(out)
    if root.exists():
        shutil.rmtree(root)  # the demo folder is scratch space, rebuilt on every run
    start = time.perf_counter()
    print("1. Training the identity-disentangling VAE on the embedded digits data ...")
    result = train_vae(VAETrainConfig(out=str(root / "vae"), dataset="digits", latent_dim=64, hidden=64,
                                      epochs=vae_epochs, batch_size=64, seed=seed, device=device,
                                      progress=progress))
    print(f"   held-out reconstruction MSE {result['test_mse']:.4f} (relative to the views' variance: "
          f"{result['test_relative_mse']:.3f}), KL {result['test_kl']:.4f}")

    dev = resolve_device(device)
    torch.manual_seed(seed)
    data = load_dataset("digits", split="test")
    vae = load_vae(root / "vae" / "vae.pt", map_location=dev)
    views = build_view_policy("simclr", data.image_size, data.mean, data.std)(data.images[:256].to(dev))
    idaa, clae = IDAA(vae, eps=0.15), CLAE(eps=0.03)
    generated, residual = idaa.decompose(views)
    share = (residual.pow(2).sum() / views.pow(2).sum()).item()
    print(f"2. Decomposition x = G(x) + R(x): max |G + R - x| = {(generated + residual - views).abs().max():.2e}; "
          f"R carries {100 * share:.1f}% of the views' energy")

    backbone = build_backbone("resnet18-cifar", width=16).to(dev).eval()
    head = MLPHead([backbone.out_dim, 128, 64]).to(dev).eval()
    with torch.no_grad():
        anchors = F.normalize(head(backbone(views)), dim=1)

    def attack_loss(images: torch.Tensor) -> torch.Tensor:
        z = F.normalize(head(backbone(images, adv=True)), dim=1)
        return F.cross_entropy(z @ anchors.T / 0.5, torch.arange(len(z), device=z.device))

    print("3. Anchored InfoNCE of a ResNet-18 (width 16, untrained; SSL pretraining arrives with `idaa pretrain`):")
    with torch.no_grad():
        base = attack_loss(views).item()
    for name, adversary in (("IDAA eps=0.15 (latent)", idaa), ("CLAE eps=0.03 (pixels)", clae)):
        x_adv = adversary.perturb(views, attack_loss)
        with torch.no_grad():
            raised = attack_loss(x_adv).item()
        change = (x_adv - views).abs().mean().item()
        print(f"   {name:24s} loss {base:.4f} -> {raised:.4f}   mean |x' - x| = {change:.4f}")
    print(f"Done in {time.perf_counter() - start:.0f} s. Outputs: {root / 'vae' / 'vae.pt'}, "
          f"{root / 'vae' / 'metrics.jsonl'}, {root / 'vae' / 'reconstructions.png'}")
