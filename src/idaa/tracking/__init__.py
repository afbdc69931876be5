"""Experiment trackers (`--logger tensorboard,wandb,mlflow,csv`): the run folder stays the source of truth.

Each backend is a small class over the library's own API; `Trackers` fans every call out to them. The tracker
run ids live in `RUN/trackers.json`, so `--resume` continues the same W&B / MLflow run and later commands that
read the run folder (`idaa eval`, `idaa diagnose`, `idaa gallery`, `idaa plot`) append their numbers and figures
to it with `log_to_run`. Libraries are imported lazily: `import idaa` never pays for them. This module sits at
the bottom of the import graph (it imports no training or evaluation code).
"""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path
from typing import Any

from idaa.errors import IdaaError
from idaa.fileio import atomic_write_bytes, reporting_write_faults, write_fault
from idaa.tracking.backends import (
    CsvTracker,
    MlflowTracker,
    TensorBoardTracker,
    WandbTracker,
    first_line,
    library,
    read_jsonl,
)

LOGGERS = ("tensorboard", "wandb", "mlflow", "csv")
STATE_FILE = "trackers.json"


def parse_loggers(spec: str | None, check_installed: bool = True) -> tuple[str, ...]:
    """'tensorboard,wandb' -> the names; None -> tensorboard when installed; 'none' -> ().

    Unknown names and (with `check_installed`) missing extras are one-line errors.
    """
    if spec is None:
        return ("tensorboard",) if _installed("tensorboard") else ()
    if not isinstance(spec, str):
        raise IdaaError(f"--logger must be a comma-separated list of names, got {spec!r}")
    names = [name.strip().lower() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in (*LOGGERS, "none"):
            raise IdaaError(f"unknown --logger {name!r}; choose from {', '.join(LOGGERS)} or none (comma-separated)")
    if "none" in names and len(set(names)) > 1:
        raise IdaaError("--logger none cannot be combined with other loggers")
    names = list(dict.fromkeys(name for name in names if name != "none"))
    if check_installed:
        for name in names:
            library(name)
    return tuple(names)


def plan_trackers(spec: str | None, run_dir: str | Path, resume: bool = False, *, mlflow_uri: str | None = None,
                  wandb_project: str | None = None, wandb_entity: str | None = None) -> Trackers:
    """The trackers a run will use, checked (extras installed, MLflow reachable, W&B logged in) before the run
    folder is touched; `Trackers.start` then opens them."""
    run_dir = Path(run_dir)
    saved = read_state(run_dir) if resume else {}
    backends: list[Any] = []
    for name in parse_loggers(spec):
        if name == "tensorboard":
            backends.append(TensorBoardTracker(run_dir))
        elif name == "csv":
            backends.append(CsvTracker(run_dir))
        elif name == "wandb":
            backends.append(WandbTracker.plan(run_dir, saved.get("wandb"), wandb_project, wandb_entity))
        else:
            backends.append(MlflowTracker.plan(run_dir, saved.get("mlflow"), mlflow_uri))
    return Trackers(run_dir, backends, saved)


def log_to_run(run_dir: str | Path, metrics: dict[str, Any] | None = None, files: list[str | Path] = ()) -> None:
    """Append final numbers and figures to the tracker runs of `run_dir`; nothing when it has no trackers.json.

    A tracker that fails here only prints a warning: the result files are already written.
    """
    run_dir = Path(run_dir)
    saved = read_state(run_dir)
    if not saved:
        return
    openers = {"tensorboard": lambda state: TensorBoardTracker(run_dir), "csv": lambda state: CsvTracker(run_dir),
               "wandb": lambda state: WandbTracker.reopen(run_dir, state),
               "mlflow": lambda state: MlflowTracker.reopen(run_dir, state)}
    backends: list[Any] = []
    for name, state in saved.items():
        try:
            library(name)
            backends.append(openers[name](state))
        except (IdaaError, KeyError, TypeError) as exc:  # an extra uninstalled since, a hand-edited file
            _warn(name, exc)
    trackers = Trackers(run_dir, backends, saved).start(save=False, strict=False)
    trackers.step = _last_step(run_dir)  # summaries go at the run's last step
    if metrics:
        trackers.log_summary(metrics)
    for path in files:
        trackers.log_file(path)
    trackers.close()


def read_state(run_dir: Path) -> dict[str, Any]:
    """The tracker run ids saved in `run_dir/trackers.json` ({} when there is none or it is unreadable)."""
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


class Trackers:
    """Every active tracker behind one interface; a backend that fails mid-run is warned about and dropped."""

    def __init__(self, run_dir: str | Path | None = None, backends: list[Any] | None = None,
                 saved: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.backends = list(backends or [])
        self.saved = dict(saved or {})
        self.step = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(backend.name for backend in self.backends)

    def start(self, step: int | None = None, save: bool = True, strict: bool = True) -> Trackers:
        """Open each tracker run, or continue it from `step` (a resume); with `save`, record the ids in trackers.json.

        With `strict`, a tracker that cannot start is a one-line error (before training starts), else a warning.
        """
        self.step = step or 0
        state = {}
        for backend in list(self.backends):
            try:
                state[backend.name] = backend.start(step)
            except Exception as exc:  # the libraries' own error types
                if strict:
                    raise IdaaError(f"--logger {backend.name}: cannot start the tracker run "
                                    f"({type(exc).__name__}: {first_line(exc)})") from None
                _warn(backend.name, exc)
                self.backends.remove(backend)
        if save and self.run_dir is not None and state:
            text = (json.dumps({**self.saved, **state}, indent=2) + "\n").encode()
            with reporting_write_faults("the tracker ids", self.run_dir / STATE_FILE):
                atomic_write_bytes(self.run_dir / STATE_FILE, lambda handle: handle.write(text))
        if self.backends:
            atexit.register(self._interrupted)
        return self

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("log_config", config)

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        """One metrics.jsonl record: its numbers (not bools or None) at `step`."""
        self.step = step
        self._each("log_metrics", record, _numbers(record), step)

    def log_summary(self, values: dict[str, Any]) -> None:
        """Final numbers (evaluations), logged at the run's last step."""
        self._each("log_summary", _numbers(values), self.step)

    def log_file(self, path: str | Path) -> None:
        """A figure or result file; images also go where the tracker shows images."""
        if Path(path).is_file():
            self._each("log_file", Path(path), self.step)

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.backends = []
        atexit.unregister(self._interrupted)

    def _interrupted(self) -> None:  # the process ends without a close(): a signal or an error stopped training
        try:
            self.close("KILLED")
        except IdaaError:  # a disk refusing the trackers' last flush: the run has already said why it stopped
            pass

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # the run folder has everything: never stop training for a tracker...
                fault = write_fault(exc, f"the {backend.name} tracker's output", getattr(exc, "filename", None)
                                    or self.run_dir)
                if fault is not None:  # ...unless the disk refused the write: the run's own files are next
                    raise fault from None
                _warn(backend.name, exc)
                self.backends.remove(backend)


def _installed(name: str) -> bool:
    try:
        library(name)
    except IdaaError:
        return False
    return True


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a record (the step is the x-axis, not a metric)."""
    return {key: float(value) for key, value in record.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "step"}


def _last_step(run_dir: Path) -> int:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return int(rows[-1].get("step", 0)) if rows else 0


def _warn(name: str, exc: BaseException) -> None:
    print(f"idaa: warning: {name} logging stopped ({type(exc).__name__}: {first_line(exc)}); the run folder has "
          "every metric", file=sys.stderr)
