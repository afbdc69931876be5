"""`idaa pretrain`'s arguments: one flag per PretrainConfig setting, resolved over a preset (parsing only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from idaa.errors import IdaaError
from idaa.train.settings import add_settings_arguments, settings_given

__all__ = ["PRETRAIN_FLAGS", "add_pretrain_parser", "parse_options", "run_pretrain"]

PRETRAIN_FLAGS: list[tuple[str, type, str]] = [
    ("method", str, "simclr"), ("adversary", str, "none, idaa, clae, idaa-nodecomp, latent-noise, random-view"),
    ("vae", str, "vae.pt for the VAE-based adversaries"),
    ("backbone", str, "resnet18-cifar, resnet50-cifar, resnet18, resnet50, resnet101, wrn28-k"),
    ("width", int, "ResNet base width (64)"), ("epochs", int, ""), ("batch-size", int, ""),
    ("optimizer", str, "adam or sgd"), ("lr", float, ""), ("weight-decay", float, ""), ("momentum", float, ""),
    ("schedule", str, "cosine or constant"), ("warmup-epochs", int, ""), ("temperature", float, "loss temperature"),
    ("attack-loss", str, "anchored (paper) or symmetric (authors' code)"), ("policy", str, "view policy"),
    ("eps", float, "adversary budget (IDAA 0.15 latent, CLAE 0.03 pixels)"), ("attack-steps", int, "1 = FGSM"),
    ("attack-step-size", float, ""), ("attack-norm", str, "linf or l2"),
    ("attack-graph", str, "separate (the paper's: x~ through the adversarial BN), clean (gradient from v1's "
     "own graph at delta = 0: no extra forward; FGSM only) or shared (the attack's gradient is dL(v1, v2)/dv1 "
     "from the clean loss's own backward: no extra backward either; FGSM only)"),
    ("adversarial-anchor", str, "live (default: L(v1, x') trains v1's branch too, as the paper) or detached "
     "(through x' only: with --attack-graph shared, the step's floor of 3 forwards + 3 backwards)"),
    ("vae-precision", str, "fp32 (default) or bf16: the frozen VAE's encode/decode under bf16 autocast (faster "
     "on CPUs with AVX512-BF16 and on GPUs; x' differs slightly)"),
    ("attack-fraction", float, "attack only this fraction of each batch (the cheaper mode; default 1)"),
    ("attack-every", int, "attack only every k-th step; the others compute the clean loss alone (default 1)"),
    ("attack-from-epoch", int, "attack only from this epoch on (default 0: from the start)"),
    ("alpha", float, "weight of L(v1, x')"),
    ("knn-every", int, "online kNN every N epochs (0 = off)"), ("knn-k", int, ""), ("knn-temperature", float, ""),
    ("checkpoint-every", int, "keep epochNNNN.ckpt every N epochs"),
    ("checkpoint-steps", int, "also refresh last.ckpt every N steps (0 = at epoch ends only)"),
    ("skip-nonfinite", int, "skip up to K steps whose loss or gradient is NaN/inf (default 0: stop at the first)"),
    ("max-steps", int, "stop after N steps"),
    ("device", str, "auto, cpu, cuda"), ("precision", str, "fp32, bf16 or fp16 (autocast)"),
]


def add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    """`idaa pretrain`: every PretrainConfig setting as a flag (None = not given, so presets keep theirs)."""
    p = sub.add_parser("pretrain", help="self-supervised pretraining with an optional adversary")
    p.add_argument("--config", default=None, help="YAML preset (configs/); flags override it")
    p.add_argument("--out", default=None, help="run folder")
    for flag, kind, text in PRETRAIN_FLAGS:
        p.add_argument(f"--{flag}", type=kind, default=None, help=text or None)
    p.add_argument("--method-option", action="append", default=None, metavar="KEY=VALUE",
                   help="a method setting, e.g. tau_plus=0.1 or queue_size=4096 (repeatable)")
    p.add_argument("--random-start", action="store_true", default=None, help="PGD random start in the eps-ball")
    p.add_argument("--embed-map", action="store_true", default=None,
                   help="at the end, write embed.png/csv: a 2-d map of the test features (see idaa embed)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun on CUDA: batch statistics over all ranks (SyncBatchNorm)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="NHWC weights and views (faster convolutions on recent GPUs and CPUs)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the backbone (the first steps pay the compilation)")
    add_settings_arguments(p)  # data and trackers: --dataset, --data-dir, --stream, --logger, ...
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-progress", action="store_true")


def run_pretrain(args: argparse.Namespace) -> None:
    """Preset (or the run's own config.yaml on --resume), then the flags given, then train."""
    from idaa.train.config import read_preset, resolve_config
    from idaa.train.pretrain import pretrain

    if args.resume and args.overwrite:
        raise IdaaError("--resume and --overwrite exclude each other")
    preset = read_preset(args.config) if args.config else None
    if args.resume and preset is None and args.out and (Path(args.out) / "config.yaml").is_file():
        preset = read_preset(Path(args.out) / "config.yaml")
        preset.pop("max_steps", None)  # a step limit belongs to one invocation, not to the run's recipe
    names = [flag.replace("-", "_") for flag, _, _ in PRETRAIN_FLAGS] + [
        "random_start", "sync_bn", "channels_last", "compile", "out", "embed_map"]
    overrides = {**{name: getattr(args, name) for name in names}, **settings_given(args)}
    if args.method_option:
        options = dict((preset or {}).get("method_options") or {})
        options.update(parse_options(args.method_option))
        overrides["method_options"] = options
    cfg = resolve_config(preset, overrides)
    result = pretrain(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if not result:
        print(f"pretrain: nothing to do, {cfg.out} has already trained {cfg.epochs} epochs")
        return
    knn = f"  kNN top-1 {result['knn_top1']:.2f}%" if "knn_top1" in result else ""
    bad = f"  {result['bad_images']} unreadable image(s) skipped in the last epoch" if "bad_images" in result else ""
    print(f"pretrain: epoch {result.get('epoch')}  step {result.get('step')}  loss {result.get('loss', 0):.4f}"
          f"{knn}{bad}  -> {cfg.out}")


def parse_options(items: list[str]) -> dict[str, object]:
    """KEY=VALUE strings -> a dict, values read as YAML scalars (0.1 -> float, 4096 -> int, true -> bool)."""
    import yaml

    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise IdaaError(f"--method-option expects KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise IdaaError(f"--method-option {item!r}: cannot read the value") from None
    return options
