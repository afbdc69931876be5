"""`idaa reproduce PROTOCOL.yaml`: train a protocol's variants x seeds one at a time, resumably, then report.

Every pretraining run is its own `idaa pretrain` process, alone on the machine (so training times compare);
a finished run is reused and an interrupted one resumed, so running the same command again continues the grid.
Compute-matched and best-of variants are resolved once the runs they depend on have finished (see
`idaa.experiments.protocol`). The final checkpoints of the `linear:` variants then get the linear probe of
`idaa eval linear` as soon as they finish, and the report folder is rewritten after every run.

With `--publish DIR` every finished run also leaves its record in `DIR/runs/<run>/` (config.yaml, metrics.jsonl
and, for a probed variant, eval.json: a few kB, no checkpoint), and `DIR/resolved.json`. A run whose folder is
gone or unfinished but whose record is complete, with the same settings, is taken from the record instead of
being trained again: a grid kept in a repository's docs/ continues on another machine, or after its scratch
folder was lost, and the report is rewritten from the records.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idaa.adversaries import VAE_ADVERSARIES
from idaa.analysis.time_to_accuracy import read_metrics
from idaa.devices import hardware, native_bf16, resolve_device
from idaa.errors import IdaaError
from idaa.experiments.measure import RunResult, mean_load, read_run
from idaa.experiments.protocol import Protocol, Variant, stages
from idaa.experiments.runner import (
    VAE_INHERITED,
    VAEJob,
    check_same_run,
    ensure_vae,
    finished,
    pretrain_command,
    run_child,
    run_status,
)
from idaa.fileio import atomic_write_text, copy_into, file_digest
from idaa.train.config import resolve_config

WHAT = "reproduce"


@dataclass
class Run:
    """One (variant, seed) run: its folder and, once its variant is resolved, its full pretrain config."""

    variant: str
    seed: int
    path: Path
    config: dict[str, Any] | None
    vae: VAEJob | None
    waits_for: list[str]
    record: Path | None = None  # its published record, when the protocol publishes
    recorded: bool = False  # the run is taken from that record (its own folder is gone or unfinished)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def source(self) -> Path:
        """The folder its measurements are read from: the published record, or the run folder."""
        return self.record if self.recorded and self.record is not None else self.path

    @property
    def preset(self) -> Path:
        return self.path.parent.parent / "presets" / f"{self.name}.yaml"

    def command(self) -> str:
        """The command line that trains this run (as a user would type it)."""
        return f"idaa pretrain --config {self.preset} --out {self.path}"


def read_resolved(protocol: Protocol) -> dict[str, dict[str, Any]]:
    """What earlier invocations measured for the deferred variants (`<out>/resolved.json`)."""
    path = protocol.out / "resolved.json"
    if not path.is_file() and protocol.publish is not None:
        path = protocol.publish / "resolved.json"  # the published copy, when the report folder was lost
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise IdaaError(f"'{path}' is not valid JSON; delete it to measure the matched variants again") from None
    return data if isinstance(data, dict) else {}


def variant_settings(protocol: Protocol, variant: Variant,
                     resolved: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Base + settings + the variant's own (+ its resolution); None while a deferred variant is unresolved."""
    settings = dict(protocol.preset)
    found = resolved.get(variant.name, {})
    if variant.best_of:
        if "best" not in found:
            return None
        settings.update(protocol.variants[found["best"]].settings)
    settings.update(variant.settings)
    if variant.match_time_of:
        if "epochs" not in found:
            return None
        settings["epochs"] = found["epochs"]
    settings.update(protocol.overrides)
    return settings


def _stand_ins(variant: Variant) -> list[dict[str, Any]]:
    """Resolutions to validate an unresolved variant with: every best_of candidate, or a placeholder epoch count."""
    return [{"best": c} for c in variant.best_of] or [{"epochs": 1}]


def _vae_for(protocol: Protocol, settings: dict[str, Any], name: str) -> tuple[str | None, VAEJob | None]:
    """The VAE file a VAE-based variant uses (given, or trained from the protocol's vae: block)."""
    if settings.get("adversary") not in VAE_ADVERSARIES:
        return None, None
    if settings.get("vae"):
        return str(settings["vae"]), None
    if protocol.vae is None:
        raise IdaaError(f"variant '{name}' uses adversary '{settings['adversary']}' but names no VAE: pass --vae, "
                        "set settings.vae or add a 'vae:' block")
    inherited = {k: protocol.preset.get(k) for k in VAE_INHERITED if k != "seed"}
    inherited.update({k: v for k, v in protocol.overrides.items() if k in VAE_INHERITED})
    job = VAEJob({**{k: v for k, v in inherited.items() if v is not None}, **protocol.vae}, protocol.out / "vae")
    return str(job.run / "vae.pt"), job


def _config(protocol: Protocol, settings: dict[str, Any], seed: int, path: Path,
            name: str) -> tuple[dict[str, Any], VAEJob | None]:
    vae, job = _vae_for(protocol, settings, name)
    settings = {**settings, "vae": vae, "seed": seed}
    config = dataclasses.asdict(resolve_config(settings, {"out": str(path)}))
    return config, job


def _require_vae(config: dict[str, Any], job: VAEJob | None, name: str) -> None:
    """A run that will train needs its VAE file now (or the protocol's VAE job that makes it)."""
    if config.get("vae") and job is None and not Path(config["vae"]).is_file():
        raise IdaaError(f"VAE '{config['vae']}' (variant '{name}') does not exist")


def plan(protocol: Protocol, resolved: dict[str, dict[str, Any]] | None = None, training: bool = True) -> list[Run]:
    """Every run in training order (dependencies first, seed by seed within a stage), each config validated.

    With `training`, every run still to train must have its VAE; finished runs and published records need none,
    and neither do --dry-run and --report-only.
    """
    resolved = read_resolved(protocol) if resolved is None else resolved
    runs = []
    for stage in stages(protocol):
        for seed in protocol.seeds:
            for name in stage:
                variant = protocol.variants[name]
                path = protocol.out / "runs" / f"{name}-s{seed}"
                settings = variant_settings(protocol, variant, resolved)
                if settings is None:  # validate against every stand-in now; plan it for real once resolved
                    for stand_in in _stand_ins(variant):
                        config, job = _config(protocol, variant_settings(protocol, variant, {name: stand_in}), seed,
                                              path, name)
                        if training:
                            _require_vae(config, job, name)
                    runs.append(Run(name, seed, path, None, None, variant.depends_on))
                    continue
                config, job = _config(protocol, settings, seed, path, name)
                run = Run(name, seed, path, config, job, [])
                status = run_status(path, config, "the protocol") if training or protocol.publish else None
                if protocol.publish is not None:
                    run.record = protocol.publish / "runs" / run.name
                    run.recorded = status != "done" and _complete_record(protocol, run)
                if training and not run.recorded and status != "done":
                    _require_vae(config, job, name)
                runs.append(run)
    return runs


def _complete_record(protocol: Protocol, run: Run) -> bool:
    """Whether to take an unfinished run from its published record: whether the record is finished.

    A record counts when it has the final epoch and, for a variant the protocol probes, the linear result made
    with the protocol's limit; a record of other settings is refused like a run folder of other settings.
    """
    assert run.config is not None and run.record is not None
    if not (run.record / "metrics.jsonl").is_file():
        return False
    check_same_run(run.record, run.config, "the protocol")
    if not finished(read_metrics(run.record / "metrics.jsonl"), run.config["epochs"]):
        return False
    return run.variant not in protocol.linear or _read_eval(run.record / "eval.json", protocol.linear_limit) \
        is not None


def _read_eval(path: Path, limit: int | None) -> dict[str, Any] | None:
    """A reproduce linear-probe record made with this limit (None if missing, unreadable or another limit)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and record.get("reproduce_limit", "absent") == limit else None


def publish_run(protocol: Protocol, run: Run) -> None:
    """Copy a run finished in its folder to its published record (its probe too, once made from last.ckpt)."""
    if run.record is None or run.recorded or run.config is None or \
            run_status(run.path, run.config, "the protocol") != "done":
        return
    files = [path for path in (run.path / "config.yaml", run.path / "metrics.jsonl", run.path / VAE_RECORD)
             if path.is_file()]
    if linear_result(run, protocol.linear_limit) is not None:
        files.append(run.path / "eval.json")
    try:
        copy_into(files, run.record)
    except OSError as exc:
        raise IdaaError(f"cannot publish '{run.name}' to '{run.record}' ({exc.strerror or type(exc).__name__})") \
            from None


def results_by_variant(runs: list[Run]) -> dict[str, dict[int, RunResult]]:
    """Every run's measurements, by variant then seed."""
    table: dict[str, dict[int, RunResult]] = {}
    for run in runs:
        epochs = run.config["epochs"] if run.config else None
        table.setdefault(run.variant, {})[run.seed] = read_run(run.source, epochs)
    return table


def resolve(protocol: Protocol, variant: Variant, runs: list[Run], grid: list[Run]) -> dict[str, Any] | None:
    """Measure what a deferred variant needs from its finished dependencies (None if some are unfinished).

    `runs` holds the dependencies' runs for every seed of `protocol.match_seeds`; `grid` every run of the file,
    the runs a VAE's seconds may be converted beside (read for `plus_vae_time` only).
    """
    results = results_by_variant([r for r in runs if r.variant in variant.depends_on])
    for dep in variant.depends_on:
        if set(results.get(dep, {})) != set(protocol.match_seeds) or \
                any(r.status != "done" for r in results[dep].values()):
            return None
    if variant.best_of:
        knn = {c: statistics.fmean(r.knn_top1 for r in results[c].values()) for c in variant.best_of}
        best = max(variant.best_of, key=lambda c: knn[c])
        return {"best": best, "mean_knn_top1": knn, "seeds": protocol.match_seeds}
    target = statistics.fmean(r.train_time for r in results[variant.match_time_of].values())
    rate = statistics.fmean(r.train_time / r.epochs for r in results[variant.rate_from].values())
    resolved = {"epochs": max(1, round(target / rate)), "match_time_of": variant.match_time_of,
                "target_train_time": target, "rate_from": variant.rate_from, "seconds_per_epoch": rate,
                "seeds": protocol.match_seeds, "match_by": protocol.match_by}
    vaes = vae_timings([r for r in runs if r.variant == variant.match_time_of]) if variant.plus_vae_time else []
    vae_seconds = statistics.fmean(t.seconds for t in vaes) if vaes else 0.0
    if vae_seconds:
        resolved |= {"vae_train_time": vae_seconds, "target_train_time": target + vae_seconds,
                     "epochs": max(1, round((target + vae_seconds) / rate))}
    if protocol.match_by == "knn-units":  # counted in kNN evaluations: the same work in every run, load-free
        units = [r.monitor_units for r in results[variant.match_time_of].values()]
        rates = [r.monitor_units / r.epochs for r in results[variant.rate_from].values() if r.monitor_units]
        if None in units or not rates:
            raise IdaaError(f"match_by: knn-units needs the kNN monitor's timings in every run of "
                            f"'{variant.match_time_of}' and '{variant.rate_from}' (set knn_every: 1)")
        target_units, rate_units = statistics.fmean(units), statistics.fmean(rates)
        if vae_seconds:
            converted = [vae_knn_units(t.seconds, t.machine, variant.rate_from, grid) for t in vaes]
            vae_units = statistics.fmean(units for units, _ in converted)
            target_units += vae_units
            resolved |= {"vae_knn_units": vae_units,
                         "vae_units_from": sorted({name for _, beside in converted for name in beside})}
        resolved |= {"epochs": max(1, round(target_units / rate_units)), "target_knn_units": target_units,
                     "knn_units_per_epoch": rate_units}
    return resolved


KNN_WORK = ("dataset", "data_dir", "limit", "test_fraction", "image_size", "backbone", "width", "knn_k", "device")


def vae_knn_units(seconds: float, machine: str | None, reference: str, runs: list[Run]) -> tuple[float, list[str]]:
    """The VAE's training seconds in kNN evaluations, and the runs whose evaluations set the exchange rate.

    The VAE has no kNN monitor. Its seconds count at the seconds per evaluation of the finished runs timed on the
    VAE's machine (since its boot), side by side with it, whose monitor does the reference's work (same data
    and backbone); only when there is none, at the reference's runs on any machine.
    """
    like = next(run.config for run in runs if run.variant == reference and run.config)
    same_work = [run for run in runs if run.config and all(run.config.get(k) == like.get(k) for k in KNN_WORK)]
    timed = {run.name: read_run(run.source, run.config["epochs"]) for run in same_work}
    beside = sorted(name for name, r in timed.items()
                    if machine and r.machine == machine and r.status == "done" and r.unit_seconds)
    chosen = [timed[name] for name in beside] or \
        [timed[run.name] for run in same_work if run.variant == reference]
    return seconds / statistics.fmean(r.unit_seconds for r in chosen), beside


VAE_RECORD = "vae.json"  # beside a run trained with a VAE: how long that VAE trained, and where


@dataclass
class VAETiming:
    """How long a VAE trained, on which machine and how busy it was (its metrics.jsonl)."""

    seconds: float
    machine: str | None  # None for a VAE whose metrics do not say (trained by an older version)
    load: float | None  # mean 1-minute load per CPU at its epochs' ends
    hardware: str | None = None


def vae_on_disk(vae: Path) -> VAETiming | None:
    """The timing in the metrics.jsonl beside this vae.pt (None without it)."""
    records = read_metrics(vae.parent / "metrics.jsonl") if (vae.parent / "metrics.jsonl").is_file() else []
    if not records or "time" not in records[-1]:
        return None
    last = records[-1]
    return VAETiming(float(last["time"]), last.get("machine"), mean_load(records), last.get("hardware"))


def record_vae(run: Run) -> None:
    """Keep beside a run just trained the timing of the VAE it used: every machine trains its own VAE, so a later
    report or match may no longer find that one on disk."""
    timing = vae_on_disk(Path(run.config["vae"])) if run.config and run.config.get("vae") else None
    if timing is not None:
        atomic_write_text(run.path / VAE_RECORD, json.dumps({"vae": run.config["vae"],
                                                             **dataclasses.asdict(timing)}, indent=1) + "\n")


def recorded_vae(run: Run) -> VAETiming | None:
    """The VAE timing the run recorded when it trained (None for a run that predates the record)."""
    try:
        data = json.loads((run.source / VAE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("seconds"), int | float):
        return None
    return VAETiming(float(data["seconds"]), data.get("machine"), data.get("load"), data.get("hardware"))


def vae_timings(runs: list[Run]) -> list[VAETiming]:
    """The timing of the VAE each run used: its own record, else the metrics.jsonl beside the vae.pt now on disk."""
    paths = {Path(r.config["vae"]) for r in runs if r.config and r.config.get("vae")}
    if len(paths) != 1:
        raise IdaaError(f"plus_vae_time needs one VAE for every matched run, found {len(paths)}")
    on_disk = vae_on_disk(next(iter(paths)))
    timings = [recorded_vae(run) or on_disk for run in runs]
    if None in timings:
        raise IdaaError(f"plus_vae_time: '{next(iter(paths)).parent / 'metrics.jsonl'}' does not say how long "
                        "the VAE trained")
    return timings  # type: ignore[return-value]


def _resolve_stage(protocol: Protocol, stage: list[str], runs: list[Run], echo: Any) -> list[Run]:
    """Resolve the stage's deferred variants (their dependencies have just finished) and re-plan."""
    resolved = read_resolved(protocol)
    changed = False
    measured = runs if protocol.seeds == protocol.match_seeds else \
        plan(dataclasses.replace(protocol, seeds=protocol.match_seeds), resolved, training=False)
    enough = protocol.variants == protocol.grid_variants or \
        not any(protocol.variants[name].plus_vae_time for name in stage)  # only a VAE's conversion reads the rest
    grid = measured if enough else plan(dataclasses.replace(protocol, seeds=protocol.match_seeds,
                                                           variants=protocol.grid_variants), resolved, training=False)
    for name in stage:
        variant = protocol.variants[name]
        if not variant.deferred or name in resolved:
            continue
        found = resolve(protocol, variant, measured, grid)
        if found is None:
            seeds = ",".join(map(str, protocol.match_seeds))
            raise IdaaError(f"variant '{name}' is matched over seeds {seeds}: it needs the finished runs of "
                            f"{', '.join(variant.depends_on)} for all of them (--seeds {seeds})")
        resolved[name] = found
        changed = True
        what = f"{found['epochs']} epochs" if "epochs" in found else f"the settings of '{found['best']}'"
        echo(f"{WHAT}: resolved {name}: {what}")
    if changed:
        atomic_write_text(protocol.out / "resolved.json", json.dumps(resolved, indent=1) + "\n")
    return plan(protocol, resolved)


def _train(run: Run, progress: bool, echo: Any) -> None:
    assert run.config is not None
    if run.recorded:
        echo(f"{WHAT}: {run.name} is taken from its published record {run.record}")
        return
    status = run_status(run.path, run.config, "the protocol")
    if status == "done":
        echo(f"{WHAT}: {run.name} is finished, reusing it")
        return
    if run.vae is not None:
        ensure_vae(run.vae, progress, echo, WHAT)
    command = pretrain_command(run.config, run.preset, status)
    echo(f"{WHAT}: {'resuming' if status == 'partial' else 'training'} {run.name}")
    run_child(command + ([] if progress else ["--no-progress"]), run.name, WHAT)
    record_vae(run)


def linear_command(run: Run, limit: int | None) -> str:
    """The `idaa eval linear` command line whose result the report shows for this run."""
    return f"idaa eval linear {run.path / 'last.ckpt'}" + (f" --limit {limit}" if limit else "")


def linear_result(run: Run, limit: int | None) -> dict[str, Any] | None:
    """The run's eval.json when it was made from the current last.ckpt with this protocol's limit.

    A run taken from its published record has no checkpoint: its record's eval.json was checked when published.
    """
    if run.recorded and run.record is not None:
        return _read_eval(run.record / "eval.json", limit)
    record = _read_eval(run.path / "eval.json", limit)
    if record is None or not (run.path / "last.ckpt").is_file():
        return None
    return record if record.get("checkpoint_sha256") == file_digest(run.path / "last.ckpt") else None


def _linear(run: Run, limit: int | None, progress: bool, echo: Any) -> None:
    if run.recorded:
        return  # a record of a probed variant is complete only with its probe
    if run.config is None or run_status(run.path, run.config, "the protocol") != "done":
        echo(f"{WHAT}: {run.name} is unfinished, no linear probe")
        return
    if linear_result(run, limit) is not None:
        echo(f"{WHAT}: linear probe of {run.name} is done, reusing it")
        return
    from idaa.evaluate.protocol import LinearEvalOptions, linear_eval
    from idaa.evaluate.results import write_result

    echo(f"{WHAT}: {linear_command(run, limit)}")
    out = run.path / "eval.json"
    opts = LinearEvalOptions(limit=limit, device=run.config["device"], progress=progress, out=str(out))
    result = linear_eval(str(run.path / "last.ckpt"), opts)
    result.pop("out", None)
    write_result(out, {**result, "reproduce_limit": limit})


def status_lines(protocol: Protocol, runs: list[Run]) -> list[str]:
    """What --dry-run prints: every run and whether it is done, partial, new, ready to resolve or waiting."""
    states = ["done (published record)" if r.recorded else run_status(r.path, r.config, "the protocol")
              if r.config else "" for r in runs]
    finished = {(r.variant, r.seed) for r, state in zip(runs, states, strict=True) if state.startswith("done")}
    for i, run in enumerate(runs):
        if run.config is None:  # deferred: resolved by the next run once its matched seeds are all finished
            ready = {(dep, seed) for dep in run.waits_for for seed in protocol.match_seeds} <= finished
            states[i] = f"{'resolves from finished' if ready else 'waits for'} {', '.join(run.waits_for)}"
    done = sum(state.startswith("done") for state in states)
    lines = [f"{WHAT}: {len(runs)} runs in {protocol.out} ({done} finished)"]
    return lines + [f"  {run.name}: {state}" for run, state in zip(runs, states, strict=True)]


def refuse_emulated_bf16(runs: list[Run]) -> None:
    """No bf16 VAE trained on a CPU that emulates bf16: ~20x slower there, so its costs would not compare."""
    if native_bf16("cpu"):
        return
    emulated = [r.name for r in runs if r.config is not None and r.config.get("vae_precision") == "bf16"
                and resolve_device(r.config.get("device") or "auto").type == "cpu" and not r.recorded
                and run_status(r.path, r.config, "the protocol") != "done"]
    if emulated:
        others = f" (and {len(emulated) - 1} more)" if len(emulated) > 1 else ""
        raise IdaaError(f"{emulated[0]}{others} runs its VAE in bf16, which {hardware('cpu')} emulates, about 20x "
                        "slower than fp32, so its costs would not compare with runs timed where bf16 is native: "
                        "train it on a CPU with AVX512-BF16 or AMX or on a GPU, or set vae_precision: fp32")


def run_reproduce(protocol: Protocol, progress: bool = True, echo: Any = print,
                  write: Any = None) -> list[Run]:
    """Train what is missing, stage by stage and run by run, each probed as it finishes; `write(runs)` reports."""
    runs = plan(protocol)  # every config is checked before anything is written
    if protocol.overrides.get("max_steps") is None:  # a smoke run's costs are not compared
        refuse_emulated_bf16(runs)
    try:
        protocol.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdaaError(f"cannot create '{protocol.out}' ({exc.strerror or type(exc).__name__})") from None
    for stage in stages(protocol):
        if any(protocol.variants[name].deferred for name in stage):
            if protocol.overrides.get("max_steps") is not None:  # a smoke run: the dependencies stay unfinished
                echo(f"{WHAT}: --max-steps: not resolving {', '.join(stage)} (it needs finished runs)")
                break
            runs = _resolve_stage(protocol, stage, runs, echo)
        for run in [r for r in runs if r.variant in stage]:
            _train(run, progress, echo)
            if run.variant in protocol.linear:  # probed at once, so its published record is complete
                _linear(run, protocol.linear_limit, progress, echo)
            publish_run(protocol, run)
            if write is not None:
                write(runs)
    return runs
