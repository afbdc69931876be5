"""`idaa sweep GRID.yaml` (paper Figs. 5-6): pretrain one run per value of each swept parameter, resumably.

A grid names a base preset, settings for every point, the parameters to sweep (each varied alone from the
base) and optionally several series (e.g. SimCLR and SimCLR+IDAA) drawn as separate lines. VAE parameters
(beta, latent_dim, hidden) train one VAE per value from the grid's `vae:` block. Every point runs in its own
`idaa pretrain` process; a finished point is reused, an interrupted one continues with --resume, so running the
same command again picks up where the last one stopped. After each point the table (sweep.md), sweep.json and
one plot per parameter (sweep-PARAM.png) are rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idaa.adversaries import VAE_ADVERSARIES
from idaa.analysis.plots import new_figure
from idaa.analysis.time_to_accuracy import read_metrics
from idaa.errors import IdaaError
from idaa.experiments.runner import (
    VAE_INHERITED,
    RunStopped,
    VAEJob,
    as_mapping,
    ensure_vae,
    finished,
    pretrain_command,
    read_vae_block,
    run_child,
    run_status,
)
from idaa.train.config import FIELDS, read_preset, resolve_config

GRID_KEYS = {"base", "settings", "sweep", "series", "vae", "out"}
VAE_PARAMS = ("beta", "latent_dim", "hidden")
SweepStopped = RunStopped  # a signal stopped a point; it saved its checkpoint and the sweep can be run again


@dataclass
class Grid:
    """A parsed, validated grid file."""

    path: Path
    preset: dict[str, Any]
    sweep: dict[str, list[Any]]
    series: dict[str, dict[str, Any]]
    vae: dict[str, Any] | None
    out: Path


@dataclass
class Point:
    param: str
    value: Any
    series: str
    preset: dict[str, Any]
    config: dict[str, Any]
    run: Path
    vae: VAEJob | None

    @property
    def name(self) -> str:
        return self.run.name


def read_grid(path: str | Path, out: str | None = None) -> Grid:
    """Parse and check a grid file; relative paths inside it are relative to the working directory."""
    path = Path(path)
    data = read_preset(path, fields=GRID_KEYS)
    base = data.get("base")
    preset = read_preset(base) if isinstance(base, str) else as_mapping(base, "base")
    preset.update(as_mapping(data.get("settings"), "settings"))
    sweep = as_mapping(data.get("sweep"), "sweep")
    if not sweep:
        raise IdaaError(f"'{path}' sweeps nothing: add e.g. 'sweep: {{eps: [0.05, 0.1]}}'")
    for param, values in sweep.items():
        if param not in (FIELDS - {"out"}) | set(VAE_PARAMS):
            raise IdaaError(f"cannot sweep '{param}': not a pretrain setting nor a VAE one ({', '.join(VAE_PARAMS)})")
        if not isinstance(values, list) or not values or any(isinstance(v, dict | list) for v in values):
            raise IdaaError(f"sweep.{param} must be a non-empty list of values")
        if len({json.dumps(v) for v in values}) != len(values):
            raise IdaaError(f"sweep.{param} lists a value twice")
    series = {str(k): as_mapping(v, f"series.{k}") for k, v in as_mapping(data.get("series"), "series").items()}
    for name in series:
        if not re.fullmatch(r"[A-Za-z0-9+._-]+", name):
            raise IdaaError(f"series name {name!r} may only use letters, digits and + . _ -")
    vae = read_vae_block(data.get("vae"))
    if vae is None and any(p in VAE_PARAMS for p in sweep):
        raise IdaaError(f"sweeping {', '.join(p for p in sweep if p in VAE_PARAMS)} trains a VAE per value: add a "
                        "'vae:' block with its settings (at least epochs)")
    target = out or data.get("out") or f"runs/sweep-{path.stem}"
    return Grid(path, preset, sweep, series or {"": {}}, vae, Path(str(target)))


def _label(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9+._-]", "_", str(value))


def plan_sweep(grid: Grid) -> list[Point]:
    """Every (parameter, value, series) point with its validated config; identical configs share one run."""
    points: list[Point] = []
    runs: dict[str, Path] = {}
    vaes: dict[str, VAEJob] = {}
    for param, values in grid.sweep.items():
        for value in values:
            for series, overrides in grid.series.items():
                preset = {**grid.preset, **overrides}
                name = f"{series + '-' if series else ''}{param}-{_label(value)}"
                job = None
                uses_vae = preset.get("adversary") in VAE_ADVERSARIES
                if param not in VAE_PARAMS:
                    preset[param] = value
                if uses_vae and grid.vae is not None and (param in VAE_PARAMS or not preset.get("vae")):
                    settings = {k: preset[k] for k in VAE_INHERITED if preset.get(k) is not None}
                    settings.update(grid.vae)
                    vae_name = "base"
                    if param in VAE_PARAMS:
                        settings[param], vae_name = value, f"{param}-{_label(value)}"
                    key = json.dumps(settings, sort_keys=True)
                    job = vaes.setdefault(key, VAEJob(settings, grid.out / "vae" / vae_name))
                    preset["vae"] = str(job.run / "vae.pt")
                elif uses_vae and not preset.get("vae"):
                    raise IdaaError(f"point '{name}' uses adversary '{preset['adversary']}' but names no VAE: set "
                                    "settings.vae or add a 'vae:' block")
                elif uses_vae and not Path(preset["vae"]).is_file():
                    raise IdaaError(f"VAE '{preset['vae']}' (point '{name}') does not exist")
                config = dataclasses.asdict(resolve_config(preset, {"out": "-"}))
                key = json.dumps({k: v for k, v in config.items() if k != "out"}, sort_keys=True, default=str)
                run = runs.setdefault(key, grid.out / name)
                config["out"] = str(run)
                points.append(Point(param, value, series, preset, config, run, job))
    return points


def point_status(point: Point) -> str:
    """'done', 'partial' (has a checkpoint to resume), 'broken' (folder without checkpoint) or 'new'."""
    return run_status(point.run, point.config)


def _ensure_point(point: Point, grid: Grid, progress: bool, echo: Any) -> None:
    status = point_status(point)
    if status == "done":
        echo(f"sweep: {point.name} is finished, reusing it")
        return
    command = pretrain_command(point.config, grid.out / "presets" / f"{point.name}.yaml", status)
    echo(f"sweep: {'resuming' if status == 'partial' else 'training'} {point.name} ({point.param}={point.value})")
    run_child(command + ([] if progress else ["--no-progress"]), point.name)


def collect(points: list[Point]) -> list[dict[str, Any]]:
    """One row per point: final kNN top-1 and cumulative wall time of its run (None while unfinished)."""
    rows = []
    for point in points:
        adversary = point.config["adversary"]
        series = point.series or point.config["method"] + ("" if adversary == "none" else f"+{adversary}")
        row = {"param": point.param, "value": point.value, "series": series, "run": str(point.run),
               "status": "new", "knn_top1": None, "wall_time": None, "vae": str(point.vae.run) if point.vae else None}
        metrics = point.run / "metrics.jsonl"
        records = read_metrics(metrics) if metrics.is_file() else []
        if records:
            row["status"] = "done" if finished(records, point.config["epochs"]) else "partial"
            row["wall_time"] = max((r["wall_time"] for r in records if "wall_time" in r), default=None)
            knn = [r["knn_top1"] for r in records if isinstance(r.get("knn_top1"), int | float)]
            row["knn_top1"] = knn[-1] if row["status"] == "done" and knn else None
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one section per swept parameter."""
    lines: list[str] = []
    for param in dict.fromkeys(r["param"] for r in rows):
        lines += [f"| {param} | series | kNN top-1 (%) | wall time (s) | status | run |",
                  "| ---: | --- | ---: | ---: | --- | --- |"]
        for r in (r for r in rows if r["param"] == param):
            knn = "-" if r["knn_top1"] is None else f"{r['knn_top1']:.2f}"
            wall = "-" if r["wall_time"] is None else f"{r['wall_time']:.0f}"
            lines.append(f"| {r['value']} | {r['series']} | {knn} | {wall} | {r['status']} | {r['run']} |")
        lines.append("")
    return "\n".join(lines)


def plot_param(rows: list[dict[str, Any]], param: str, path: Path) -> Path:
    """kNN top-1 against the swept values, one line per series (finished points only)."""
    mine = [r for r in rows if r["param"] == param]
    values = list(dict.fromkeys(r["value"] for r in mine))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    fig = new_figure(5.5, 4)
    ax = fig.subplots()
    for series in dict.fromkeys(r["series"] for r in mine):
        done = [r for r in mine if r["series"] == series and r["knn_top1"] is not None]
        xs = [r["value"] if numeric else values.index(r["value"]) for r in done]
        ax.plot(xs, [r["knn_top1"] for r in done], marker="o", label=series)
    if numeric and min(values) > 0 and max(values) / min(values) >= 8:
        ax.set_xscale("log")
    if numeric:
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xticks([], minor=True)  # a log axis would otherwise label its minor ticks over the swept values
    else:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set(xlabel=param, ylabel="final kNN top-1 (%)", title=f"sweep over {param}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(grid: Grid, points: list[Point]) -> dict[str, Any]:
    """sweep.md, sweep.json and sweep-PARAM.png in the sweep folder, from what the runs hold now."""
    rows = collect(points)
    (grid.out / "sweep.md").write_text(format_table(rows))
    plots = [str(plot_param(rows, param, grid.out / f"sweep-{_label(param)}.png")) for param in grid.sweep]
    report = {"grid": str(grid.path), "rows": rows, "plots": plots, "table": str(grid.out / "sweep.md")}
    (grid.out / "sweep.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def run_sweep(grid: Grid, progress: bool = True, dry_run: bool = False, echo: Any = print) -> dict[str, Any]:
    """Plan (validating every point first), then train what is missing, point by point, in order."""
    points = plan_sweep(grid)
    unique = list({str(p.run): p for p in points}.values())
    statuses = {p.name: point_status(p) for p in unique}
    echo(f"sweep: {len(points)} points, {len(unique)} runs in {grid.out} "
         f"({sum(s == 'done' for s in statuses.values())} finished)")
    if dry_run:
        for p in unique:
            echo(f"  {p.name}: {statuses[p.name]}" + (f" (VAE {p.vae.run})" if p.vae else ""))
        return {"rows": collect(points), "plots": [], "table": None}
    try:
        grid.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdaaError(f"cannot create sweep folder '{grid.out}' ({exc.strerror or type(exc).__name__})") from None
    for point in unique:
        if point.vae is not None and statuses[point.name] != "done":
            ensure_vae(point.vae, progress, echo)
        _ensure_point(point, grid, progress, echo)
        write_report(grid, points)
    return write_report(grid, points)
