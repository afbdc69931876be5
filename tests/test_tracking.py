"""Experiment trackers: W&B (offline) and MLflow (file store) runs read back through each library's own API,
resume continuing the same tracker run, metrics.csv, results appended by later commands, and bad input."""

import csv
import json
import subprocess
import sys

import pytest

from idaa.cli import main

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

TINY = ["pretrain", "--dataset", "digits", "--width", "4", "--batch-size", "64", "--limit", "256", "--epochs", "2",
        "--knn-every", "1", "--knn-k", "20", "--no-progress"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "wandb"


def wandb_runs(folder):
    """Each offline run file's records, read by the W&B SDK's own reader (`wandb leet inspect --json`)."""
    runs = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                             capture_output=True, text=True, check=True).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    return runs


def wandb_config(records):
    config = {}
    for r in records:
        if r["type"] == "run":
            config.update(r["run"].get("config", {}).get("update", {}))
        elif r["type"] == "config":
            config.update(r["config"].get("update", {}))
    return config


def test_wandb_and_mlflow_hold_config_and_knn_and_resume_continues_them(tmp_path, offline_wandb):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    argv = [*TINY, "--out", str(out), "--logger", "wandb,mlflow,csv"]
    assert main([*argv, "--max-steps", "4"]) == 0
    first = json.loads((out / "trackers.json").read_text())
    assert main([*argv, "--resume"]) == 0
    saved = json.loads((out / "trackers.json").read_text())
    assert saved["wandb"]["id"] == first["wandb"]["id"] and saved["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = {r["step"]: r["knn_top1"] for r in records}
    assert sorted(knn) == [4, 8]

    # W&B: two offline segments of one run (wandb sync merges them), the config and the kNN curve
    runs = wandb_runs(offline_wandb)
    assert len(runs) == 2
    ids = {r["run"]["run_id"] for records in runs for r in records if r["type"] == "run"}
    assert ids == {saved["wandb"]["id"]}
    config = wandb_config(runs[0])
    assert config["method"] == "simclr" and config["epochs"] == 2 and config["max_steps"] == 4
    history = {r["history"]["step"]["num"]: r["history"]["item"] for records in runs for r in records
               if r["type"] == "history"}
    assert {step: item["knn_top1"] for step, item in history.items()} == pytest.approx(knn)

    # MLflow: the same run continued; parameters and the metric history through MlflowClient
    client = MlflowClient(tracking_uri=saved["mlflow"]["tracking_uri"])
    assert saved["mlflow"]["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    run = client.get_run(saved["mlflow"]["run_id"])
    assert run.data.params["method"] == "simclr" and run.data.params["batch_size"] == "64"
    assert run.info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "knn_top1")} == pytest.approx(knn)

    # csv: the rows of metrics.jsonl
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert [float(r["knn_top1"]) for r in rows] == pytest.approx([knn[4], knn[8]])
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in records])

    # a later command appends its final number and result file to the same tracker runs
    assert main(["eval", "knn", str(out / "last.ckpt"), "--k", "20", "--no-progress"]) == 0
    top1 = json.loads((out / "eval_knn.json").read_text())["knn_top1"]
    summaries = [r["summary"]["update"] for r in wandb_runs(offline_wandb)[-1] if r["type"] == "summary"]
    assert any(s.get("eval/knn_top1") == pytest.approx(top1) for s in summaries)
    assert client.get_run(run.info.run_id).data.metrics["eval/knn_top1"] == pytest.approx(top1)
    assert "eval_knn.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_csv_logger_mirrors_metrics_jsonl(tmp_path, offline_wandb):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--out", str(out), "--logger", "csv"]) == 0
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    def same(key, value):  # the csv holds text: the numbers as floats, the machine's id and kind as they are
        return value if key in ("machine", "hardware") else float(value)

    assert records[0]["machine"] and records[0]["hardware"]
    assert [{k: same(k, v) for k, v in r.items() if v} for r in rows] == \
        [{k: same(k, v) for k, v in r.items() if v is not None} for r in records]
    assert json.loads((out / "trackers.json").read_text()) == {"csv": {"path": "metrics.csv"}}
    assert not (out / "tensorboard").exists(), "an explicit --logger replaces the default"


@pytest.mark.parametrize(("flags", "message"), [
    (["--logger", "tensorbord"], "unknown --logger 'tensorbord'"),
    (["--logger", "none,csv"], "--logger none cannot be combined"),
    (["--logger", "mlflow", "--mlflow-uri", "http://127.0.0.1:9"], "MLflow tracking URI http://127.0.0.1:9 is "
     "unreachable"),
])
def test_bad_logger_input_is_one_line_and_creates_no_run(tmp_path, offline_wandb, capsys, flags, message):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_missing_extra_names_it(tmp_path, offline_wandb, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when the extra is not installed
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out), "--logger", "tensorboard,wandb"]) == 2
    err = capsys.readouterr().err
    assert err == "idaa: error: --logger wandb needs the wandb extra: pip install 'idaa[wandb]'\n"
    assert not out.exists()


def test_log_to_run_without_trackers_does_nothing(tmp_path):
    from idaa.tracking import log_to_run

    figure = tmp_path / "figure.png"
    figure.write_bytes(b"not read")
    log_to_run(tmp_path, {"eval/knn_top1": 50.0}, [figure])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]
