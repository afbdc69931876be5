"""The reproduce report: report.md (tables with verdicts and the commands behind them), results.csv, figures.

Every number comes from the run folders (metrics.jsonl, eval.json), so the report can be rewritten at any time,
also while the grid is still running. `readme_section` is the short summary meant for a README.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from pathlib import Path
from typing import Any

from idaa.errors import IdaaError
from idaa.experiments.figures import PAPER_TABLE_11, plot_accuracy_vs_time, plot_time_to_accuracy
from idaa.experiments.measure import RunResult, Verdict, as_row, compare, fmt, mean_std, summary, time_fractions
from idaa.experiments.protocol import Protocol
from idaa.experiments.reproduce import (
    Run,
    VAETiming,
    linear_command,
    linear_result,
    read_resolved,
    recorded_vae,
    results_by_variant,
    vae_on_disk,
)
from idaa.fileio import atomic_write_text, copy_into
from idaa.train.config import resolve_config

START, END = "<!-- reproduce:start -->", "<!-- reproduce:end -->"
RULE = ("A difference counts as real only when it exceeds twice its standard error, SE = sqrt(s1²/n1 + s2²/n2) "
        "over the seeds of each side.")


@dataclasses.dataclass
class Report:
    """Everything the tables are made of."""

    protocol: Protocol
    runs: list[Run]
    table: dict[str, dict[int, RunResult]]
    command: str

    def values(self, variant: str, key: str = "knn_top1") -> list[float]:
        return [getattr(r, key) for r in self.table.get(variant, {}).values()
                if r.status == "done" and getattr(r, key) is not None]


def collect(protocol: Protocol, runs: list[Run], command: str) -> Report:
    """Read every run folder (and its linear probe) into one Report."""
    table = results_by_variant(runs)
    for run in runs:
        if run.variant in protocol.linear:
            record = linear_result(run, protocol.linear_limit)
            table[run.variant][run.seed].linear_top1 = record["linear_top1"] if record else None
    return Report(protocol, runs, table, command)


def _flags(protocol: Protocol, config: dict[str, Any] | None) -> str:
    """The pretrain flags that set this run apart from the protocol's base (seed and folder aside)."""
    if config is None:
        return "(waits for its dependencies)"
    base = dataclasses.asdict(resolve_config({**protocol.preset, **protocol.overrides}, {"out": "-"}))
    words = [f"--{k.replace('_', '-')} {v}" for k, v in config.items()  # a variant without a VAE: no --vae
             if k not in ("out", "seed") and base.get(k) != v and not isinstance(v, dict)
             and not (k == "vae" and v is None)]
    return " ".join(words) or "(the base)"


def _verdict_text(v: Verdict, first: str, second: str) -> str:
    if v.verdict == "real":
        return f"real: {first if v.difference > 0 else second} better"
    return v.verdict


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def runs_table(r: Report) -> list[str]:
    ref = r.protocol.reference
    ref_time = mean_std(r.values(ref, "train_time"))[0] if ref else None
    ref_units = mean_std(r.values(ref, "monitor_units"))[0] if ref else None
    lines = [f"| variant | flags over the base | seeds done | epochs | kNN top-1 (%) | training time (s) | "
             f"time vs {ref or 'reference'} | kNN monitor (s) | load-free time vs {ref or 'reference'} |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in r.protocol.variants:
        first = next(run for run in r.runs if run.variant == name)
        results = list(r.table[name].values())
        done = sum(x.status == "done" for x in results)
        train = summary(results, "train_time")
        ratio = f"{train[0] / ref_time:.2f}x" if train[0] is not None and ref_time else "-"
        units = summary(results, "monitor_units")[0]
        corrected = f"{units / ref_units:.2f}x" if units is not None and ref_units else "-"
        epochs = first.config["epochs"] if first.config else "?"
        lines.append(f"| {name} | `{_flags(r.protocol, first.config)}` | {done}/{len(results)} | {epochs} | "
                     f"{fmt(*summary(results, 'knn_top1'))} | {fmt(*train, digits=None)} | {ratio} | "
                     f"{fmt(*summary(results, 'monitor_time'), digits=None)} | {corrected} |")
    return lines


BUSY_LOAD = 1.25  # mean 1-minute load per CPU above which a run shared its CPUs with other work


def busy_runs(r: Report) -> list[str]:
    """A line naming the runs trained while other work shared their CPUs (empty when there is none)."""
    busy = [f"{variant}-s{seed} ({result.load:.2f})" for variant, seeds in r.table.items()
            for seed, result in sorted(seeds.items()) if result.load is not None and result.load > BUSY_LOAD]
    if not busy:
        return []
    return ["", f"Trained while other work shared the CPUs (mean 1-minute load per CPU above {BUSY_LOAD}), so "
                f"their costs, in kNN units too, are bent upward: {', '.join(busy)}."]


def hardware_kinds(r: Report) -> list[str]:
    """A line naming the kinds of hardware the finished runs were timed on, when there is more than one."""
    kinds: dict[str, list[str]] = {}
    for variant, seeds in r.table.items():
        for seed, result in sorted(seeds.items()):
            if result.status == "done":
                kinds.setdefault(result.hardware or "not recorded", []).append(f"{variant}-s{seed}")
    if len(kinds) < 2:
        return []
    listed = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in kinds.items())
    return ["", "Timed on more than one kind of hardware. The load-free measure cancels a machine's speed, not a "
                "mix of work that runs faster on one kind than on another (a bf16 VAE is native on CPUs with "
                f"AVX512-BF16 and emulated on the others), so compare costs within one kind: {listed}."]


def comparison_table(r: Report, pairs: list[tuple[str, str]], timed: bool = False,
                     key: str = "knn_top1") -> list[str]:
    extra = " training time (s): first / second |" if timed else ""
    what = "kNN" if key == "knn_top1" else "linear"
    lines = [f"| first | second | first {what} (%) | second {what} (%) | difference | 2 SE |{extra} verdict |",
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if timed else "") + " --- |"]
    for first, second in pairs:
        a, b = r.values(first, key), r.values(second, key)
        v = compare(a, b)
        two_se = "-" if v.standard_error is None else f"{2 * v.standard_error:.2f}"
        times = ""
        if timed:
            times = (f" {fmt(mean_std(r.values(first, 'train_time'))[0], None, None)} / "
                     f"{fmt(mean_std(r.values(second, 'train_time'))[0], None, None)}")
            if r.protocol.match_by == "knn-units":  # what the match was made on: the load-free measure
                times += (f" ({fmt(mean_std(r.values(first, 'monitor_units'))[0], None, None)} / "
                          f"{fmt(mean_std(r.values(second, 'monitor_units'))[0], None, None)} kNN units)")
            times += " |"
        lines.append(f"| {first} | {second} | {fmt(*mean_std(a))} | {fmt(*mean_std(b))} | {_signed(v.difference)} | "
                     f"{two_se} |{times} {_verdict_text(v, first, second)} |")
    return lines


def equal_time_pairs(protocol: Protocol) -> list[tuple[str, str]]:
    """(IDAA variant, its compute-matched baseline) for every match_time_of variant, then the compare_time pairs."""
    matched = [(v.match_time_of, v.name) for v in protocol.variants.values() if v.match_time_of]
    return matched + [pair for pair in protocol.compare_time if pair not in matched]


GOAL = ("Goal: an IDAA setting that beats SimCLR given the same compute (its `match_time_of` baseline) by more "
        "than two standard errors, by kNN and by the linear probe, at each training budget.")


def _pair_verdict(r: Report, first: str, second: str) -> tuple[str, bool, bool]:
    """(the pair's numbers in words, whether every seed of both sides is done, whether IDAA wins by both probes)."""
    n, probed = len(r.protocol.seeds), first in r.protocol.linear and second in r.protocol.linear
    words, wins, done = [], probed, True
    for key, what in [("knn_top1", "kNN"), ("linear_top1", "linear")][:1 + probed]:
        a, b = r.values(first, key), r.values(second, key)
        done = done and len(a) == len(b) == n
        v = compare(a, b)
        wins = wins and v.verdict == "real" and v.difference is not None and v.difference > 0
        two_se = "" if v.standard_error is None else f" (2 SE {2 * v.standard_error:.2f})"
        words.append(f"{what} {_signed(v.difference)}{two_se}")
    seeds = min(len(r.values(first)), len(r.values(second)))
    text = f"{first} vs {second}: {', '.join(words)}" + ("" if probed else ", linear not probed")
    return text + ("" if done else f" ({seeds}/{n} seeds)"), done, wins


def goal_lines(r: Report) -> list[str]:
    """Whether the goal is met, one line per training budget (the IDAA variant's epochs), from the finished pairs.

    A pair counts once every seed of both sides is done; unfinished pairs are named with their seeds so far.
    """
    budgets: dict[Any, list[tuple[str, str, bool, bool]]] = {}
    for variant in r.protocol.variants.values():
        if variant.match_time_of:
            run = next(x for x in r.runs if x.variant == variant.match_time_of)
            epochs = run.config["epochs"] if run.config else "?"
            pair = (variant.match_time_of, *_pair_verdict(r, variant.match_time_of, variant.name))
            budgets.setdefault(epochs, []).append(pair)
    lines = []
    for epochs, pairs in budgets.items():
        finished = [text for _, text, done, _ in pairs if done]
        winners = [first for first, _, done, wins in pairs if done and wins]
        pending = "; ".join(text for _, text, done, _ in pairs if not done)
        if winners:
            said = f"met by {', '.join(winners)}"
        elif finished:
            said = (f"not met{' so far' * bool(pending)}: no IDAA setting beats SimCLR given the same compute by "
                    f"both probes (difference IDAA - SimCLR: {'; '.join(finished)})")
        else:
            said = "not measured yet"
        lines.append(f"- At {epochs} epochs: {said}." + (f" Still training: {pending}." if pending else ""))
    return lines


def partial_matches(protocol: Protocol) -> str:
    """A sentence naming the deferred variants resolved over fewer seeds than the protocol's (empty if none)."""
    resolved = read_resolved(protocol)
    notes = [f"`{name}` over seed(s) {', '.join(map(str, found['seeds']))} only"
             for name, found in resolved.items() if name in protocol.variants and
             sorted(found.get("seeds", [])) != sorted(protocol.match_seeds)]
    return f" Measured over fewer seeds than the protocol's: {'; '.join(notes)}." if notes else ""


def best_of_pairs(protocol: Protocol) -> list[tuple[str, str]]:
    resolved = read_resolved(protocol)
    return [(v.name, resolved[v.name]["best"]) for v in protocol.variants.values()
            if v.best_of and v.name in resolved]


def time_table(r: Report) -> list[str]:
    ref = r.protocol.reference
    lines = [f"| variant | seeds that reached {ref}'s final kNN | load-free compute to reach it / {ref}'s "
             "(mean ± std) |",
             "| --- | ---: | ---: |"]
    for name, by_seed in r.table.items():
        if name == ref:
            continue
        fractions, compared = time_fractions(by_seed, r.table[ref])
        if compared:
            lines.append(f"| {name} | {len(fractions)}/{compared} | {fmt(*mean_std(fractions))} |")
    return lines


def linear_table(r: Report) -> list[str]:
    limit = r.protocol.linear_limit
    lines = ["| variant | seeds | linear top-1 (%) | commands |", "| --- | ---: | ---: | --- |"]
    for name in r.protocol.linear:
        values = r.values(name, "linear_top1")
        commands = "<br>".join(f"`{linear_command(run, limit)}`" for run in r.runs if run.variant == name)
        lines.append(f"| {name} | {len(values)} | {fmt(*mean_std(values))} | {commands} |")
    return lines


def _section(title: str, text: str, rows: list[str]) -> list[str]:
    return [f"## {title}", "", text, "", *rows, ""]


MATCHED_IN_UNITS = (", both counted in their runs' own kNN evaluations (`match_by: knn-units`), which machine "
                    "load cannot bend while it is steady")


def _vae_time(timing: VAETiming | None) -> str:
    if timing is None:
        return "an unknown time (its metrics.jsonl is not beside it)"
    text = f"{timing.seconds:.0f} s" + (f" on {timing.hardware}" if timing.hardware else "")
    if timing.load is not None and timing.load > BUSY_LOAD:
        text += f" while other work shared its CPUs (mean load per CPU {timing.load:.2f})"
    return text


def vae_lines(r: Report) -> list[str]:
    """The training time of each VAE the grid's runs used: a user pays it too, once per dataset.

    A run trained by this version recorded the VAE it used (`vae.json`: every machine of a grid trains its own);
    for older runs only the VAE now on disk can be read.
    """
    lines = []
    for path in sorted({run.config["vae"] for run in r.runs if run.config and run.config.get("vae")}):
        used = [run for run in r.runs if run.config and run.config.get("vae") == path]
        users = ", ".join(sorted({run.variant for run in used}))
        now = _vae_time(vae_on_disk(Path(path)))
        done = [run for run in used if r.table[run.variant][run.seed].status == "done"]
        timings = {run.name: recorded_vae(run) for run in done}
        recorded: dict[str, list[str]] = {}
        for name, timing in timings.items():
            if timing is not None:
                recorded.setdefault(_vae_time(timing), []).append(name)
        if not recorded:
            lines.append(f"- `{path}` trained in {now}; used by {users}.")
            continue
        parts = [f"{time} for {', '.join(names)}" for time, names in recorded.items()]
        older = [name for name, timing in timings.items() if timing is None]
        if older:
            parts.append(f"not recorded for {', '.join(older)} (the VAE there now: {now})")
        lines.append(f"- `{path}` (used by {users}) trained, by each run's own record, in {'; '.join(parts)}.")
    for name, found in read_resolved(r.protocol).items():
        if name in r.protocol.variants and "vae_knn_units" in found:
            beside = found.get("vae_units_from")
            speed = f"those of {', '.join(beside)}, timed on the VAE's machine" if beside else \
                f"the mean of {found['rate_from']}'s (no run was timed on the VAE's machine)"
            lines.append(f"- `{name}` counted its VAE's {found['vae_train_time']:.0f} s as "
                         f"{found['vae_knn_units']:.1f} kNN evaluations at the speed of {speed}.")
    return lines


def report_markdown(r: Report) -> str:
    """The whole report.md."""
    p, ref = r.protocol, r.protocol.reference
    seeds = ", ".join(map(str, p.seeds))
    parts = ["# Is IDAA worth its compute?", "",
             f"Protocol `{p.path}`, seeds {seeds}; every run trained alone, one after another. Made by:", "",
             f"    {r.command}", "",
             "Training time counts the training steps only (the kNN monitor and checkpoint writes are timed apart), "
             f"so monitoring never favours a variant. kNN: final epoch, never the best one. {RULE}", ""]
    parts += _section("Runs", "Mean ± std over the finished seeds; each run's command is listed at the end. The "
                      "last column counts each run's training time in seconds of its own kNN evaluations (the same "
                      "work in every run), so a steady load on a shared machine cancels out of it (a job that comes "
                      "and goes beside a run does not) and it checks that a compute-matched run matched.",
                      runs_table(r) + busy_runs(r) + hardware_kinds(r))
    if vae_lines(r):
        parts += ["The VAE's own training (a matched baseline with `plus_vae_time` counts it in its budget):", "",
                  *vae_lines(r), ""]
    if p.compare:
        parts += _section("At equal epochs", "Final kNN top-1; difference = first - second.",
                          comparison_table(r, p.compare))
    if equal_time_pairs(p):
        parts += _section("At equal training time", "Each compute-matched baseline trains for as many epochs as fit "
                          "in its IDAA variant's training time (its cosine schedule spans them all)"
                          f"{MATCHED_IN_UNITS if p.match_by == 'knn-units' else ''}; "
                          "`resolved.json` holds the measured times. Pairs listed under `compare_time` cost the same "
                          f"by construction (e.g. another eps at the same attack schedule).{partial_matches(p)}",
                          comparison_table(r, equal_time_pairs(p), True))
        if goal_lines(r):
            parts += [GOAL, "", *goal_lines(r), ""]
    if best_of_pairs(p):
        parts += _section("Other settings for the best variant", "Each `best_of` variant (first) takes the "
                          "settings of the candidate with the best mean final kNN (second) and changes what it sets.",
                          comparison_table(r, best_of_pairs(p)))
    if ref:
        parts += _section(f"Time to reach {ref}'s final accuracy",
                          f"Per seed, the training compute until the first kNN evaluation at or above {ref}'s final "
                          f"kNN (same seed), over the compute {ref} itself took to first reach it (kNN every "
                          "`knn_every` epochs sets the resolution). Compute is load-free: each run's training "
                          "seconds over the seconds of one of its own kNN evaluations, so seeds timed on other "
                          f"machines compare. The paper's Table 11 reports {PAPER_TABLE_11} for SimCLR+IDAA.",
                          time_table(r))
    if p.linear:
        parts += _section("Linear probe", "`idaa eval linear` on each final checkpoint (frozen backbone; weight "
                          "decay chosen on a held-out part of the training set).", linear_table(r))
        probed = [pair for pair in p.compare + equal_time_pairs(p) if all(v in p.linear for v in pair)]
        if probed:
            parts += ["The same comparisons by linear top-1 (pairs whose both sides are probed):", "",
                      *comparison_table(r, probed, key="linear_top1"), ""]
    parts += ["## Figures", "", "![accuracy against training time](accuracy-vs-time.png)", "",
              "![time to accuracy](time-to-accuracy.png)", "", "## Commands", "",
              "Each run's resolved settings are in the preset it was trained from:", "", "```"]
    parts += [run.command() if run.config else f"# {run.name}: waits for {', '.join(run.waits_for)}"
              for run in r.runs]
    return "\n".join(parts + ["```", ""])


def results_csv(r: Report) -> str:
    """One row per run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["variant", "seed", "run", *as_row(RunResult()), "command"]
    writer.writerow(header)
    for run in r.runs:
        row = as_row(r.table[run.variant][run.seed])
        writer.writerow([run.variant, run.seed, str(run.source), *row.values(), run.command() if run.config else ""])
    return buffer.getvalue()


def write_report(protocol: Protocol, runs: list[Run], command: str) -> dict[str, Path]:
    """report.md, results.csv, accuracy-vs-time.png and time-to-accuracy.png in the protocol's folder."""
    r = collect(protocol, runs, command)
    out = protocol.out
    paths = {"report": out / "report.md", "csv": out / "results.csv", "accuracy": out / "accuracy-vs-time.png",
             "time": out / "time-to-accuracy.png"}
    plot_accuracy_vs_time(r.table, paths["accuracy"])
    plot_time_to_accuracy(r.table, protocol.reference, paths["time"])
    atomic_write_text(paths["csv"], results_csv(r))
    atomic_write_text(paths["report"], report_markdown(r))
    return paths


def publish_report(protocol: Protocol, paths: dict[str, Path]) -> Path:
    """Copy the report files (and resolved.json) to the protocol's publish folder, e.g. docs/, to commit them."""
    assert protocol.publish is not None
    target = protocol.publish
    files = [*paths.values()] + [f for f in [protocol.out / "resolved.json"] if f.is_file()]
    try:
        copy_into(files, target)
    except OSError as exc:
        raise IdaaError(f"cannot publish to '{target}' ({exc.strerror or type(exc).__name__})") from None
    return target


def readme_section(protocol: Protocol, runs: list[Run], command: str, published: str | Path | None = None) -> str:
    """A short marker-delimited summary for a README: the verdicts in words, the numbers from the runs.

    The link goes to the published copy of the report when there is one (`--publish`), else to the report folder.
    """
    r = collect(protocol, runs, command)
    n = len(protocol.seeds)
    report = (Path(published) if published is not None else protocol.out) / "report.md"
    source = "" if published is None else f", published from {protocol.out}/"
    lines = [START, f"Made by `{command}` ({n} seed{'s' * (n > 1)}; full report: [{report}]({report}){source}). "
             f"{RULE}", ""]
    if goal_lines(r):
        lines += [GOAL, "", *goal_lines(r), ""]
    for first, second in protocol.compare:
        lines.append(_sentence(r, first, second, "at equal epochs"))
    for first, second in equal_time_pairs(protocol):
        probes = [("knn_top1", "On this protocol")]
        if first in protocol.linear and second in protocol.linear and r.values(first, "linear_top1"):
            probes.append(("linear_top1", "By the linear probe,"))
        for key, lead in probes:
            lines.append(_sentence(r, first, second, "at equal training time", key))
            v = compare(r.values(first, key), r.values(second, key))
            if v.verdict == "within noise" or v.verdict == "real" and v.difference < 0:
                lines.append(f"  {lead} {first} does not beat SimCLR trained for the same time ({second}).")
    ref = protocol.reference
    for name in dict.fromkeys(first for first, _ in equal_time_pairs(protocol)):
        fractions, compared = time_fractions(r.table.get(name, {}), r.table.get(ref, {})) if ref else ([], 0)
        if compared:
            lines.append(f"- {name} reached {ref}'s final kNN in {fmt(*mean_std(fractions))} of {ref}'s training "
                         f"compute, load-free ({len(fractions)}/{compared} seeds reached it; the paper's Table 11: "
                         f"{PAPER_TABLE_11}).")
    lines += ["", *runs_table(r), "", END]
    return "\n".join(lines) + "\n"


def _sentence(r: Report, first: str, second: str, when: str, key: str = "knn_top1") -> str:
    a, b = r.values(first, key), r.values(second, key)
    v = compare(a, b)
    two_se = "" if v.standard_error is None else f", 2 SE {2 * v.standard_error:.2f}"
    what = "kNN" if key == "knn_top1" else "linear"
    return (f"- {first} vs {second} {when}: {fmt(*mean_std(a))} vs {fmt(*mean_std(b))} {what} top-1, difference "
            f"{_signed(v.difference)}{two_se}: {_verdict_text(v, first, second)}.")


def write_readme_section(path: str | Path, text: str) -> Path:
    """Replace the marked section of `path` (or create the file); a file without the markers is left alone."""
    path = Path(path)
    if path.is_file():
        old = path.read_text()
        # markers count only on lines of their own, so prose that quotes them (`<!-- reproduce:start -->`) is kept
        section = re.compile(f"^{re.escape(START)}[ \t]*$.*?^{re.escape(END)}[ \t]*$\n?", re.S | re.M)
        if not section.search(old):
            raise IdaaError(f"'{path}' has no {START} ... {END} markers on lines of their own; add them where "
                            "the summary goes")
        text = section.sub(lambda _: text, old, count=1)
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise IdaaError(f"cannot write '{path}' ({exc.strerror or type(exc).__name__})") from None
    return path
