"""Running many pretraining runs, one child process at a time, resumably (shared by `sweep` and `reproduce`).

Every run is an `idaa pretrain --config PRESET --out RUN` process of its own: a signal to the orchestrator is
passed on so the run saves its checkpoint, and a finished run is recognised from its metrics.jsonl and reused,
an interrupted one continued with --resume, so running the same command again picks up where it stopped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from idaa.analysis.time_to_accuracy import read_metrics
from idaa.errors import IdaaError, WriteFault
from idaa.fileio import atomic_write_text

NOT_COMPARED = {"out", "command", "max_steps", "device", "download"}  # may differ between invocations
VAE_KEYS = {"dataset", "data_dir", "latent_dim", "hidden", "beta", "epochs", "batch_size", "lr", "policy", "limit",
            "seed", "device"}
VAE_INHERITED = ("dataset", "data_dir", "limit", "seed", "device")  # a run's VAE sees the run's data


class RunStopped(Exception):
    """A signal stopped the run being trained; it saved its checkpoint and the same command resumes it."""

    def __init__(self, what: str, run: str, code: int) -> None:
        super().__init__(f"{what} stopped during '{run}' (exit {code}); run the same command again to resume")
        self.code = code


@dataclass
class VAEJob:
    """A VAE to train with `idaa vae train` settings into `run` (shared by every run that uses it)."""

    settings: dict[str, Any]
    run: Path


def finished(records: list[dict[str, Any]], epochs: int) -> bool:
    """True when the metrics hold the complete final epoch."""
    return any(r.get("epoch") == epochs and not r.get("partial") for r in records)


def check_same_run(run: Path, config: dict[str, Any], what: str = "the grid") -> None:
    """Refuse to reuse or resume a folder that holds a run with other settings (the grid was edited)."""
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    for key in sorted(set(saved) & set(config) - NOT_COMPARED):
        if saved[key] != config[key]:
            raise IdaaError(f"'{run}' holds a run with {key}={saved[key]!r} but {what} asks for {config[key]!r}; "
                            "move that folder away or change the output folder")


def run_status(run: Path, config: dict[str, Any], what: str = "the grid") -> str:
    """'done', 'partial' (has a checkpoint to resume), 'broken' (folder without checkpoint) or 'new'."""
    check_same_run(run, config, what)
    if (run / "last.ckpt").is_file():
        metrics = run / "metrics.jsonl"
        done = metrics.is_file() and finished(read_metrics(metrics), config["epochs"])
        return "done" if done else "partial"
    return "broken" if run.is_dir() and any(run.iterdir()) else "new"


def pretrain_command(config: dict[str, Any], preset: Path, status: str) -> list[str]:
    """Write the run's preset and return the `idaa pretrain` command that trains (or continues) it."""
    preset.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(preset, yaml.safe_dump({k: v for k, v in config.items() if k != "out"}, sort_keys=False))
    command = [sys.executable, "-m", "idaa", "pretrain", "--config", str(preset), "--out", str(config["out"])]
    return command + {"partial": ["--resume"], "broken": ["--overwrite"], "new": []}[status]


def run_child(command: list[str], name: str, what: str = "sweep") -> None:
    """Run one child process to its end; a SIGINT/SIGTERM to this process is passed on, so the child saves first.

    The child gets its own session: a terminal's Ctrl-C or a signal to the process group then reaches it once,
    through this process, rather than twice (a second signal makes `idaa pretrain` exit without saving).
    """
    main_thread = threading.current_thread() is threading.main_thread()
    children: list[subprocess.Popen] = []
    previous = {}
    if main_thread:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: [c.send_signal(signum) for c in children])
    try:
        children.append(subprocess.Popen(command, start_new_session=main_thread))
        code = children[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if abs(code) in (signal.SIGINT, signal.SIGTERM) and code < 0 or code in (130, 143):
        raise RunStopped(what, name, code if code > 0 else 128 - code)
    if code == WriteFault.exit_code:  # the child said which write the disk refused and what is intact
        raise WriteFault(f"'{name}' stopped on a write fault (exit {code}), see the message above; free space, "
                         f"then run the {what} again (finished runs are kept)")
    if code != 0:
        raise IdaaError(f"'{name}' failed (exit {code}), see the messages above; fix it and run the {what} again "
                        "(finished runs are kept)")


def read_vae_block(block: Any) -> dict[str, Any] | None:
    """A grid's `vae:` block (`idaa vae train` settings, at least epochs), checked; None when there is none."""
    if block is None:
        return None
    if not isinstance(block, dict):
        raise IdaaError(f"the vae: block must be a mapping of setting: value, got {type(block).__name__}")
    unknown = sorted(set(block) - VAE_KEYS)
    if unknown:
        raise IdaaError(f"unknown vae setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(VAE_KEYS))}")
    if not isinstance(block.get("epochs"), int) or block["epochs"] < 1:
        raise IdaaError("the vae: block needs epochs (an integer >= 1)")
    return dict(block)


def vae_done(job: VAEJob) -> bool:
    """True when the job's folder holds a VAE trained to the end with these settings (else it is retrained)."""
    metrics, saved_path = job.run / "metrics.jsonl", job.run / "config.yaml"
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        for key in sorted(set(saved) & set(job.settings) - NOT_COMPARED):
            if saved[key] != job.settings[key]:
                raise IdaaError(f"'{job.run}' holds a VAE with {key}={saved[key]!r} but the grid asks for "
                                f"{job.settings[key]!r}; move that folder away or change the output folder")
    return (job.run / "vae.pt").is_file() and metrics.is_file() and \
        finished(read_metrics(metrics), job.settings["epochs"])


def ensure_vae(job: VAEJob, progress: bool, echo: Any, what: str = "sweep") -> None:
    """Train the job's VAE unless a finished one with the same settings is there."""
    if vae_done(job):
        echo(f"{what}: VAE {job.run} is trained, reusing it")
        return
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in job.settings.items() if v is not None]
    command = [sys.executable, "-m", "idaa", "vae", "train", "--out", str(job.run), *flags]
    if job.run.exists():
        command.append("--overwrite")  # VAE training has no resume: an unfinished one starts again
    echo(f"{what}: training VAE {job.run}")
    run_child(command + ([] if progress else ["--no-progress"]), str(job.run), what)


def as_mapping(value: Any, what: str) -> dict[str, Any]:
    """A YAML block as a dict (None is empty); anything else is a one-line error naming the block."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise IdaaError(f"{what} must be a mapping of setting: value, got {type(value).__name__}")
    return dict(value)
