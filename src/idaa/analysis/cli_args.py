"""`idaa diagnose`, `idaa gallery` and `idaa plot`: their argument parsers and handlers."""

from __future__ import annotations

import argparse
from pathlib import Path

from idaa.errors import IdaaError


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    from idaa.data.memory import DATASETS

    p.add_argument("--vae", default=None, help="vae.pt for the IDAA attack (default: the one the run trained with)")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="default: the checkpoint's (or the VAE's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="train", help="train (default; with the run's --limit subset) or test")
    p.add_argument("--eps-idaa", type=float, default=None, help="default: the run's eps if it trained with IDAA, "
                   "else 0.15")
    p.add_argument("--eps-clae", type=float, default=None, help="default: the run's eps if it trained with CLAE, "
                   "else 0.03")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    from idaa.data.options import add_stream_arguments

    add_stream_arguments(p, image_size=False)  # a streamed set is cropped to the checkpoint's (or VAE's) size


def add_analysis_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the analysis subcommands on the top-level subcommand parser."""
    d = sub.add_parser("diagnose", help="identity-preservation diagnostic (Fig. 1b/1c): random vs CLAE vs IDAA")
    d.add_argument("checkpoint", help="a pretraining checkpoint (last.ckpt)")
    _add_attack_args(d)
    d.add_argument("--n", type=int, default=512, help="samples (default 512)")
    d.add_argument("--batch-size", type=int, default=None, help="attack batch (default: the run's batch size)")
    d.add_argument("--attack-view", default="v1", choices=("v1", "v2"),
                   help="v1: attack the anchor's view as training does (default); v2: attack the random positive")
    d.add_argument("--negatives", default="anchors", choices=("anchors", "positives"),
                   help="nearest negative among the other samples' anchors (default) or their positives")
    d.add_argument("--bn", default="loss", choices=("loss", "main"),
                   help="loss: adversarial views through the adversarial BN, as the loss sees them; main: main BN")
    d.add_argument("--out", default=None, help="folder for diagnose.png/json (default: the checkpoint's folder)")

    g = sub.add_parser("gallery", help="augmentation gallery (Fig. 4): x, A(x), G, R, IDAA and CLAE views")
    g.add_argument("checkpoint", nargs="?", default=None, help="checkpoint to attack (default: random SimCLR)")
    _add_attack_args(g)
    g.add_argument("--n", type=int, default=8, help="images shown (default 8)")
    g.add_argument("--context", type=int, default=None, help="images attacked together (default: run batch size)")
    g.add_argument("--out", default=None, help="PNG path (default: gallery.png in the checkpoint's or VAE's folder)")

    plot = sub.add_parser("plot", help="plots from run folders")
    kinds = plot.add_subparsers(dest="plot_command", required=True, parser_class=type(plot))
    t = kinds.add_parser("time-to-accuracy", help="kNN accuracy against wall-clock seconds for runs (Table 11)")
    t.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl)")
    t.add_argument("--out", default=None, help="PNG path (default: time_to_accuracy.png in the first run's folder's "
                   "parent)")
    t.add_argument("--target", type=float, default=None, help="accuracy (percent) to reach (default: the lowest "
                   "final accuracy among the runs)")
    t.add_argument("--metric", default="knn_top1", help="metrics.jsonl key to plot (default knn_top1)")
    _add_embed_parser(sub)


def run_analysis(args: argparse.Namespace) -> None:
    """Dispatch diagnose, gallery, plot or embed."""
    {"diagnose": _diagnose, "gallery": _gallery, "plot": _plot, "embed": _embed}[args.command](args)


def _diagnose(args: argparse.Namespace) -> None:
    from idaa.analysis.diagnose import format_table, run_diagnostic, write_diagnostic
    from idaa.analysis.setup import load_attack_setup
    from idaa.data.options import options_from

    setup = load_attack_setup(args.checkpoint, args.vae, args.dataset, args.data_dir, args.split, args.eps_idaa,
                              args.eps_clae, args.device, args.seed, options_from(args, args.seed))
    result = run_diagnostic(setup, args.n, args.batch_size, args.attack_view, args.negatives, args.bn, args.seed)
    png, js = write_diagnostic(result, args.out or Path(args.checkpoint).parent)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"identity diagnostic of {args.checkpoint} on {result['n']} {result['dataset']} samples "
          f"(attack on {args.attack_view}, negatives: other samples' {args.negatives}, {args.bn} BN):\n")
    print(format_table(result))
    print(f"\n-> {png}\n-> {js}")
    _to_trackers(args.checkpoint, {f"diagnose/{name}/{key}": value for name, stats in result["summary"].items()
                                   for key, value in stats.items() if key != "n"}, [png, js])


def _gallery(args: argparse.Namespace) -> None:
    from idaa.analysis.gallery import make_gallery
    from idaa.analysis.setup import load_attack_setup
    from idaa.data.options import options_from

    setup = load_attack_setup(args.checkpoint, args.vae, args.dataset, args.data_dir, args.split, args.eps_idaa,
                              args.eps_clae, args.device, args.seed, options_from(args, args.seed))
    if args.out is not None:
        out = Path(args.out)
    else:
        out = Path(args.checkpoint).parent / "gallery.png" if args.checkpoint else Path(args.vae).parent / "gallery.png"
    if out.suffix.lower() != ".png":
        raise IdaaError(f"--out must name a .png file, got '{out}'")
    info = make_gallery(setup, out, args.n, args.context, args.seed)
    if args.checkpoint is None:
        print("note: no checkpoint given: the attacks target a randomly initialised SimCLR")
    print(f"gallery of {info['n']} {info['dataset']} images (attacked in a batch of {info['context']}), eps IDAA "
          f"{info['eps']['idaa']:g}, CLAE {info['eps']['clae']:g}; mean |x' - A(x)| in pixels: IDAA "
          f"{info['mean_abs_change']['idaa']:.4f}, CLAE {info['mean_abs_change']['clae']:.4f}; differences "
          f"amplified x{info['amplification']['idaa']:.1f} (IDAA), x{info['amplification']['clae']:.1f} (CLAE)")
    print(f"-> {info['png']}")
    _to_trackers(args.checkpoint or args.vae, files=[info["png"]])


def _plot(args: argparse.Namespace) -> None:
    from idaa.analysis.time_to_accuracy import format_table, time_to_accuracy

    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "time_to_accuracy.png"
    if out.suffix.lower() != ".png":
        raise IdaaError(f"--out must name a .png file, got '{out}'")
    result = time_to_accuracy(args.runs, out, args.target, args.metric)
    print(format_table(result))
    print(f"(seconds to the target are read at the runs' kNN evaluations)\n-> {result['png']}")
    for run in args.runs:
        _to_trackers(run, files=[result["png"]])


def _add_embed_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("embed", help="2-d map (UMAP or t-SNE) of test features by class -> embed.png/csv")
    e.add_argument("checkpoint", help="a pretraining checkpoint (last.ckpt)")
    e.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--limit", type=int, default=None, help="map a seeded class-balanced subset of N test images")
    e.add_argument("--method", default="auto", choices=("auto", "umap", "tsne"),
                   help="auto: UMAP when umap-learn is installed (idaa[umap]), else t-SNE")
    e.add_argument("--out", default=None, help="folder for embed.png and embed.csv (default: the checkpoint's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--no-progress", action="store_true")


def _embed(args: argparse.Namespace) -> None:
    from idaa.analysis.embed import embed_map

    info = embed_map(args.checkpoint, args.dataset, args.data_dir, args.limit, args.method, args.out, args.device,
                     args.seed, progress=not args.no_progress)
    print(f"embedding map ({info['method']}) of {info['n']} {info['dataset']} test images, {info['classes']} classes, "
          f"in {info['seconds']:.1f} s\n-> {info['png']}\n-> {info['csv']}")
    _to_trackers(args.checkpoint, files=[info["png"]])


def _to_trackers(source: str | None, metrics: dict | None = None, files: list = ()) -> None:
    """Append results to the trackers of the run folder `source` names (the folder, or a file inside it)."""
    from idaa.tracking import log_to_run

    if source:
        path = Path(source)
        log_to_run(path if path.is_dir() else path.parent, metrics, files)
