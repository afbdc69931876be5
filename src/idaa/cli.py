"""Command line: argument parsing only; every subcommand builds a config and calls the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from idaa.errors import IdaaError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line with exit code 2 (its own convention too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_data(p: argparse.ArgumentParser, default: str | None = "cifar10") -> None:
    from idaa.data.datasets import DATASETS

    p.add_argument("--dataset", default=default, choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="folder holding the dataset (not needed for digits)")
    p.add_argument("--download", action="store_true", help="fetch the official archive (cifar10/100, stl10)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="idaa", description="Identity-Disentangled Adversarial Augmentation for SSL")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    vae = sub.add_parser("vae", help="train the identity-disentangling VAE").add_subparsers(
        dest="vae_command", required=True, parser_class=_Parser)
    t = vae.add_parser("train", help="train a VAE and write vae.pt, metrics.jsonl and a reconstruction grid")
    _add_data(t)
    t.add_argument("--out", required=True, help="run folder to create")
    t.add_argument("--latent-dim", type=int, default=512)
    t.add_argument("--hidden", type=int, default=128, help="channels of the VAE's 8x8 feature map")
    t.add_argument("--beta", type=float, default=0.1, help="KL weight")
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--policy", default="clae", help="augmentation policy of the training views")
    t.add_argument("--limit", type=int, default=None, help="train on a seeded class-balanced subset of N images")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    _add_common(t)

    c = vae.add_parser("check", help="show what a vae.pt was trained on; with --dataset, check that it fits")
    c.add_argument("vae", help="path to vae.pt")
    _add_data(c, default=None)

    d = sub.add_parser("demo", help="the IDAA story on the embedded digits data, in a few minutes on a CPU")
    d.add_argument("--out", default="runs/demo", help="folder for the demo's outputs (replaced on each run)")
    d.add_argument("--vae-epochs", type=int, default=15)
    _add_common(d)
    return parser


def _vae(args: argparse.Namespace) -> None:
    (_vae_train if args.vae_command == "train" else _vae_check)(args)


def _vae_check(args: argparse.Namespace) -> None:
    from idaa.nets.vae import check_vae_fits, load_vae

    vae = load_vae(args.vae)
    meta = vae.meta
    print(f"{args.vae}: {vae.image_size} px, latent {vae.latent_dim}, trained on {meta.get('dataset', '?')} "
          f"({meta.get('train_images', '?')} images, {meta.get('epochs', '?')} epochs, beta {meta.get('beta', '?')})")
    if args.dataset is not None:
        from idaa.data.datasets import load_dataset

        data = load_dataset(args.dataset, args.data_dir, split="train", download=args.download)
        check_vae_fits(vae, data.name, data.image_size, data.mean, data.std)
        print(f"fits {data.name} ({data.image_size} px)")


def _vae_train(args: argparse.Namespace) -> None:
    from idaa.train.vae_trainer import VAETrainConfig, train_vae

    cfg = VAETrainConfig(out=args.out, dataset=args.dataset, data_dir=args.data_dir, download=args.download,
                         latent_dim=args.latent_dim, hidden=args.hidden, beta=args.beta, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, policy=args.policy, limit=args.limit,
                         seed=args.seed, device=args.device, overwrite=args.overwrite,
                         progress=not args.no_progress)
    result = train_vae(cfg)
    print(f"vae: epoch {result['epoch']}  held-out reconstruction MSE {result['test_mse']:.4f} "
          f"(relative {result['test_relative_mse']:.3f})  KL {result['test_kl']:.4f}  -> {args.out}/vae.pt")


def _demo(args: argparse.Namespace) -> None:
    from idaa.demo import run_demo

    run_demo(args.out, vae_epochs=args.vae_epochs, device=args.device, seed=args.seed,
             progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `idaa` console script; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    handlers = {"vae": _vae, "demo": _demo}
    try:
        handlers[args.command](args)
    except IdaaError as exc:
        print(f"idaa: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idaa: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
