"""Trust: exact resume, atomic checkpoints under SIGKILL, graceful SIGTERM, and the non-finite guard."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import idaa.train.pretrain as pretrain_module
import idaa.train.step as step_module
from idaa.cli import main
from idaa.data.memory import load_dataset
from idaa.nets import save_vae

BASE = ["pretrain", "--dataset", "digits", "--width", "4", "--batch-size", "32", "--limit", "128", "--epochs", "2",
        "--knn-k", "10", "--no-progress"]  # 4 steps per epoch, 8 in all
MOMENTUM = ["--method", "moco", "--method-option", "proj_hidden=32", "--method-option", "proj_dim=16",
            "--method-option", "queue_size=48"]
TIMING = {"images_per_s", "epoch_time", "time", "train_time", "monitor_time", "load"}  # the clocks and the load


@pytest.fixture
def digits_vae(tmp_path, tiny_vae):
    digits = load_dataset("digits")
    path = tmp_path / "vae.pt"
    save_vae(tiny_vae, path, {"dataset": "digits", "mean": list(digits.mean), "std": list(digits.std)})
    return str(path)


def records(run, partial=False):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in out if partial or not r.get("partial")]


def assert_same_state(a, b):
    blob_a = torch.load(a / "last.ckpt", weights_only=False)
    blob_b = torch.load(b / "last.ckpt", weights_only=False)
    assert blob_a["step"] == blob_b["step"] and blob_a["epoch"] == blob_b["epoch"]
    assert blob_a["method"].keys() == blob_b["method"].keys()
    for key, value in blob_a["method"].items():
        assert torch.equal(value, blob_b["method"][key]), f"parameter/buffer {key} differs"
    state_a, state_b = blob_a["optimizer"]["state"], blob_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index, entry in state_a.items():
        for name, value in entry.items():
            other = state_b[index][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert blob_a["scheduler"] == blob_b["scheduler"]
    assert records(a) == records(b)


SHARED = {"simclr+idaa-shared": ["--attack-graph", "shared"],
          "simclr+idaa-shared-detached": ["--attack-graph", "shared", "--adversarial-anchor", "detached"]}


@pytest.mark.parametrize("recipe", ["simclr+idaa", "moco+idaa", *SHARED])
def test_interrupted_then_resumed_equals_straight(recipe, tmp_path, digits_vae):
    extra = (MOMENTUM if recipe.startswith("moco") else []) + ["--adversary", "idaa", "--vae", digits_vae]
    extra += SHARED.get(recipe, [])
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*BASE, *extra, "--out", str(straight)]) == 0
    assert main([*BASE, *extra, "--out", str(split), "--max-steps", "3"]) == 0  # stops inside epoch 1
    stopped = torch.load(split / "last.ckpt", weights_only=False)
    assert stopped["step"] == 3 and stopped["position"]["batch"] == 3 and stopped["epoch"] == 0
    assert records(split, partial=True)[-1]["partial"] is True
    assert main(["pretrain", "--resume", "--out", str(split), "--no-progress"]) == 0
    assert_same_state(straight, split)
    assert [r["step"] for r in records(split)] == [4, 8]


def test_sigterm_mid_epoch_saves_exits_and_resumes_exactly(tmp_path, digits_vae, monkeypatch, capsys):
    extra = ["--adversary", "idaa", "--vae", digits_vae]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main([*BASE, *extra, "--out", str(straight)]) == 0
    real, calls = pretrain_module.forward_backward, []

    def compute_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # during step 6 (epoch 2, batch 2): the step must still finish
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "forward_backward", compute_then_signal)
    assert main([*BASE, *extra, "--out", str(stopped)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 6" in err and "--resume" in err
    blob = torch.load(stopped / "last.ckpt", weights_only=False)
    assert blob["step"] == 6 and blob["position"] == {**blob["position"], "epoch": 2, "batch": 2}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is removed after the run"
    monkeypatch.setattr(pretrain_module, "forward_backward", real)
    assert main(["pretrain", "--resume", "--out", str(stopped), "--no-progress"]) == 0
    assert_same_state(straight, stopped)


WRITER = """
import sys, torch
from idaa.train.run_dir import atomic_torch_save
big = torch.randn(8_000_000)
i = 0
while True:
    i += 1
    atomic_torch_save({"i": i, "x": big}, sys.argv[1])
"""


def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    from idaa.train.run_dir import atomic_torch_save, remove_stale_temporaries

    target = tmp_path / "last.ckpt"
    atomic_torch_save({"i": 0, "x": torch.zeros(3)}, target)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".last.ckpt.*")) and time.time() < deadline:
            time.sleep(0.001)
        assert list(tmp_path.glob(".last.ckpt.*")), "the writer never started a checkpoint"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    blob = torch.load(target, weights_only=False)  # the last complete version, never a torn file
    assert blob["i"] >= 0 and blob["x"].numel() in (3, 8_000_000)
    remove_stale_temporaries(tmp_path)
    assert not list(tmp_path.glob(".last.ckpt.*")) and target.is_file()


def _nan_on_attack(monkeypatch, at_call):
    real_build, calls = pretrain_module.build_adversary, []

    def build(*args, **kwargs):
        adversary = real_build(*args, **kwargs)
        perturb = adversary.perturb

        def poisoned(x, loss_fn, source=None):
            calls.append(1)
            out = perturb(x, loss_fn, source=source)
            return out * float("nan") if len(calls) == at_call else out

        adversary.perturb = poisoned
        return adversary

    monkeypatch.setattr(pretrain_module, "build_adversary", build)


def test_nan_in_the_attack_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, digits_vae, monkeypatch, capsys):
    run = tmp_path / "run"
    _nan_on_attack(monkeypatch, at_call=6)
    assert main([*BASE, "--adversary", "idaa", "--vae", digits_vae, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "non-finite attack output" in err and "at step 6 (epoch 2)" in err and "last good checkpoint" in err
    blob = torch.load(run / "last.ckpt", weights_only=False)
    assert blob["step"] == 4 and blob["epoch"] == 1, "the checkpoint from before the bad step is kept"
    assert all(torch.isfinite(v).all() for v in blob["method"].values() if v.is_floating_point())


def test_skip_nonfinite_tolerates_k_bad_steps(tmp_path, digits_vae, monkeypatch):
    run = tmp_path / "run"
    _nan_on_attack(monkeypatch, at_call=2)
    argv = [*BASE, "--adversary", "idaa", "--vae", digits_vae, "--out", str(run), "--skip-nonfinite", "1"]
    assert main(argv) == 0
    first = records(run)[0]
    assert first["skipped_steps"] == 1 and all(v == v for v in (first["loss"], first["clean_loss"]))
    blob = torch.load(run / "last.ckpt", weights_only=False)
    assert blob["step"] == 8 and all(torch.isfinite(v).all() for v in blob["method"].values()
                                     if v.is_floating_point())


def test_nonfinite_gradient_is_named(tmp_path, monkeypatch, capsys):
    real = step_module.compute_losses

    def poisoned(method, *args, **kwargs):
        losses = real(method, *args, **kwargs)
        weight = next(p for p in method.parameters() if p.requires_grad)
        losses.total = losses.total + 0 * (weight.sum() * float("inf"))  # finite value, NaN gradient
        return losses

    monkeypatch.setattr(step_module, "compute_losses", poisoned)
    assert main([*BASE, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "non-finite gradient at step 1" in err and "no checkpoint was written" in err


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main([*BASE, "--out", str(run), "--knn-every", "0"]) == 0
    blob = torch.load(run / "last.ckpt", weights_only=False)
    blob_epoch1 = {**blob, "step": 4, "epoch": 1}
    # a crash after logging epoch 2 but before its checkpoint: last.ckpt is still epoch 1's
    torch.save(blob_epoch1, run / "last.ckpt")
    pretrain_module.MetricsLog(run / "metrics.jsonl").truncate_after(4)
    assert [r["step"] for r in records(run)] == [4]


DOUBLE_SIGNAL = """
import os, signal, time
from idaa.train.state import GracefulStop
with GracefulStop() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    assert stop.signum == signal.SIGTERM
    print("first signal noted, still running", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
print("not reached")
"""


def test_a_second_signal_exits_at_once():
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", DOUBLE_SIGNAL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "first signal noted" in proc.stdout and "not reached" not in proc.stdout
    assert "send it again to exit at once" in proc.stderr
    assert time.time() - start < 25, "the second signal must not wait for the sleep"
