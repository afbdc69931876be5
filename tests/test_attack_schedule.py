"""Equal-time options (attack every k-th step, attack from an epoch on) and the training/monitor clocks."""

import json
import time

import pytest

import idaa.train.pretrain as pretrain_module
import idaa.train.run_state as run_state_module
from idaa.cli import main
from idaa.train.step import attack_at

TINY = ["pretrain", "--dataset", "digits", "--width", "4", "--batch-size", "64", "--limit", "128", "--epochs", "2",
        "--knn-k", "10", "--no-progress", "--adversary", "random-view"]  # 2 steps per epoch, 4 in all


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def spy(monkeypatch):
    """Per step: (was an adversary passed, was an adversarial loss computed)."""
    steps, real = [], pretrain_module.forward_backward

    def forward_backward(model, adversary, *args, **kwargs):
        losses = real(model, adversary, *args, **kwargs)
        steps.append((adversary is not None, losses.adversarial is not None))
        return losses

    monkeypatch.setattr(pretrain_module, "forward_backward", forward_backward)
    return steps


@pytest.mark.parametrize("flags, attacked", [
    ([], [True, True, True, True]),
    (["--attack-every", "2"], [True, False, True, False]),
    (["--attack-every", "3"], [True, False, False, True]),
    (["--attack-from-epoch", "2"], [False, False, True, True]),
])
def test_steps_without_an_attack_compute_only_the_clean_loss(flags, attacked, spy, tmp_path):
    assert main([*TINY, *flags, "--knn-every", "0", "--out", str(tmp_path / "run")]) == 0
    assert spy == [(a, a) for a in attacked]


def test_attack_schedule_values():
    adversary = object()
    assert [attack_at(adversary, 2, 0, 1, s) is adversary for s in range(4)] == [True, False, True, False]
    assert attack_at(None, 1, 0, 5, 0) is None
    assert attack_at(adversary, 1, 3, 2, 10) is None and attack_at(adversary, 1, 3, 3, 10) is adversary


@pytest.mark.parametrize("flag, value, message", [("--attack-every", "0", "--attack-every must be an integer >= 1"),
                                                  ("--attack-from-epoch", "-1", "--attack-from-epoch must be")])
def test_bad_schedule_flags_are_one_line_errors(flag, value, message, tmp_path, capsys):
    assert main([*TINY, flag, value, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_train_time_leaves_out_the_monitor_and_checkpoints_and_survives_resume(tmp_path, monkeypatch):
    real_save = run_state_module.atomic_torch_save  # the one checkpoint writer

    def slow_monitor(self, method):
        time.sleep(0.4)
        return 50.0

    def slow_save(obj, path):
        time.sleep(0.3)
        real_save(obj, path)

    monkeypatch.setattr(pretrain_module.KNNMonitor, "__call__", slow_monitor)
    monkeypatch.setattr(run_state_module, "atomic_torch_save", slow_save)
    run = tmp_path / "run"
    assert main([*TINY, "--epochs", "3", "--out", str(run), "--max-steps", "3"]) == 0  # stops inside epoch 2
    assert main(["pretrain", "--resume", "--out", str(run), "--no-progress"]) == 0
    records = [r for r in metrics(run) if not r.get("partial")]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # epochs 1, (2 partial), 2, 3 were each monitored (0.4 s) and saved (0.3 s): none of it is training time
    assert records[-1]["monitor_time"] >= 4 * 0.4
    for before, after in zip(records, records[1:], strict=False):
        assert after["train_time"] > before["train_time"] and after["monitor_time"] > before["monitor_time"]
    # "time" at epoch 3 holds the monitor of epochs 1, 2 (partial) and 2 and the saves after epochs 1 and 2 (the
    # save that ended the first process is not in its clock)
    final = records[-1]
    assert final["train_time"] <= final["time"] - 3 * 0.4 - 2 * 0.3, "monitor and writes are excluded"
