"""Time-to-accuracy (paper Table 11): accuracy against wall-clock seconds for several runs on one plot.

Reads each run's metrics.jsonl; the "time" field restarts at 0 when a run is resumed, so the clock is made
cumulative (a resumed segment continues from the last record kept before it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from idaa.analysis.plots import new_figure
from idaa.errors import IdaaError


@dataclass
class Curve:
    """One run's accuracy measurements: cumulative seconds, epochs and accuracy (percent)."""

    label: str
    path: Path
    seconds: list[float]
    epochs: list[int]
    accuracy: list[float]
    total_seconds: float


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of the one in a run folder), with a cumulative "wall_time" added."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise IdaaError(f"'{path}' does not exist (expected a run folder with metrics.jsonl)")
    records, offset, previous = [], 0.0, 0.0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise IdaaError(f"'{path}' line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise IdaaError(f"'{path}' line {number} is not a JSON object")
        if isinstance(record.get("time"), int | float):
            if record["time"] < previous:  # a resumed run restarted its clock
                offset += previous
            previous = record["time"]
            record["wall_time"] = offset + record["time"]
        records.append(record)
    return records


def run_label(folder: Path) -> str:
    """'method+adversary' from the run's config.yaml, else the folder name."""
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return folder.name
    method, adversary = cfg.get("method"), cfg.get("adversary")
    if not method:
        return folder.name
    return method if adversary in (None, "none") else f"{method}+{adversary}"


def read_curve(run: str | Path, metric: str = "knn_top1") -> Curve:
    """The accuracy-vs-time curve of one run folder (or metrics.jsonl)."""
    path = Path(run)
    folder = path if path.is_dir() else path.parent
    records = read_metrics(path)
    points = [r for r in records if isinstance(r.get(metric), int | float) and "wall_time" in r]
    if not points:
        raise IdaaError(f"'{path}' has no records with both '{metric}' and 'time'")
    timed = [r["wall_time"] for r in records if "wall_time" in r]
    return Curve(run_label(folder), folder, [r["wall_time"] for r in points],
                 [int(r.get("epoch", r.get("step", 0))) for r in points], [float(r[metric]) for r in points],
                 max(timed))


def first_reaching(curve: Curve, target: float) -> float | None:
    """Seconds at the first evaluation with accuracy >= target (None if never): exact at evaluation points."""
    for seconds, accuracy in zip(curve.seconds, curve.accuracy, strict=True):
        if accuracy >= target:
            return seconds
    return None


def unique_labels(curves: list[Curve]) -> None:
    """Runs that share a label (same method and adversary) are told apart by their folders."""
    labels = [c.label for c in curves]
    for curve in curves:
        if labels.count(curve.label) > 1:
            curve.label = f"{curve.label} ({curve.path})"


def time_to_accuracy(runs: list[str], out: str | Path, target: float | None = None,
                     metric: str = "knn_top1") -> dict[str, Any]:
    """Plot every run's accuracy against seconds and tabulate when each first reaches `target`.

    The default target is the lowest final accuracy among the runs, so every run reaches it.
    """
    if not runs:
        raise IdaaError("give at least one run folder")
    curves = [read_curve(run, metric) for run in runs]
    unique_labels(curves)
    if target is None:
        target = min(c.accuracy[-1] for c in curves)
    rows = [{"run": c.label, "path": str(c.path), "final_accuracy": c.accuracy[-1], "total_seconds": c.total_seconds,
             "seconds_to_target": first_reaching(c, target), "points": list(zip(c.seconds, c.accuracy, strict=True))}
            for c in curves]
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdaaError(f"cannot create output folder '{out.parent}' ({exc.strerror or type(exc).__name__})") from None
    fig = new_figure(7, 4.5)
    ax = fig.subplots()
    for curve in curves:
        ax.plot(curve.seconds, curve.accuracy, marker="o", markersize=3, label=curve.label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}%")
    ylabel = "kNN top-1 (%)" if metric == "knn_top1" else f"{metric} (%)"
    ax.set(xlabel="wall-clock seconds (training + online evaluation)", ylabel=ylabel,
           title="time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    result = {"png": str(out), "metric": metric, "target": target, "runs": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown: run, final accuracy, seconds to the target (at evaluation granularity), total seconds."""
    lines = [f"| run | final {result['metric']} (%) | seconds to {result['target']:.2f}% | total seconds |",
             "| --- | ---: | ---: | ---: |"]
    for row in result["runs"]:
        reached = "not reached" if row["seconds_to_target"] is None else f"{row['seconds_to_target']:.0f}"
        lines.append(f"| {row['run']} | {row['final_accuracy']:.2f} | {reached} | {row['total_seconds']:.0f} |")
    return "\n".join(lines)
