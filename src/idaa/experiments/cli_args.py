"""`idaa sweep` and `idaa reproduce`: their argument parsers and handlers (many runs at once)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

from idaa.errors import IdaaError

if TYPE_CHECKING:
    from idaa.experiments.protocol import Protocol

EXPERIMENT_COMMANDS = ("sweep", "reproduce")


def add_experiment_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `sweep` and `reproduce` on the top-level subcommand parser."""
    s = sub.add_parser("sweep", help="pretrain a grid of settings from a YAML file -> table and plots (Figs. 5-6)")
    s.add_argument("grid", help="grid file (see configs/sweeps/)")
    s.add_argument("--out", default=None, help="sweep folder (default: the grid's out)")
    s.add_argument("--dry-run", action="store_true", help="show the points and their state, train nothing")
    s.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("reproduce", help="a protocol's variants x seeds, one run at a time, resumable -> report "
                       "with verdicts (configs/reproduce/)")
    r.add_argument("protocol", help="protocol file, e.g. configs/reproduce/cpu-protocol-cifar10.yaml")
    r.add_argument("--data-dir", default=None, help="dataset folder (overrides the protocol's)")
    r.add_argument("--vae", default=None, help="vae.pt for the VAE-based variants (overrides the protocol's)")
    r.add_argument("--seeds", default=None, help="comma-separated seeds to train now, e.g. 0,1,2 (default: the "
                   "protocol's); a matched variant is still measured over all the protocol's seeds")
    r.add_argument("--variants", default=None, help="comma-separated variant names (their dependencies come along)")
    r.add_argument("--out", default=None, help="report folder (default: the protocol's out)")
    r.add_argument("--max-steps", type=int, default=None,
                   help="a smoke test: stop every run after N steps (a later call without it continues them)")
    r.add_argument("--dry-run", action="store_true", help="show the runs and their state, train nothing")
    r.add_argument("--report-only", action="store_true", help="rewrite the report from the runs there, train nothing")
    r.add_argument("--readme-section", default=None, metavar="FILE",
                   help="also write a short summary between <!-- reproduce:start/end --> markers in FILE")
    r.add_argument("--publish", default=None, metavar="DIR",
                   help="keep a copy of the report and of every finished run's record (no checkpoints) in DIR, "
                   "e.g. docs/...; runs recorded there are not trained again, and the README summary links DIR")
    r.add_argument("--no-progress", action="store_true")


def run_experiment(args: argparse.Namespace) -> None:
    """Dispatch sweep or reproduce."""
    {"sweep": _sweep, "reproduce": _reproduce}[args.command](args)


def _sweep(args: argparse.Namespace) -> None:
    from idaa.experiments.sweep import SweepStopped, format_table, read_grid, run_sweep

    grid = read_grid(args.grid, args.out)
    try:
        report = run_sweep(grid, progress=not args.no_progress, dry_run=args.dry_run)
    except SweepStopped as stop:
        print(f"idaa: {stop}", file=sys.stderr)
        raise SystemExit(stop.code) from None
    if args.dry_run:
        return
    print("\n" + format_table(report["rows"]))
    print("\n".join(f"-> {path}" for path in [report["table"], *report["plots"]]))


def reproduce_command(args: argparse.Namespace, seeds: str | None = None) -> str:
    """The command line that makes the whole grid's report, as a user would type it (`seeds`: beyond the file's)."""
    words = ["idaa", "reproduce", args.protocol]
    for flag, value in (("data_dir", args.data_dir), ("vae", args.vae), ("seeds", seeds), ("out", args.out),
                        ("max_steps", args.max_steps)):
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", str(value)]
    return shlex.join(words)


def whole_grid(args: argparse.Namespace, protocol: Protocol) -> tuple[Protocol, str]:
    """The protocol's whole grid and its command: what the report covers, whatever --seeds and --variants train.

    A grid trained a seed or a variant at a time thus never publishes a report of a part over the whole one.
    """
    from idaa.experiments.protocol import read_protocol

    seeds = [*protocol.match_seeds, *[s for s in protocol.seeds if s not in protocol.match_seeds]]
    if seeds == protocol.seeds and protocol.variants == protocol.grid_variants:
        return protocol, reproduce_command(args)
    extra = ",".join(map(str, seeds)) if seeds != protocol.match_seeds else None
    grid = read_protocol(args.protocol, args.data_dir, args.vae, extra, None, args.out, args.max_steps,
                         args.publish)
    return grid, reproduce_command(args, extra)


def _reproduce(args: argparse.Namespace) -> None:
    from idaa.experiments.protocol import read_protocol
    from idaa.experiments.report import publish_report, readme_section, write_readme_section, write_report
    from idaa.experiments.reproduce import plan, publish_run, run_reproduce, status_lines
    from idaa.experiments.runner import RunStopped

    if args.dry_run and args.report_only:
        raise IdaaError("--dry-run and --report-only exclude each other")
    protocol = read_protocol(args.protocol, args.data_dir, args.vae, args.seeds, args.variants, args.out,
                             args.max_steps, args.publish)
    if args.dry_run:
        print("\n".join(status_lines(protocol, plan(protocol, training=False))))
        return
    grid, command = whole_grid(args, protocol)

    def whole(runs: list) -> list:  # the grid's runs, finished ones found in their folders or records
        return runs if grid is protocol else plan(grid, training=False)

    def write(runs: list) -> dict:
        paths = write_report(grid, whole(runs), command)
        if protocol.publish is not None:
            paths["published"] = publish_report(protocol, paths)
        return paths

    if args.report_only:
        runs = plan(grid, training=False)
        if not protocol.out.is_dir() and not any(run.recorded for run in runs):
            raise IdaaError(f"'{protocol.out}' does not exist: nothing to report yet")
        protocol.out.mkdir(parents=True, exist_ok=True)
        for run in runs:
            publish_run(protocol, run)
    else:
        try:
            runs = run_reproduce(protocol, progress=not args.no_progress, write=write)
        except RunStopped as stop:
            print(f"idaa: {stop}", file=sys.stderr)
            raise SystemExit(stop.code) from None
    paths = write(runs)
    if args.readme_section:
        paths["readme"] = write_readme_section(args.readme_section,
                                               readme_section(grid, whole(runs), command, args.publish))
    print((protocol.out / "report.md").read_text().split("## Figures")[0].rstrip())
    print("\n".join(f"-> {path}" for path in paths.values()))
