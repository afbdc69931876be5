"""What a finished run measured, and the statistics the reproduce report draws from it.

Training time is the `train_time` field of metrics.jsonl (seconds spent in training steps, without the kNN
monitor or checkpoint writes); runs from before that field existed fall back to the cumulative wall time.
On a shared machine the seconds also follow the load of the moment; the kNN monitor does the same work in every
run of a protocol, so training seconds over the seconds of one kNN evaluation (`monitor_units`) is a cost that
load slows down alike and cancels out of. A difference of two means counts as real only when it exceeds twice its
standard error,
SE = sqrt(s1^2/n1 + s2^2/n2) over the seeds of each side.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idaa.analysis.time_to_accuracy import read_metrics
from idaa.experiments.runner import finished


@dataclass
class RunResult:
    """One run's final numbers and its kNN curve against training seconds (empty while unfinished)."""

    status: str = "new"
    epochs: int | None = None
    knn_top1: float | None = None
    train_time: float | None = None
    monitor_time: float | None = None
    wall_time: float | None = None
    timed_by: str = "train_time"
    curve_epochs: list[int] = field(default_factory=list)
    curve_seconds: list[float] = field(default_factory=list)
    curve_knn: list[float] = field(default_factory=list)
    linear_top1: float | None = None
    machine: str | None = None  # the machine (since its boot) its clocks ran on, when its metrics say
    hardware: str | None = None  # the kind of hardware (CPU model and vector units, or GPU) it ran on
    load: float | None = None  # mean 1-minute load average per CPU at its epochs' ends, when its metrics say

    @property
    def unit_seconds(self) -> float | None:
        """Seconds of one of the run's own kNN evaluations: the load-free unit (None without monitor timings)."""
        if not self.monitor_time or not self.curve_knn:
            return None
        return self.monitor_time / len(self.curve_knn)

    @property
    def monitor_units(self) -> float | None:
        """Training time in units of one kNN evaluation of the same run (None without monitor timings)."""
        unit = self.unit_seconds
        return self.train_time / unit if self.train_time and unit else None


def read_run(run: Path, epochs: int | None) -> RunResult:
    """The measurements of one run folder (status 'new', 'partial' or 'done')."""
    metrics = run / "metrics.jsonl"
    records = [r for r in read_metrics(metrics) if not r.get("partial")] if metrics.is_file() else []
    result = RunResult(status="new" if not records else "partial", epochs=epochs)
    if not records:
        return result
    timed = all("train_time" in r for r in records)
    result.timed_by = "train_time" if timed else "wall_time"
    for record in records:
        if isinstance(record.get("knn_top1"), int | float) and record.get(result.timed_by) is not None:
            result.curve_epochs.append(int(record["epoch"]))
            result.curve_seconds.append(float(record[result.timed_by]))
            result.curve_knn.append(float(record["knn_top1"]))
    if epochs is None or not finished(records, epochs):
        return result
    last = [r for r in records if r.get("epoch") == epochs][-1]
    result.status = "done"
    result.knn_top1 = float(last["knn_top1"]) if isinstance(last.get("knn_top1"), int | float) else None
    result.train_time = float(last[result.timed_by])
    result.monitor_time = float(last["monitor_time"]) if "monitor_time" in last else None
    result.wall_time = float(last["wall_time"]) if "wall_time" in last else None
    result.machine = last.get("machine")
    result.hardware = last.get("hardware")
    result.load = mean_load(records)
    return result


def mean_load(records: list[dict[str, Any]]) -> float | None:
    """The mean of the records' `load` (1-minute load per CPU at each epoch's end), None when none says."""
    loads = [r["load"] for r in records if isinstance(r.get("load"), int | float)]
    return statistics.fmean(loads) if loads else None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None when undefined: no value, or one value for the deviation)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Verdict:
    """A - B with its standard error and the plain-words verdict."""

    difference: float | None
    standard_error: float | None
    verdict: str


def compare(a: list[float], b: list[float]) -> Verdict:
    """Difference of means a - b; 'real' only when |difference| > 2 SE (needs two seeds on each side)."""
    if not a or not b:
        return Verdict(None, None, "not run yet")
    difference = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Verdict(difference, None, "one seed: no verdict")
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return Verdict(difference, se, "real" if abs(difference) > 2 * se else "within noise")


def first_reaching(seconds: list[float], accuracy: list[float], target: float) -> float | None:
    """Training seconds at the first kNN evaluation with accuracy >= target (None if never)."""
    return next((s for s, a in zip(seconds, accuracy, strict=True) if a >= target), None)


def time_fractions(variant: dict[int, RunResult], reference: dict[int, RunResult]) -> tuple[list[float], int]:
    """Per seed: compute for the variant to reach the reference's final kNN, over the reference's own compute.

    The paper's Table 11 ratio (IDAA's time to reach SimCLR's accuracy over SimCLR's). Compute is training
    seconds over the seconds of one of the run's own kNN evaluations (`unit_seconds`), so runs timed on machines
    of other speeds or loads compare; a pair without monitor timings falls back to raw seconds. Seeds are paired
    (the same seed's reference run sets the target); returns the fractions of the seeds that reached it and how
    many seeds were compared.
    """
    fractions, compared = [], 0
    for seed, ref in reference.items():
        run = variant.get(seed)
        if ref.status != "done" or ref.knn_top1 is None or run is None or run.status != "done":
            continue
        compared += 1
        ref_time = first_reaching(ref.curve_seconds, ref.curve_knn, ref.knn_top1)
        reached = first_reaching(run.curve_seconds, run.curve_knn, ref.knn_top1)
        if reached is not None and ref_time:
            run_unit, ref_unit = run.unit_seconds, ref.unit_seconds
            scale = ref_unit / run_unit if run_unit and ref_unit else 1.0
            fractions.append(reached / ref_time * scale)
    return fractions, compared


def fmt(mean: float | None, std: float | None, digits: int | None = 2) -> str:
    """'12.34 ± 0.56', '12.34' for one seed, '-' for none; digits=None: fewer decimals for larger numbers."""
    if mean is None:
        return "-"
    if digits is None:  # seconds: 1234 s, 56.7 s, 0.84 s
        digits = 0 if abs(mean) >= 100 else 1 if abs(mean) >= 10 else 2
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def summary(results: list[RunResult], key: str) -> tuple[float | None, float | None]:
    """Mean and std of one field over the finished runs that have it."""
    return mean_std([getattr(r, key) for r in results if r.status == "done" and getattr(r, key) is not None])


def as_row(result: RunResult) -> dict[str, Any]:
    """The CSV columns of one run's numbers."""
    return {"status": result.status, "epochs": result.epochs, "knn_top1": result.knn_top1,
            "train_time_s": result.train_time, "monitor_time_s": result.monitor_time,
            "wall_time_s": result.wall_time, "timed_by": result.timed_by, "monitor_units": result.monitor_units,
            "linear_top1": result.linear_top1}
