"""Command line: argument parsing only; every subcommand builds a config and calls the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from idaa.errors import IdaaError, one_line
from idaa.train.settings import add_settings_arguments, settings_given

ANALYSIS_COMMANDS = ("diagnose", "gallery", "plot", "embed")
EXPERIMENT_COMMANDS = ("sweep", "reproduce")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line with exit code 2 (its own convention too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_data(p: argparse.ArgumentParser, default: str | None = "cifar10") -> None:
    from idaa.data.memory import DATASETS

    p.add_argument("--dataset", default=default, choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="folder holding the dataset (not needed for digits)")
    p.add_argument("--download", action="store_true", help="fetch the official archive (cifar10/100, stl10)")


def _add_stream(p: argparse.ArgumentParser, image_size: bool = False) -> None:
    from idaa.data.options import add_stream_arguments

    add_stream_arguments(p, image_size)


def _sources(args: argparse.Namespace) -> object:
    from idaa.data.options import options_from

    return options_from(args, getattr(args, "seed", 0))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="idaa", description="Identity-Disentangled Adversarial Augmentation for SSL")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_vae(sub)
    from idaa.train.cli_args import add_pretrain_parser

    add_pretrain_parser(sub)
    from idaa.semi.cli_args import add_semi_parser

    add_semi_parser(sub)
    _add_eval(sub)
    _add_export_report(sub)

    from idaa.analysis.cli_args import add_analysis_parsers

    add_analysis_parsers(sub)  # diagnose, gallery, plot, embed
    from idaa.experiments.cli_args import add_experiment_parsers

    add_experiment_parsers(sub)  # sweep, reproduce
    from idaa.data.cli_args import add_data_parser

    add_data_parser(sub)  # data pack, data list
    _add_bench(sub)
    d = sub.add_parser("demo", help="the IDAA story on the embedded digits data, in a few minutes on a CPU")
    d.add_argument("--out", default="runs/demo", help="folder for the demo's outputs (replaced on each run)")
    d.add_argument("--vae-epochs", type=int, default=10)
    d.add_argument("--epochs", type=int, default=10, help="SimCLR epochs per run")
    _add_common(d)
    return parser


def _add_vae(sub: argparse._SubParsersAction) -> None:
    """`idaa vae train` and `idaa vae check`."""
    vae = sub.add_parser("vae", help="train the identity-disentangling VAE").add_subparsers(
        dest="vae_command", required=True, parser_class=_Parser)
    t = vae.add_parser("train", help="train a VAE and write vae.pt, metrics.jsonl and a reconstruction grid")
    add_settings_arguments(t)  # data and trackers: --dataset, --data-dir, --stream, --logger, ...
    t.add_argument("--out", required=True, help="run folder to create")
    t.add_argument("--latent-dim", type=int, default=512)
    t.add_argument("--hidden", type=int, default=128, help="channels of the VAE's 8x8 feature map")
    t.add_argument("--beta", type=float, default=0.1, help="KL weight")
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--policy", default="clae", help="augmentation policy of the training views")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    c = vae.add_parser("check", help="show what a vae.pt was trained on; with --dataset, check that it fits")
    c.add_argument("vae", help="path to vae.pt")
    _add_data(c, default=None)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """`idaa eval knn`, `linear` and `transfer`."""
    ev = sub.add_parser("eval", help="evaluate a pretraining checkpoint").add_subparsers(
        dest="eval_command", required=True, parser_class=_Parser)
    k = ev.add_parser("knn", help="weighted kNN accuracy of a checkpoint's features")
    k.add_argument("checkpoint")
    k.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    k.add_argument("--data-dir", default=None)
    k.add_argument("--limit", type=int, default=None, help="bank size (default: the training run's)")
    k.add_argument("--k", type=int, default=200)
    k.add_argument("--temperature", type=float, default=0.1)
    k.add_argument("--features", default="backbone", choices=("backbone", "projector"))
    k.add_argument("--metric", default="cosine", choices=("cosine", "euclidean"))
    k.add_argument("--device", default="auto")
    k.add_argument("--out", default=None, help="result file (default: eval_knn.json beside the checkpoint)")
    k.add_argument("--no-progress", action="store_true")
    _add_stream(k)
    _add_linear_eval(ev)


def _add_linear_eval(ev: argparse._SubParsersAction) -> None:
    for name, text in (("linear", "linear probe on frozen, cached features -> eval.json"),
                       ("transfer", "the linear protocol on another dataset -> eval_transfer_<dataset>.json")):
        p = ev.add_parser(name, help=text)
        p.add_argument("checkpoint")
        if name == "transfer":
            p.add_argument("--dataset", required=True, help="target dataset (e.g. folder with --data-dir, digits)")
        else:
            p.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
        p.add_argument("--data-dir", default=None)
        p.add_argument("--features", default="backbone", choices=("backbone", "projector"))
        p.add_argument("--limit", type=int, default=None, help="seeded class-balanced subset of the training set")
        p.add_argument("--augment", action="store_true",
                       help="the paper's protocol: train on fresh random crops/flips every epoch (slower, no cache)")
        p.add_argument("--epochs", type=int, default=None, help="epochs of the --augment protocol (default 10)")
        p.add_argument("--batch-size", type=int, default=512,
                       help="images per forward pass (the --augment probe uses minibatches of at most 256)")
        p.add_argument("--out", default=None, help="result file (default: beside the checkpoint)")
        _add_common(p)
        _add_stream(p)


def _add_export_report(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="the backbone alone (main BN) + metadata, for idaa.load_backbone or detectron2")
    x.add_argument("checkpoint", help="a pretraining checkpoint, or an exported .pt/.safetensors file to convert")
    x.add_argument("--out", required=True, help="file to write, e.g. backbone.pt")
    x.add_argument("--format", default=None, choices=("pt", "safetensors", "detectron2"),
                   help="default: by the suffix of --out (.safetensors, .pkl = detectron2, else pt)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing file")
    r = sub.add_parser("report", help="one table from the eval*.json files of several runs")
    r.add_argument("paths", nargs="+", metavar="RUN_OR_JSON", help="run folders (searched recursively) or files")
    r.add_argument("--format", default="markdown", choices=("markdown", "csv"))
    r.add_argument("--out", default=None, help="write the table to this file (default: print it)")


# (flag, type, help) for every PretrainConfig field settable from the command line; None means "not given".
def _add_bench(sub: argparse._SubParsersAction) -> None:
    from idaa.bench import MODES, BenchConfig

    b = sub.add_parser("bench", help="speed benchmarks").add_subparsers(dest="bench_command", required=True,
                                                                       parser_class=_Parser)
    s = b.add_parser("step", help="per-step time and memory of SimCLR with each adversary, side by side")
    defaults = BenchConfig()
    s.add_argument("--backbone", default=defaults.backbone)
    s.add_argument("--width", type=int, default=None, help="ResNet base width (default: full, 64)")
    s.add_argument("--batch-size", type=int, default=defaults.batch_size)
    s.add_argument("--image-size", type=int, default=defaults.image_size)
    s.add_argument("--latent-dim", type=int, default=defaults.latent_dim)
    s.add_argument("--modes", default=",".join(defaults.modes), help=f"comma-separated, from {', '.join(MODES)}")
    s.add_argument("--rounds", type=int, default=defaults.rounds)
    s.add_argument("--warmup", type=int, default=defaults.warmup)
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")
    s.add_argument("--channels-last", action="store_true")
    s.add_argument("--compile", action="store_true", help="torch.compile each mode's backbone (warm-up compiles)")
    s.add_argument("--breakdown", action="store_true",
                   help="milliseconds per component instead (backbone passes per view, attack gradient, VAE passes)")
    s.add_argument("--json", default=None, help="also write the result as JSON here")


def _bench(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from idaa.bench import BenchConfig, bench_step, format_table
    from idaa.bench_breakdown import bench_breakdown, format_breakdown

    cfg = BenchConfig(backbone=args.backbone, width=args.width, batch_size=args.batch_size,
                      image_size=args.image_size, latent_dim=args.latent_dim,
                      modes=tuple(m for m in args.modes.split(",") if m), rounds=args.rounds, warmup=args.warmup,
                      device=args.device, precision=args.precision, channels_last=args.channels_last,
                      compile=args.compile)
    result = bench_breakdown(cfg.validate()) if args.breakdown else bench_step(cfg)
    print(format_breakdown(result) if args.breakdown else format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _pretrain(args: argparse.Namespace) -> None:
    from idaa.train.cli_args import run_pretrain

    run_pretrain(args)


def _eval(args: argparse.Namespace) -> None:
    if args.eval_command in ("linear", "transfer"):
        _eval_linear(args)
        return
    from idaa.evaluate.knn import knn_from_checkpoint

    result = knn_from_checkpoint(args.checkpoint, args.dataset, args.data_dir, args.limit, args.k, args.temperature,
                                 args.features, args.metric, args.device, out=args.out,
                                 progress=not args.no_progress, sources=_sources(args))
    print(f"kNN top-1 {result['knn_top1']:.2f}%  (k={result['k']}, T={result['temperature']}, "
          f"{result['features']} features, bank {result['bank']}, queries {result['queries']}) -> {result['out']}")


def _eval_linear(args: argparse.Namespace) -> None:
    from idaa.evaluate.protocol import LinearEvalOptions, linear_eval

    opts = LinearEvalOptions(dataset=args.dataset, data_dir=args.data_dir, features=args.features, limit=args.limit,
                             device=args.device, seed=args.seed, augment=args.augment, epochs=args.epochs,
                             batch_size=args.batch_size, progress=not args.no_progress, out=args.out,
                             sources=_sources(args))
    r = linear_eval(args.checkpoint, opts, transfer=args.eval_command == "transfer")
    t = r["times"]
    print(f"{r['kind']} {r['dataset']}: top-1 {r['linear_top1']:.2f}%  top-5 {r['linear_top5']:.2f}%  "
          f"(wd {r['protocol']['chosen_weight_decay']:g}, {r['feature_dim']}-d {r['features']} features, "
          f"train {r['train_images']}, test {r['test_images']}; {t['total_s']:.1f} s) -> {r['out']}")


def _export(args: argparse.Namespace) -> None:
    from idaa.export import describe_export, export_backbone

    meta = export_backbone(args.checkpoint, args.out, overwrite=args.overwrite, fmt=args.format)
    print(describe_export(meta, args.out))


def _report(args: argparse.Namespace) -> None:
    from idaa.evaluate.report import build_report

    text = build_report(args.paths, args.format)
    if args.out is None:
        print(text, end="")
        return
    from pathlib import Path

    from idaa.fileio import atomic_write_bytes

    try:
        atomic_write_bytes(Path(args.out), lambda handle: handle.write(text.encode()))
    except OSError as exc:
        raise IdaaError(f"cannot write '{args.out}' ({exc.strerror or type(exc).__name__})") from None
    print(f"report: {len(text.splitlines())} lines -> {args.out}")


def _vae(args: argparse.Namespace) -> None:
    (_vae_train if args.vae_command == "train" else _vae_check)(args)


def _vae_check(args: argparse.Namespace) -> None:
    from idaa.nets.vae import check_vae_fits, load_vae

    vae = load_vae(args.vae)
    meta = vae.meta
    print(f"{args.vae}: {vae.image_size} px, latent {vae.latent_dim}, trained on {meta.get('dataset', '?')} "
          f"({meta.get('train_images', '?')} images, {meta.get('epochs', '?')} epochs, beta {meta.get('beta', '?')})")
    if args.dataset is not None:
        from idaa.data.sources import open_dataset

        data = open_dataset(args.dataset, args.data_dir, "train", args.download, default_size=vae.image_size)
        check_vae_fits(vae, data.name, data.image_size, data.mean, data.std)
        print(f"fits {data.name} ({data.image_size} px)")


def _vae_train(args: argparse.Namespace) -> None:
    from idaa.train.vae_trainer import VAETrainConfig, train_vae

    cfg = VAETrainConfig(out=args.out, latent_dim=args.latent_dim, hidden=args.hidden, beta=args.beta,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, policy=args.policy,
                         device=args.device, overwrite=args.overwrite, progress=not args.no_progress,
                         **settings_given(args))
    result = train_vae(cfg)
    print(f"vae: epoch {result['epoch']}  held-out reconstruction MSE {result['test_mse']:.4f} "
          f"(relative {result['test_relative_mse']:.3f})  KL {result['test_kl']:.4f}  -> {args.out}/vae.pt")


def _demo(args: argparse.Namespace) -> None:
    from idaa.demo import run_demo

    if args.vae_epochs < 1 or args.epochs < 1:
        raise IdaaError("--vae-epochs and --epochs must be >= 1")
    run_demo(args.out, vae_epochs=args.vae_epochs, epochs=args.epochs, device=args.device, seed=args.seed,
             progress=not args.no_progress)


def _analysis(args: argparse.Namespace) -> None:
    from idaa.analysis.cli_args import run_analysis

    run_analysis(args)


def _experiment(args: argparse.Namespace) -> None:
    from idaa.experiments.cli_args import run_experiment

    run_experiment(args)


def _semi(args: argparse.Namespace) -> None:
    from idaa.semi.cli_args import run_semi

    run_semi(args)


def _data(args: argparse.Namespace) -> None:
    from idaa.data.cli_args import run_data

    run_data(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `idaa` console script; user errors print one line and return 2 (75: a write fault)."""
    args = build_parser().parse_args(argv)
    from idaa.devices import tune_cpu_allocator

    tune_cpu_allocator()  # every command trains or extracts features: keep freed memory for the next step
    handlers = {"vae": _vae, "pretrain": _pretrain, "bench": _bench, "eval": _eval, "demo": _demo, "semi": _semi,
                "export": _export, "report": _report, "data": _data, **dict.fromkeys(ANALYSIS_COMMANDS, _analysis),
                **dict.fromkeys(EXPERIMENT_COMMANDS, _experiment)}
    try:
        handlers[args.command](args)
    except IdaaError as exc:  # exit 2, or 75 for a write the filesystem refused (WriteFault)
        print(f"idaa: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        from idaa.fileio import write_fault
        from idaa.train.state import TrainingStopped

        fault = write_fault(exc, None, getattr(exc, "filename", None))  # a disk full anywhere else: one line too
        if fault is not None:
            print(f"idaa: error: {fault}", file=sys.stderr)
            return fault.exit_code
        if not isinstance(exc, TrainingStopped):
            raise
        print(f"idaa: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("idaa: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
