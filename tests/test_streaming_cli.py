"""Commands on a mixed-size image folder (streamed): end to end, bit-exact resume with workers, bad input."""

import json
from pathlib import Path

import pytest
import torch
from image_folders import write_image_folder

from idaa.cli import main

NET = ["--width", "4", "--batch-size", "4", "--knn-every", "0", "--no-progress"]


def mixed_folder(root: Path, per_class: int = 6) -> Path:
    return write_image_folder(root, {"train": per_class, "test": per_class}, seed=1, sizes=(20, 70))


def run(args: list) -> int:
    return main([str(a) for a in args])


def test_commands_run_end_to_end_on_a_mixed_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = mixed_folder(tmp_path / "data")
    flags = ["--dataset", "folder", "--data-dir", data, "--workers", "1"]
    assert run(["vae", "train", *flags, "--image-size", "16", "--latent-dim", "8", "--hidden", "8", "--epochs", "1",
                "--batch-size", "4", "--out", tmp_path / "vae", "--no-progress"]) == 0
    assert run(["pretrain", *flags, "--image-size", "16", *NET, "--epochs", "1", "--adversary", "idaa",
                "--vae", tmp_path / "vae" / "vae.pt", "--out", tmp_path / "run"]) == 0
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)
    assert ckpt["data"]["image_size"] == 16 and ckpt["step"] == 3
    assert run(["eval", "linear", tmp_path / "run" / "last.ckpt", "--no-progress", "--workers", "0"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["train_images"] == 12 and result["test_images"] == 12
    assert run(["pretrain", "--dataset", "digits", "--limit", "64", *NET, "--max-steps", "2",
                "--out", tmp_path / "digits"]) == 0
    assert run(["eval", "transfer", tmp_path / "digits" / "last.ckpt", *flags[:4], "--no-progress"]) == 0
    transfer = json.loads((tmp_path / "digits" / f"eval_transfer_{data.name}.json").read_text())
    assert transfer["train_images"] == 12 and transfer["num_classes"] == 2
    assert "feature-cache" in {p.name for p in (tmp_path / "digits").iterdir()}


def test_resume_mid_epoch_with_workers_is_bit_exact(tmp_path: Path) -> None:
    data = mixed_folder(tmp_path / "data")
    common = ["pretrain", "--dataset", "folder", "--data-dir", data, "--image-size", "16", *NET, "--epochs", "2",
              "--workers", "2", "--adversary", "random-view"]  # three crops per sample from the workers
    assert run([*common, "--out", tmp_path / "straight"]) == 0
    assert run([*common, "--out", tmp_path / "resumed", "--max-steps", "4"]) == 0  # stops inside epoch 2
    position = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)["position"]
    assert position["epoch"] == 2 and position["batch"] == 1
    assert run(["pretrain", "--out", tmp_path / "resumed", "--resume", "--workers", "1", "--no-progress"]) == 0
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=False)["method"]
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(args: list, capsys: pytest.CaptureFixture, *needles: object) -> str:
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idaa: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def test_bad_folders_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never"
    base = ["pretrain", "--image-size", "16", *NET, "--epochs", "1", "--out", out, "--dataset", "folder"]
    (tmp_path / "empty").mkdir()
    one_line_error([*base, "--data-dir", tmp_path / "empty"], capsys, "is empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    one_line_error([*base, "--data-dir", tmp_path / "text"], capsys, tmp_path / "text", "empty")
    data = mixed_folder(tmp_path / "data")
    (data / "train" / "bird").mkdir()
    one_line_error([*base, "--data-dir", data], capsys, data / "train" / "bird", "no images")
    (data / "train" / "bird").rmdir()
    one_line_error([*base, "--data-dir", data, "--workers", "-1"], capsys, "--workers", "-1")
    one_line_error([*base, "--data-dir", data, "--bad-images", "ignore"], capsys, "--bad-images")
    bad = data / "train" / "cat" / "9.jpg"
    bad.write_text("not an image")
    one_line_error([*base, "--data-dir", data], capsys, bad, "--bad-images skip")  # found by the listing
    assert not out.exists()
    assert run([*base, "--data-dir", data, "--bad-images", "skip"]) == 0
    assert "skipped 1 unreadable file" in capsys.readouterr().err
    bad.unlink()
    assert run(["vae", "train", "--dataset", "folder", "--data-dir", data, "--image-size", "16", "--latent-dim", "8",
                "--hidden", "8", "--epochs", "1", "--batch-size", "4", "--out", tmp_path / "vae", "--no-progress"]) == 0
    one_line_error(["pretrain", "--dataset", "folder", "--data-dir", data, "--image-size", "32", *NET,
                    "--adversary", "idaa", "--vae", tmp_path / "vae" / "vae.pt", "--out", tmp_path / "big"],
                   capsys, "16 px", "32 px")
    assert not (tmp_path / "big").exists()


def test_truncated_file_stops_resumably_or_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = mixed_folder(tmp_path / "data")
    bad = data / "train" / "dog" / "5.jpg"
    bad.write_bytes(bad.read_bytes()[:-300])  # the header reads fine; decoding fails in a worker
    common = ["pretrain", "--dataset", "folder", "--data-dir", data, "--image-size", "16", *NET, "--epochs", "2",
              "--workers", "1", "--out", tmp_path / "run"]
    one_line_error(common, capsys, bad, "--resume")
    blob = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)
    assert blob["position"]["epoch"] == 1  # the checkpoint sits at the batch that holds the file
    assert run(["pretrain", "--out", tmp_path / "run", "--resume", "--bad-images", "skip", "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r.get("bad_images") for r in records)
    assert "skipped 1 unreadable image(s) this epoch" in capsys.readouterr().out + capsys.readouterr().err


def test_test_fraction_splits_a_single_labelled_folder_for_training_and_evaluation(tmp_path: Path) -> None:
    """--test-fraction holds out a seeded share of each class; the monitor and `eval linear` use that split."""
    data = mixed_folder(tmp_path / "data", per_class=8)
    single = tmp_path / "single"
    for c in ("cat", "dog"):  # one labelled folder: train and test images of a class together, 16 each
        (single / c).mkdir(parents=True)
        for part in ("train", "test"):
            for f in sorted((data / part / c).iterdir()):
                f.rename(single / c / f"{part}-{f.name}")
    flags = ["pretrain", "--dataset", "folder", "--data-dir", single, "--image-size", "16", "--width", "4",
             "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress", "--test-fraction", "0.25"]
    assert run([*flags, "--knn-every", "1", "--knn-k", "5", "--out", tmp_path / "run"]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 24 // 4 and "knn_top1" in record  # 32 images, 8 held out: 24 train
    assert run(["eval", "linear", tmp_path / "run" / "last.ckpt", "--no-progress", "--workers", "0"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert (result["train_images"], result["test_images"]) == (24, 8)
    assert run([*flags[:-1], "1.5", "--out", tmp_path / "bad"]) == 2 and not (tmp_path / "bad").exists()
