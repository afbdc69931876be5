"""`idaa semi`: the argument parser and its handler (the only place that turns flags into a SemiConfig)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from idaa.errors import IdaaError
from idaa.semi.config import SemiConfig
from idaa.train.settings import add_settings_arguments, settings_given

# (flag, type, help) for every SemiConfig field settable from the command line; None means "not given".
_FLAGS: list[tuple[str, type, str]] = [
    ("method", str, "fixmatch (default) or supervised (the labelled-only baseline on the same split)"),
    ("labels", int, "number of labelled training images, a multiple of the number of classes"),
    ("adversary", str, "none, idaa, clae, idaa-nodecomp, latent-noise, random-view (attacks the strong branch)"),
    ("vae", str, "vae.pt for the VAE-based adversaries"),
    ("eps", float, "adversary budget (IDAA 0.15 latent, CLAE 0.03 pixels)"),
    ("attack-steps", int, "1 = FGSM, more = PGD"), ("alpha", float, "weight of L_u(x'_strong) (1)"),
    ("backbone", str, "wrn28-2 (default), wrn28-8 (paper, CIFAR-100), wrnD-k, resnet18-cifar, ..."),
    ("width", int, "ResNet base width (WideResNets take it from the name)"),
    ("steps", int, "K, total optimisation steps of the cosine schedule (FixMatch: 1048576)"),
    ("batch-size", int, "labelled images per step (64)"), ("mu", int, "unlabelled images per labelled one (7)"),
    ("threshold", float, "pseudo-label confidence threshold (0.95)"), ("lambda-u", float, "weight of L_u (1)"),
    ("lr", float, "SGD learning rate (0.03)"), ("momentum", float, "Nesterov momentum (0.9)"),
    ("weight-decay", float, "on weights, not on biases and BN (5e-4)"), ("ema-decay", float, "EMA decay (0.999)"),
    ("eval-every", int, "evaluate the EMA model and write last.ckpt every N steps (1024)"),
    ("max-steps", int, "stop after N steps without changing the schedule (smoke runs)"),
    ("device", str, "auto, cpu, cuda or cuda:N"), ("precision", str, "fp32 or bf16"),
]
# Settings that may change when a run is resumed; the rest must match the saved run.
_RESUMABLE = {"max_steps", "device", "download", "out", "workers", "logger", "mlflow_uri", "wandb_project",
              "wandb_entity"}


def add_semi_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `idaa semi` on the top-level subcommand parser."""
    p = subparsers.add_parser("semi", help="semi-supervised FixMatch with an adversarial strong branch, or the "
                              "supervised baseline on the same labelled split")
    p.add_argument("--config", default=None, help="YAML preset (configs/paper/semi-*.yaml); flags override it")
    p.add_argument("--out", default=None, help="run folder to create")
    for flag, kind, text in _FLAGS:
        p.add_argument(f"--{flag}", type=kind, default=None, help=text)
    add_settings_arguments(p)  # data and trackers: --dataset, --data-dir, --stream, --logger, ...
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _given(args: argparse.Namespace) -> dict[str, Any]:
    names = [flag.replace("-", "_") for flag, _, _ in _FLAGS] + ["out"]
    return {**{name: getattr(args, name) for name in names if getattr(args, name) is not None}, **settings_given(args)}


def resolve_semi_config(args: argparse.Namespace) -> SemiConfig:
    """Defaults then flags; with --resume, the saved run's config with only --max-steps/--device changeable."""
    from idaa.semi.loop import read_semi_checkpoint

    given = _given(args)
    if not args.resume:
        preset = {}
        if getattr(args, "config", None):
            import dataclasses

            from idaa.train.config import read_preset

            preset = read_preset(args.config, {f.name for f in dataclasses.fields(SemiConfig)})
        return SemiConfig(**{**preset, **given}).validate()
    if "out" not in given:
        raise IdaaError("--resume needs --out: the run folder to continue")
    saved = read_semi_checkpoint(Path(given["out"]) / "last.ckpt")["config"]
    changed = sorted(k for k, v in given.items() if k not in _RESUMABLE and saved.get(k) != v)
    if changed:
        raise IdaaError(f"cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} when resuming; "
                        "start a new run instead")
    saved.pop("max_steps", None)  # a step limit belongs to one invocation, not to the run's recipe
    return SemiConfig(**{**saved, **given}).validate()


def run_semi(args: argparse.Namespace) -> None:
    """Handler of `idaa semi`: resolve the config, train, print one summary line."""
    from idaa.semi.loop import train_semi

    if args.resume and args.overwrite:
        raise IdaaError("--resume and --overwrite exclude each other")
    cfg = resolve_semi_config(args)
    record = train_semi(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if not record:
        print(f"semi: nothing to do, {cfg.out} has already trained {cfg.steps} steps")
        return
    accuracy = f"  EMA test top-1 {record['test_top1']:.2f}%" if "test_top1" in record else ""
    print(f"semi: {cfg.method}+{cfg.adversary}, {cfg.labels} labels, step {record['step']}  "
          f"loss {record['loss']:.4f}{accuracy}  -> {cfg.out}")
