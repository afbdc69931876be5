"""`idaa demo`: the IDAA story on the embedded digits data in a few minutes on a laptop CPU.

A VAE splits views into G(x) and R(x); SimCLR trains alone, with IDAA and with CLAE; then the kNN table, the
augmentation gallery (Fig. 4), the identity-preservation diagnostic (Fig. 1b/1c), time-to-accuracy (Table 11) and a
2-d map of the IDAA model's test features.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from idaa.adversaries import IDAA
from idaa.analysis import diagnose, embed, gallery, time_to_accuracy
from idaa.analysis.setup import load_attack_setup
from idaa.data.memory import load_dataset
from idaa.data.views import build_view_policy
from idaa.devices import resolve_device
from idaa.nets import load_vae
from idaa.train.config import resolve_config
from idaa.train.pretrain import pretrain
from idaa.train.vae_trainer import VAETrainConfig, train_vae

# A protocol sized for a laptop CPU: ResNet-18 at width 16, batch 128, Adam 1e-3 with cosine decay.
PROTOCOL = {"dataset": "digits", "backbone": "resnet18-cifar", "width": 16, "batch_size": 128, "lr": 1e-3,
            "knn_k": 50}
ADVERSARIES = ("none", "idaa", "clae")


def run_demo(out: str, vae_epochs: int = 10, epochs: int = 10, device: str = "auto", seed: int = 0,
             progress: bool = True) -> list[dict]:
    """The whole story in a few minutes; returns the kNN table rows."""
    root = Path(out)
    if root.exists():
        shutil.rmtree(root)  # the demo folder is scratch space, rebuilt on every run
    start = time.perf_counter()
    vae_path = root / "vae" / "vae.pt"
    print("1. Training the identity-disentangling VAE on digits (1438 train images, 32 px) ...")
    vae_result = train_vae(VAETrainConfig(out=str(root / "vae"), dataset="digits", latent_dim=64, hidden=64,
                                          epochs=vae_epochs, batch_size=64, seed=seed, device=device,
                                          progress=progress))
    print(f"   held-out reconstruction MSE {vae_result['test_mse']:.4f} (relative to the views' variance "
          f"{vae_result['test_relative_mse']:.3f}), KL {vae_result['test_kl']:.4f}")
    _show_decomposition(vae_path, device, seed)

    rows = []
    for adversary in ADVERSARIES:
        print(f"{len(rows) + 3}. SimCLR with adversary '{adversary}' for {epochs} epochs ...")
        cfg = resolve_config(PROTOCOL, {"out": str(root / f"simclr-{adversary}"), "adversary": adversary,
                                        "vae": str(vae_path), "epochs": epochs, "knn_every": max(epochs // 5, 1),
                                        "seed": seed, "device": device})
        began = time.perf_counter()
        result = pretrain(cfg, progress=progress)
        rows.append({"run": f"simclr + {adversary}", "knn_top1": result["knn_top1"],
                     "seconds": time.perf_counter() - began})

    print("\n| run | kNN top-1 (%) | wall time (s) |\n| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['run']} | {row['knn_top1']:.2f} | {row['seconds']:.0f} |")
    paths = _explain(root, vae_path, device, seed)
    print(f"\nDone in {time.perf_counter() - start:.0f} s. Runs are in {root}/ (vae/, simclr-none/, simclr-idaa/, "
          "simclr-clae/: config.yaml, metrics.jsonl, last.ckpt). Figures:")
    for what, path in paths:
        print(f"  {what:<42} {path}")
    return rows


def _explain(root: Path, vae_path: Path, device: str, seed: int) -> list[tuple[str, Path]]:
    """Gallery, identity diagnostic and time-to-accuracy on the demo's runs; returns (what, path) pairs."""
    step = len(ADVERSARIES) + 3
    print(f"\n{step}. Augmentation gallery (Fig. 4) of the SimCLR+IDAA model ...")
    shown = gallery.make_gallery(load_attack_setup(str(root / "simclr-idaa" / "last.ckpt"), str(vae_path),
                                                   device=device, seed=seed), root / "gallery.png", seed=seed)
    print(f"   mean |x' - A(x)| per pixel: IDAA {shown['mean_abs_change']['idaa']:.4f}, CLAE "
          f"{shown['mean_abs_change']['clae']:.4f} (eps {shown['eps']['idaa']:g} latent, {shown['eps']['clae']:g} "
          "pixels)")
    print(f"{step + 1}. Identity-preservation diagnostic (Fig. 1b/1c) on the plain SimCLR model, attacks applied "
          "to the random positive ...")
    setup = load_attack_setup(str(root / "simclr-none" / "last.ckpt"), str(vae_path), device=device, seed=seed)
    result = diagnose.run_diagnostic(setup, n=512, attack_view="v2", seed=seed)
    png, _ = diagnose.write_diagnostic(result, root / "diagnose")
    print(diagnose.format_table(result))
    print(f"{step + 2}. Time to accuracy (Table 11) ...")
    curves = time_to_accuracy.time_to_accuracy([str(root / f"simclr-{a}") for a in ADVERSARIES],
                                               root / "time_to_accuracy.png")
    print(time_to_accuracy.format_table(curves))
    print(f"{step + 3}. Embedding map of the SimCLR+IDAA model's test features ...")
    mapped = embed.embed_map(root / "simclr-idaa" / "last.ckpt", out=root, device=device, seed=seed)
    return [("VAE x / G(x) / R(x):", root / "vae" / "reconstructions.png"),
            ("VAE report (error, KL per dimension):", root / "vae" / "vae_report.png"),
            ("augmentation gallery (Fig. 4):", root / "gallery.png"),
            ("identity diagnostic (Fig. 1b/1c):", png),
            ("time to accuracy (Table 11):", Path(curves["png"])),
            (f"embedding map ({mapped['method']}, IDAA run):", Path(mapped["png"]))]


def _show_decomposition(vae_path: Path, device: str, seed: int) -> None:
    """Print the size of x = G(x) + R(x) on a batch of SimCLR views."""
    dev = resolve_device(device)
    torch.manual_seed(seed)
    data = load_dataset("digits", split="test")
    views = build_view_policy("simclr", data.image_size, data.mean, data.std)(data.images[:256].to(dev))
    generated, residual = IDAA(load_vae(vae_path, map_location=dev)).decompose(views)
    share = (residual.pow(2).sum() / views.pow(2).sum()).item()
    gap = (generated + residual - views).abs().max().item()
    print(f"2. x = G(x) + R(x) on 256 SimCLR views: max |G + R - x| = {gap:.1e}; "
          f"the identity residual R carries {100 * share:.1f}% of the views' energy")
