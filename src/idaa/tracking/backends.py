"""The tracker backends: one small class each over the library's own API (imported lazily, inside methods)."""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from idaa.errors import IdaaError
from idaa.fileio import atomic_write_bytes

_LIBRARIES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_IMAGES = (".png", ".jpg", ".jpeg")


class TensorBoardTracker:
    """Scalars and figures in RUN/tensorboard (torch.utils.tensorboard)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.writer = run_dir, None

    def start(self, step: int | None) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a killed run logged after the checkpoint it resumes from
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        return {"logdir": "tensorboard"}

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", "    " + json.dumps(config, indent=2, default=str).replace("\n", "\n    "))

    def log_metrics(self, record: dict[str, Any], numbers: dict[str, float], step: int) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, numbers: dict[str, float], step: int) -> None:
        self.log_metrics(numbers, numbers, step)

    def log_file(self, path: Path, step: int) -> None:
        if path.suffix.lower() in _IMAGES:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"figures/{path.stem}", pixels, step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()


class CsvTracker:
    """RUN/metrics.csv: metrics.jsonl as a table, rewritten after each record (columns such as knn_top1 appear
    mid-run, and a resumed run's metrics.jsonl is truncated to its checkpoint: the table follows it)."""

    name = "csv"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def start(self, step: int | None) -> dict[str, Any]:
        return {"path": "metrics.csv"}

    def log_config(self, config: dict[str, Any]) -> None:
        """config.yaml already holds it."""

    def log_metrics(self, record: dict[str, Any], numbers: dict[str, float], step: int) -> None:
        rows = read_jsonl(self.run_dir / "metrics.jsonl") or [record]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        data = text.getvalue().encode()
        atomic_write_bytes(self.run_dir / "metrics.csv", lambda handle: handle.write(data))

    def log_summary(self, numbers: dict[str, float], step: int) -> None:
        """The eval*.json files beside it hold the final numbers."""

    def log_file(self, path: Path, step: int) -> None:
        """Figures are already in the run folder."""

    def close(self, status: str) -> None:
        """Nothing is held open."""


class WandbTracker:
    """A Weights & Biases run (offline with WANDB_MODE=offline; `wandb sync` uploads it later)."""

    name = "wandb"

    def __init__(self, run_dir: Path, state: dict[str, Any]) -> None:
        self.run_dir, self.state, self.run = run_dir, state, None

    @classmethod
    def plan(cls, run_dir: Path, saved: dict[str, Any] | None, project: str | None,
             entity: str | None) -> WandbTracker:
        wandb = library("wandb")
        if _wandb_mode(wandb) not in ("offline", "dryrun", "disabled"):
            try:
                logged_in = wandb.login(verify=False, prompt=False)
            except TypeError:  # an SDK without `prompt`: wandb.init reports a missing login itself
                logged_in = True
            if not logged_in:
                raise IdaaError("--logger wandb: not logged in to W&B; run 'wandb login', set WANDB_API_KEY, or "
                                "set WANDB_MODE=offline to log locally")
        saved = saved or {}
        state = {"id": saved.get("id"),  # None: W&B picks one when the run starts
                 "project": project or saved.get("project") or os.environ.get("WANDB_PROJECT") or "idaa",
                 "entity": entity or saved.get("entity") or os.environ.get("WANDB_ENTITY"),
                 # W&B's local files go in the run folder unless WANDB_DIR says otherwise
                 "dir": saved.get("dir") or os.environ.get("WANDB_DIR") or str(run_dir.resolve())}
        return cls(run_dir, state)

    @classmethod
    def reopen(cls, run_dir: Path, state: dict[str, Any]) -> WandbTracker:
        return cls(run_dir, {key: state[key] for key in ("id", "project", "entity", "dir")})

    def start(self, step: int | None) -> dict[str, Any]:
        import wandb

        Path(self.state["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.state["project"], entity=self.state["entity"], id=self.state["id"],
                              resume="allow", name=self.run_dir.resolve().name, dir=self.state["dir"])
        self.state["id"] = self.run.id
        return self.state

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)  # a resumed run may extend --epochs

    def log_metrics(self, record: dict[str, Any], numbers: dict[str, float], step: int) -> None:
        self.run.log(numbers, step=step)

    def log_summary(self, numbers: dict[str, float], step: int) -> None:
        self.run.summary.update(numbers)

    def log_file(self, path: Path, step: int) -> None:
        self.run.save(str(path.resolve()), base_path=str(path.resolve().parent), policy="now")

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MlflowTracker:
    """An MLflow run through MlflowClient (no global active run): a server URI or a local file: store."""

    name = "mlflow"

    def __init__(self, run_dir: Path, state: dict[str, Any]) -> None:
        self.run_dir, self.state, self.client = run_dir, state, None

    @classmethod
    def plan(cls, run_dir: Path, saved: dict[str, Any] | None, uri: str | None) -> MlflowTracker:
        library("mlflow")
        saved = saved or {}
        uri = uri or saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
            (run_dir.resolve() / "mlruns").as_uri()
        state = {"tracking_uri": uri, "experiment": saved.get("experiment") or
                 os.environ.get("MLFLOW_EXPERIMENT_NAME") or "idaa"}
        if saved.get("tracking_uri") == uri and saved.get("run_id"):
            state["run_id"] = saved["run_id"]
        check_mlflow_uri(uri)
        return cls(run_dir, state)

    @classmethod
    def reopen(cls, run_dir: Path, state: dict[str, Any]) -> MlflowTracker:
        return cls(run_dir, {key: state[key] for key in ("tracking_uri", "experiment", "run_id")})

    def start(self, step: int | None) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        _allow_file_store(self.state["tracking_uri"])
        self.client = MlflowClient(tracking_uri=self.state["tracking_uri"])
        if self.state.get("run_id"):
            self.client.update_run(self.state["run_id"], status="RUNNING")
            return self.state
        experiment = self.client.get_experiment_by_name(self.state["experiment"])
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            self.state["experiment"])
        run = self.client.create_run(experiment_id, run_name=self.run_dir.resolve().name,
                                     tags={"idaa.run_dir": str(self.run_dir.resolve())})
        self.state["run_id"] = run.info.run_id
        return self.state

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        known = self.client.get_run(self.state["run_id"]).data.params
        # parameters cannot change once logged: a resumed run adds only new ones; config.yaml has the rest
        params = [Param(k, str(v)[:500]) for k, v in _flatten(config).items() if k not in known]
        for lo in range(0, len(params), 100):
            self.client.log_batch(self.state["run_id"], params=params[lo:lo + 100])
        self.client.log_dict(self.state["run_id"], config, "config.json")

    def log_metrics(self, record: dict[str, Any], numbers: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in numbers.items()]
        self.client.log_batch(self.state["run_id"], metrics=metrics)

    def log_summary(self, numbers: dict[str, float], step: int) -> None:
        self.log_metrics(numbers, numbers, step)

    def log_file(self, path: Path, step: int) -> None:
        folder = "figures" if path.suffix.lower() in _IMAGES else None
        self.client.log_artifact(self.state["run_id"], str(path), folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.state["run_id"], status)


def check_mlflow_uri(uri: str) -> None:
    """A one-line error now, before training, when the MLflow tracking URI cannot be reached."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        return  # a local folder: created when the run starts
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            return  # the server answered (perhaps asking for credentials): reachable
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise IdaaError(f"MLflow tracking URI {uri} is unreachable ({reason}); start the server or pass "
                            "another --mlflow-uri") from None
        return
    try:  # databricks, sqlite, postgresql, ...: let MLflow itself try it
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        raise IdaaError(f"MLflow tracking URI {uri} is not usable ({type(exc).__name__}: {first_line(exc)})") \
            from None


def _allow_file_store(uri: str) -> None:
    """MLflow 3 refuses its file store unless asked: a `file:` URI given here is that request."""
    if urlparse(uri).scheme in ("", "file"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _wandb_mode(wandb: Any) -> str:
    """online, offline or disabled, from WANDB_MODE or `wandb offline`'s settings file."""
    try:
        return str(wandb.setup().settings.mode)
    except Exception:  # an SDK that keeps it elsewhere
        return os.environ.get("WANDB_MODE", "online")


def library(name: str) -> Any:
    """The tracker's library, or the one-line error naming the extra that installs it."""
    if name not in _LIBRARIES:
        return None
    try:
        return importlib.import_module(_LIBRARIES[name])
    except ImportError:
        raise IdaaError(f"--logger {name} needs the {name} extra: pip install 'idaa[{name}]'") from None


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line
            continue
    return [row for row in rows if isinstance(row, dict)]


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


