"""Time two SimCLR view batches against one backbone+projector forward+backward on the same batch.

Usage: python benchmarks/bench_views.py [--batch-size 256] [--repeats 10] [--device cpu]

Views must be a small fraction of a training step; the stock ``kornia.augmentation`` pipeline with the
same policy is timed alongside as a reference. Timings are interleaved, median of repeats after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import kornia.augmentation as K
import torch
from torch import nn

from idaa.data.views import ViewPolicy
from idaa.nets import MLPHead, build_backbone

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def _kornia_reference(size: int) -> nn.Module:
    """The same SimCLR policy built from stock kornia.augmentation modules (reference only)."""
    return nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.Normalize(torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)),
    )


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Return a function timing one call in ms, synchronising the accelerator around it."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def time_ms(fn: Callable[[], object]) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1000

    return time_ms


def main() -> None:
    """Parse arguments, time views vs the ResNet-18 step, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18-cifar")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--no-kornia", action="store_true", help="skip the stock kornia reference row")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    policy = ViewPolicy("simclr", 32, CIFAR_MEAN, CIFAR_STD).to(device)
    reference = _kornia_reference(32).to(device)
    backbone = build_backbone(args.backbone, width=args.width)
    net = nn.Sequential(backbone, MLPHead([backbone.out_dim, 512, 64])).to(device)
    batch = policy(images)

    def views() -> None:
        policy(images), policy(images)

    def kornia_views() -> None:
        with torch.no_grad():
            reference(images.float() / 255), reference(images.float() / 255)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(batch).mean().backward()

    jobs = {"idaa views": views, "resnet": step}
    if not args.no_kornia:
        jobs["kornia views"] = kornia_views
    time_ms = _timer(device)
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for i in range(args.warmup + args.repeats):
        for name, fn in jobs.items():
            ms = time_ms(fn)
            if i >= args.warmup:
                times[name].append(ms)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    print(
        f"\nbatch {args.batch_size} x 3 x 32 x 32 uint8, device {device}, threads {torch.get_num_threads()}, "
        f"median of {args.repeats}\n"
    )
    print(f"| pipeline (2 SimCLR views) | views ms | {args.backbone} fwd+bwd ms | ratio % |")
    print("| --- | ---: | ---: | ---: |")
    for name in [n for n in jobs if n != "resnet"]:
        label = "idaa.data.views" if name == "idaa views" else "stock kornia.augmentation (reference)"
        ratio = 100 * med[name] / med["resnet"]
        print(f"| {label} | {med[name]:.1f} | {med['resnet']:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
