"""The reproduce report's figures: kNN accuracy against training seconds, and time to the reference's accuracy."""

from __future__ import annotations

import statistics
from pathlib import Path

from idaa.analysis.plots import new_figure
from idaa.experiments.measure import RunResult, mean_std, time_fractions

PAPER_TABLE_11 = 0.76  # SimCLR+IDAA reached SimCLR's accuracy in 0.76 of SimCLR's time (1.35e4 s / 1.77e4 s)


def mean_curve(runs: list[RunResult]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Seconds, mean, min and max kNN at the epochs every run with a curve has measured."""
    curves = [r for r in runs if r.curve_epochs]
    if not curves:
        return [], [], [], []
    common = sorted(set.intersection(*(set(r.curve_epochs) for r in curves)))
    seconds, mean, low, high = [], [], [], []
    for epoch in common:
        points = [(r.curve_seconds[r.curve_epochs.index(epoch)], r.curve_knn[r.curve_epochs.index(epoch)])
                  for r in curves]
        seconds.append(statistics.fmean(p[0] for p in points))
        accuracy = [p[1] for p in points]
        mean.append(statistics.fmean(accuracy))
        low.append(min(accuracy))
        high.append(max(accuracy))
    return seconds, mean, low, high


def plot_accuracy_vs_time(table: dict[str, dict[int, RunResult]], path: Path) -> Path:
    """kNN top-1 against training seconds: one line per variant (mean over seeds), the seeds' range as a band."""
    fig = new_figure(7.5, 4.8)
    ax = fig.subplots()
    for variant, by_seed in table.items():
        seconds, mean, low, high = mean_curve(list(by_seed.values()))
        if not seconds:
            continue
        n = sum(1 for r in by_seed.values() if r.curve_epochs)
        (line,) = ax.plot(seconds, mean, marker="o", markersize=2.5, label=f"{variant} ({n} seed{'s' * (n > 1)})")
        if n > 1:
            ax.fill_between(seconds, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set(xlabel="training seconds (kNN monitor and checkpoint writes excluded)", ylabel="kNN top-1 (%)",
           title="accuracy against training time (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_time_to_accuracy(table: dict[str, dict[int, RunResult]], reference: str | None, path: Path) -> Path:
    """Per variant: time to reach the reference's final kNN as a fraction of the reference's (mean ± std)."""
    fig = new_figure(7, 0.9 + 0.35 * max(len(table), 2))
    ax = fig.subplots()
    names, means, stds = [], [], []
    if reference in table:
        for variant, by_seed in table.items():
            if variant == reference:
                continue
            fractions, compared = time_fractions(by_seed, table[reference])
            mean, std = mean_std(fractions)
            if compared:
                names.append(f"{variant} ({len(fractions)}/{compared} reached)")
                means.append(mean if mean is not None else 0.0)
                stds.append(std or 0.0)
    if names:
        ax.barh(range(len(names)), means, xerr=stds, color="#1f77b4", alpha=0.8, capsize=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no finished runs to compare yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.axvline(1.0, color="black", linewidth=1, label=f"{reference or 'reference'} (1.0)")
    ax.axvline(PAPER_TABLE_11, color="grey", linestyle="--", linewidth=1, label=f"paper Table 11 ({PAPER_TABLE_11})")
    ax.set(xlabel=f"compute to reach {reference or 'the reference'}'s final kNN, as a fraction of its own (load-free)",
           title="time to accuracy")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
