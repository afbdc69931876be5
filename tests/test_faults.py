"""Faults a long run meets: a second writer on its run folder, and a disk that refuses a write (exit 75)."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from cli_run import run

import idaa.fileio as fileio
from idaa.errors import IdaaError, WriteFault
from idaa.runlock import RunLock, eval_lock, read_holder
from idaa.tracking import Trackers

TINY = ["--dataset", "digits", "--width", "4", "--batch-size", "32", "--limit", "64", "--epochs", "2",
        "--knn-every", "0", "--no-progress"]  # 2 steps an epoch, 4 in all; checkpoints at steps 2 and 4
TIMING = {"images_per_s", "epoch_time", "time", "train_time", "monitor_time", "load"}  # the clocks and the load

HOLDER = """
import os, sys, time
from idaa.runlock import RunLock
RunLock(sys.argv[1]).acquire()
if len(sys.argv) > 2:
    ready, told = os.pipe()
    if os.fork() == 0:  # a child (like a DataLoader worker) that outlives its parent
        os.write(told, b"1")  # its at-fork handler has run by now (on a busy machine the child starts late)
        time.sleep(120)
        os._exit(0)
    os.read(ready, 1)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A finished tiny run, trained once: the reference for bit-exactness and the folder the lock tests copy."""
    from idaa.cli import main

    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["pretrain", *TINY, "--out", str(out)]) == 0
    return out


def copy_run(straight, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(straight, target)
    return target


def hold_lock(folder, fork_child=False):
    """A process that holds `folder`'s lock (and, with `fork_child`, a forked child of it) until killed."""
    args = [sys.executable, "-c", HOLDER, str(folder)] + (["fork"] if fork_child else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.name != ".lock"}


def records(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_run(a, b):
    blob_a, blob_b = (torch.load(f / "last.ckpt", weights_only=False) for f in (a, b))
    assert blob_a["step"] == blob_b["step"]
    for key, value in blob_a["method"].items():
        assert torch.equal(value, blob_b["method"][key]), key
    for index, entry in blob_a["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, blob_b["optimizer"]["state"][index][name])
    assert blob_a["scheduler"] == blob_b["scheduler"] and records(a) == records(b)


def one_line(err):
    return err.count("\n") == 1 and "Traceback" not in err


def test_a_second_writer_is_refused_while_the_first_lives(straight, tmp_path, capsys):
    folder = copy_run(straight, tmp_path)
    holder = hold_lock(folder)
    try:
        before = snapshot(folder)
        for flag in ("--resume", "--overwrite"):
            code, _, err = run(["pretrain", *TINY, "--out", folder, flag], capsys)
            assert code == 2 and one_line(err), err
            assert f"run folder {folder} is in use by pid {holder.pid} on host {socket.gethostname()} since " in err
            assert "wait for it or stop it" in err
        assert snapshot(folder) == before, "a refused writer touches nothing (not even --overwrite's metrics)"
        # evaluating the live run's checkpoint is a reader: it never takes the training lock
        code, out, err = run(["eval", "knn", folder / "last.ckpt", "--k", "5"], capsys)
        assert code == 0 and "kNN top-1" in out, err
        assert (folder / "eval_knn.json").is_file() and (folder / ".eval.lock").is_file()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run(["pretrain", "--resume", "--out", folder, "--no-progress"], capsys)  # after kill -9
    assert code == 0, err
    assert read_holder(folder / ".lock")["pid"] == os.getpid()


def test_a_lock_file_left_by_a_dead_process_does_not_block(straight, tmp_path, capsys):
    folder = copy_run(straight, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                              "started": time.time() - 3600}))
    code, _, err = run(["pretrain", "--resume", "--out", folder, "--no-progress"], capsys)
    assert code == 0, err


def test_a_checkpoint_replaced_before_the_lock_is_taken_is_not_resumed_from(straight, tmp_path, monkeypatch,
                                                                              capsys):
    """A resume reads last.ckpt before it holds the lock; if another writer replaced it meanwhile (finished an
    epoch and let go), resuming from the stale copy would redo and truncate its work: it is refused instead."""
    import idaa.train.pretrain as pretrain

    folder = tmp_path / "run"
    assert run(["pretrain", *TINY, "--out", folder, "--max-steps", "2"], capsys)[0] == 0
    build = pretrain._build

    def other_writer_finishes_meanwhile(cfg, device):
        for name in ("metrics.jsonl", "last.ckpt"):  # what the other process leaves: replaced, not edited
            shutil.copy(straight / name, folder / f"{name}.new")
            os.replace(folder / f"{name}.new", folder / name)
        return build(cfg, device)

    monkeypatch.setattr(pretrain, "_build", other_writer_finishes_meanwhile)
    code, _, err = run(["pretrain", "--resume", "--out", folder, "--no-progress"], capsys)
    assert code == 2 and one_line(err) and "was rewritten while this run was starting" in err, err
    assert records(folder) == records(straight), "the finished work is left as the other writer wrote it"
    monkeypatch.setattr(pretrain, "_build", build)
    code, _, err = run(["pretrain", "--resume", "--out", folder, "--no-progress"], capsys)
    assert code == 0, err
    assert_same_run(folder, straight)


def test_the_lock_dies_with_its_holder_even_when_a_forked_child_lives_on(tmp_path):
    holder = hold_lock(tmp_path, fork_child=True)  # the child keeps a copy of every descriptor of the parent
    lock = RunLock(tmp_path)
    with pytest.raises(IdaaError, match=f"in use by pid {holder.pid} "):
        lock.acquire()
    holder.kill()
    holder.wait()
    lock.acquire()  # the orphaned child closed its copy at fork: the kernel dropped the lock with its holder
    lock.release()


def test_one_process_takes_turns_with_itself():
    """In-process runs (tests, notebooks) release the lock when they return, so the next one may take it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        first = RunLock(folder)
        first.acquire()
        with pytest.raises(IdaaError, match=f"in use by pid {os.getpid()} "):
            RunLock(folder).acquire()
        first.release()
        with RunLock(folder) as second:
            second.acquire()


def test_evaluations_take_turns_on_their_own_lock(tmp_path):
    spans = []

    def evaluate(name):
        with eval_lock(tmp_path):
            start = time.monotonic()
            time.sleep(0.2)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=evaluate, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (a_start, a_end), (b_start, _) = sorted(spans)
    assert b_start >= a_end, "the second evaluation waited for the first"


class FullDisk:
    """A temporary file on a disk that fills up: part of the write lands, then ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def fill_disk_on(monkeypatch, name, nth):
    """Make the `nth` atomic write of a file called `name` meet a full disk (at the lowest write helper)."""
    real, calls = fileio._writable, []

    def writable(fd, path):
        calls.append(path.name == name)
        handle = real(fd, path)
        return FullDisk(handle) if path.name == name and sum(calls) == nth else handle

    monkeypatch.setattr(fileio, "_writable", writable)


def test_a_full_disk_during_a_checkpoint_ends_cleanly_and_resumes_exactly(straight, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    fill_disk_on(monkeypatch, "last.ckpt", nth=2)  # the end of epoch 2: the step-2 checkpoint is on disk
    code, _, err = run(["pretrain", *TINY, "--out", folder], capsys)
    assert code == 75 and one_line(err), err
    assert f"disk full (ENOSPC) while writing the checkpoint '{folder / 'last.ckpt'}' (" in err
    assert " free there); last.ckpt at step 2 is intact: resume with --resume" in err
    assert not list(folder.glob(".last.ckpt.*")), "no partial file is left"
    assert torch.load(folder / "last.ckpt", weights_only=False)["step"] == 2
    monkeypatch.undo()
    code, _, err = run(["pretrain", "--resume", "--out", folder, "--no-progress"], capsys)
    assert code == 0, err
    assert_same_run(straight, folder)


def test_a_full_disk_while_logging_leaves_no_torn_line(straight, tmp_path, monkeypatch, capsys):
    folder, real = tmp_path / "run", os.write

    def write(fd, data):
        if bytes(data[:11]) == b'{"epoch": 2':  # the second metrics line: half of it lands, then ENOSPC
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    code, _, err = run(["pretrain", *TINY, "--out", folder], capsys)
    monkeypatch.undo()
    assert code == 75 and one_line(err), err
    assert f"while writing a metrics line to '{folder / 'metrics.jsonl'}'" in err and "at step 2 is intact" in err
    assert [r["step"] for r in records(folder)] == [2], "the torn half line was cut back"
    code, _, err = run(["pretrain", "--resume", "--out", folder, "--no-progress"], capsys)
    assert code == 0, err
    assert_same_run(straight, folder)


def test_a_full_disk_while_caching_features_is_one_line(straight, tmp_path, monkeypatch, capsys):
    folder = copy_run(straight, tmp_path)
    real = fileio._writable
    monkeypatch.setattr(fileio, "_writable", lambda fd, path: FullDisk(real(fd, path)))
    code, _, err = run(["eval", "knn", folder / "last.ckpt", "--k", "5"], capsys)
    assert code == 75 and one_line(err) and "while writing the feature cache" in err, err
    assert not [p for p in (folder / "feature-cache").iterdir() if p.name.startswith(".")], "no partial file"


class BrokenTracker:
    name = "csv"

    def __init__(self, error):
        self.error = error

    def log_metrics(self, record, numbers, step):
        raise self.error


def test_a_tracker_on_a_full_disk_stops_the_run_and_a_flaky_one_is_dropped(tmp_path, capsys):
    trackers = Trackers(tmp_path, [BrokenTracker(OSError(errno.EDQUOT, "Disk quota exceeded"))])
    with pytest.raises(WriteFault, match=r"disk quota exceeded \(EDQUOT\) while writing the csv tracker's output"):
        trackers.log_metrics({"loss": 1.0}, 1)
    trackers = Trackers(tmp_path, [BrokenTracker(ConnectionError("server went away"))])
    trackers.log_metrics({"loss": 1.0}, 1)
    assert trackers.backends == [] and "csv logging stopped" in capsys.readouterr().err


def test_a_full_disk_while_packing_shards_leaves_nothing(tmp_path, monkeypatch, capsys):
    import idaa.data.shards as shards

    data = tmp_path / "images"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(2):
            from PIL import Image

            Image.new("RGB", (8, 8), (i * 90, 10, 10)).save(data / label / f"{i}.png")

    def full(folder, *args):
        (folder / "train-000000.tar").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards, "_write_split", full)
    code, _, err = run(["data", "pack", data, "--out", tmp_path / "shards", "--no-progress"], capsys)
    assert code == 75 and one_line(err) and "while writing the shards for" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"], "no staging folder, no output folder"


RECORD_RANKS = """
import os, sys
import idaa.runlock as runlock
from idaa.cli import main
acquire = runlock.RunLock.acquire

def recording(self):
    with open(sys.argv[1], "a") as log:
        log.write(os.environ["RANK"] + "\\n")
    acquire(self)

runlock.RunLock.acquire = recording
sys.exit(main(sys.argv[2:]))
"""


def test_under_two_gloo_processes_only_rank_0_locks(tmp_path):
    script, log, folder = tmp_path / "record_ranks.py", tmp_path / "ranks.txt", tmp_path / "run"
    script.write_text(RECORD_RANKS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(log), "pretrain", *TINY, "--max-steps", "1", "--device", "cpu", "--out", str(folder)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                      "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log.read_text() == "0\n"
    assert read_holder(folder / ".lock")["host"] == socket.gethostname()


@pytest.mark.parametrize("command", [
    ["semi", "--dataset", "digits", "--limit", "100", "--backbone", "wrn10-1", "--labels", "20", "--steps", "2",
     "--no-progress"],
    ["vae", "train", "--dataset", "digits", "--limit", "64", "--epochs", "1", "--latent-dim", "8", "--hidden", "16",
     "--batch-size", "32", "--no-progress"]])
def test_semi_and_vae_training_take_the_lock_too(command, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = hold_lock(folder)  # a writer that has only just started: the folder holds nothing but its lock
    try:
        code, _, err = run([*command, "--out", folder], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and one_line(err) and f"is in use by pid {holder.pid} " in err, err
    assert [p.name for p in folder.iterdir()] == [".lock"]


def test_semi_on_a_full_disk_says_nothing_was_saved_yet(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    fill_disk_on(monkeypatch, "last.ckpt", nth=1)
    code, _, err = run(["semi", "--dataset", "digits", "--limit", "100", "--backbone", "wrn10-1", "--labels", "20",
                        "--batch-size", "8", "--mu", "2", "--steps", "2", "--no-progress", "--out", folder], capsys)
    assert code == 75 and one_line(err), err
    assert "while writing the checkpoint" in err and "no checkpoint was written yet" in err
    assert not (folder / "last.ckpt").exists() and not list(folder.glob(".last.ckpt.*"))


def test_a_full_disk_while_saving_the_vae_keeps_the_old_one(tmp_path, tiny_vae, monkeypatch):
    from idaa.nets import load_vae, save_vae

    path = tmp_path / "vae.pt"
    save_vae(tiny_vae, path, {"dataset": "digits"})
    before = path.read_bytes()
    real = fileio._writable
    monkeypatch.setattr(fileio, "_writable", lambda fd, target: FullDisk(real(fd, target)))
    with pytest.raises(OSError) as caught:
        save_vae(tiny_vae, path, {"dataset": "digits", "epoch": 2})
    assert caught.value.errno == errno.ENOSPC  # the CLI turns it into one line, exit 75
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["vae.pt"], "no partial file"
    load_vae(path)


def test_a_vae_still_being_trained_or_stopped_early_is_refused_by_training_commands(tmp_path, capsys):
    vae_dir, out = tmp_path / "vae", tmp_path / "run"
    code, _, err = run(["vae", "train", "--dataset", "digits", "--limit", "64", "--epochs", "1", "--latent-dim", "8",
                        "--hidden", "16", "--batch-size", "32", "--no-progress", "--out", vae_dir], capsys)
    assert code == 0, err
    adversarial = ["--adversary", "idaa", "--vae", vae_dir / "vae.pt"]
    semi = ["semi", "--dataset", "digits", "--limit", "100", "--backbone", "wrn10-1", "--labels", "20", "--steps", "1",
            "--no-progress", *adversarial]
    holder = hold_lock(vae_dir)  # `idaa vae train` between two epochs: vae.pt is replaced at the next one
    try:
        for command in (["pretrain", *TINY, *adversarial], semi):
            code, _, err = run([*command, "--out", out], capsys)
            assert code == 2 and one_line(err), err
            assert f"VAE '{vae_dir / 'vae.pt'}' is still being trained by pid {holder.pid} on host " in err
            assert not out.exists(), "refused before the run folder is made"
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run(["pretrain", *TINY, *adversarial, "--out", out], capsys)  # its trainer has finished
    assert code == 0, err
    # a trainer killed after epoch 1 of 3 (no resume exists): its vae.pt says epoch 1, its config.yaml 3
    config = vae_dir / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 1\n", "epochs: 3\n"))
    code, _, err = run(["pretrain", *TINY, *adversarial, "--out", tmp_path / "early"], capsys)
    assert code == 2 and one_line(err), err
    assert f"VAE '{vae_dir / 'vae.pt'}' holds epoch 1 of the 3 its training asked for (it stopped early)" in err
    assert not (tmp_path / "early").exists()
    kept = tmp_path / "elsewhere"  # copied out of its folder (here beside another command's config), taken as is
    kept.mkdir()
    (kept / "config.yaml").write_text("command: pretrain\nepochs: 3\n")
    shutil.copy(vae_dir / "vae.pt", kept / "vae.pt")
    code, _, err = run(["pretrain", *TINY, "--adversary", "idaa", "--vae", kept / "vae.pt", "--out",
                        tmp_path / "early"], capsys)
    assert code == 0, err
