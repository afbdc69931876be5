"""How far the bf16 VAE (`--vae-precision bf16`) moves x' from the fp32 one, and how much faster it is.

Usage: python benchmarks/vae_precision.py --vae runs/vae-cifar10-10k/vae.pt --data-dir .cache/data/cifar10_jpg
       [--batch-size 256] [--batches 4] [--eps 0.1]

On real views of the VAE's dataset, the FGSM IDAA step is taken from the same input gradient (a random
direction, fixed per batch) with the VAE in fp32 and in bf16; the table gives the difference of x' against
the spread of x' itself and against the size of the attack's own change x' - x, plus the time of the VAE's
four passes (interleaved, median). The accuracy of a run with bf16 is measured by the reproduce grid.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from idaa.adversaries import IDAA
from idaa.data.memory import load_dataset
from idaa.data.views import build_view_policy
from idaa.nets import load_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset(args.dataset, args.data_dir)
    views = build_view_policy("simclr", data.images.shape[-1], data.mean, data.std)
    exact, fast = load_vae(args.vae), load_vae(args.vae).set_precision("bf16")
    attacks = {"fp32": IDAA(exact, eps=args.eps), "bf16": IDAA(fast, eps=args.eps)}
    rows: dict[str, list[float]] = {"max abs(dx')": [], "mean abs(dx') / std(x')": [],
                                    "mean abs(dx') / mean abs(x' - x)": [], "latent steps with another sign (%)": []}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for b in range(args.batches):
        x = views(data.images[b * args.batch_size:(b + 1) * args.batch_size])
        grad = torch.randn_like(x)
        out = {}
        for name, attack in attacks.items():
            start = time.perf_counter()
            out[name] = attack.perturb_from_gradient(x, grad)
            times[name].append(time.perf_counter() - start)
        diff = (out["bf16"] - out["fp32"]).abs()
        rows["max abs(dx')"].append(diff.max().item())
        rows["mean abs(dx') / std(x')"].append((diff.mean() / out["fp32"].std()).item())
        rows["mean abs(dx') / mean abs(x' - x)"].append((diff.mean() / (out["fp32"] - x).abs().mean()).item())
        rows["latent steps with another sign (%)"].append(100 * _sign_flips(exact, fast, x, grad))
    print(f"{args.dataset}, VAE {args.vae} (latent {exact.latent_dim}), batch {args.batch_size} x {args.batches}, "
          f"eps {args.eps}, {torch.get_num_threads()} threads\n")
    print("| bf16 against fp32 | mean over batches |\n| --- | ---: |")
    for name, values in rows.items():
        print(f"| {name} | {statistics.fmean(values):.4f} |")
    fp32, bf16 = (1000 * statistics.median(times[k][1:] or times[k]) for k in ("fp32", "bf16"))
    print(f"\nVAE passes of one attack: fp32 {fp32:.0f} ms, bf16 {bf16:.0f} ms ({fp32 / bf16:.2f}x faster)")


def _sign_flips(exact: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Share of latent coordinates whose FGSM step changes sign between the fp32 and bf16 VAE."""
    signs = []
    for vae in (exact, fast):
        mu = vae.encode_mean(x)
        delta = torch.zeros_like(mu, requires_grad=True)
        (latent,) = torch.autograd.grad(vae.decode(mu + delta), delta, grad_outputs=grad)
        signs.append(latent.sign())
    return (signs[0] != signs[1]).float().mean().item()


if __name__ == "__main__":
    main()
