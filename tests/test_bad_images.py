"""`--bad-images skip` leaves unreadable files out (of batches, the kNN bank, evaluation), counts them, and resumes
bit-exactly; `idaa data check` names them and `idaa data list` counts the ones its headers give away."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from image_folders import write_image_folder

from idaa.cli import main
from idaa.data import feeds, unreadable
from idaa.data.streamed import StreamedImages
from idaa.data.unreadable import Screen, find_unreadable

NET = ["--width", "4", "--batch-size", "4", "--no-progress", "--image-size", "16"]


def good_folder(root: Path, per_class: int = 8, test_per_class: int = 3) -> Path:
    """train/ and test/ with two classes of random-size JPEGs and PNGs (noise: no image is ever all zeros)."""
    return write_image_folder(root, {"train": per_class, "test": test_per_class}, seed=3, sizes=(20, 60), lowest=1)


def bad_folder(root: Path) -> tuple[Path, dict[str, Path]]:
    """A good folder (15 + 1 training images) plus a truncated JPEG, a zero-byte file and a text file named .jpg."""
    good_folder(root)
    (root / "train" / "dog" / "7.jpg").unlink()  # 15 good + the truncated one: 4 full batches of 4
    truncated = root / "train" / "cat" / "truncated.jpg"
    source = root / "train" / "cat" / "1.jpg"
    truncated.write_bytes(source.read_bytes()[:-200])  # the header reads; decoding fails in a worker
    empty = root / "train" / "dog" / "empty.jpg"
    empty.write_bytes(b"")
    text = root / "train" / "cat" / "notes.jpg"
    text.write_text("not an image at all")
    return root, {"truncated": truncated, "empty": empty, "text": text}


def run(args: list) -> int:
    return main([str(a) for a in args])


def records(run_dir: Path) -> dict[int, dict]:
    """The last metrics record of each epoch (a partial record of an interrupted epoch is replaced later)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["epoch"]: r for r in map(json.loads, lines)}


@pytest.fixture
def no_zero_images(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every training batch and every kNN bank/query batch is checked: no image in it is all zeros."""
    sizes: list[int] = []

    def checked_batch(crops: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert bool((crops.flatten(-3).amax(-1) > 0).all()), "an all-zero image reached training"
        sizes.append(len(crops))
        return torch.Tensor.contiguous(crops.to(device))

    def checked_bank(images: StreamedImages, batch_size: int):
        for batch, labels in original(images, batch_size):
            assert len(batch) == len(labels) and bool((batch.flatten(1).amax(1) > 0).all())
            yield batch, labels

    original = StreamedImages.labelled_split  # what the kNN monitor's bank and queries of a streamed split read
    monkeypatch.setattr(feeds, "channels_first", checked_batch)
    monkeypatch.setattr(StreamedImages, "labelled_split", checked_bank)
    return sizes


def test_skip_leaves_bad_files_out_counts_them_and_resumes_bit_exactly(
        tmp_path: Path, capsys: pytest.CaptureFixture, no_zero_images: list[int]) -> None:
    data, bad = bad_folder(tmp_path / "data")
    common = ["pretrain", "--dataset", "folder", "--data-dir", data, *NET, "--epochs", "2", "--stream",
              "--workers", "2", "--bad-images", "skip", "--knn-every", "1"]
    assert run([*common, "--out", tmp_path / "straight"]) == 0
    out = capsys.readouterr()
    assert "skipped 2 unreadable file(s)" in out.err  # the zero-byte and the text file: found by the listing
    assert "1 unreadable image(s) skipped in the last epoch" in out.out  # the summary line
    assert sorted(set(no_zero_images)) == [3, 4]  # the batch that held the truncated file is one shorter
    straight = records(tmp_path / "straight")
    assert [straight[e]["bad_images"] for e in (1, 2)] == [1, 1]  # the truncated one, met in every epoch
    assert all(r["knn_top1"] >= 0 for r in straight.values())
    assert run([*common, "--out", tmp_path / "resumed", "--max-steps", "7"]) == 0  # stops inside epoch 2
    position = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)["position"]
    assert position["epoch"] == 2 and position["batch"] == 3 and position["bad_images"] == 1  # met before the stop
    assert run(["pretrain", "--out", tmp_path / "resumed", "--resume", "--workers", "2", "--no-progress"]) == 0
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=False)["method"]
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = records(tmp_path / "resumed")
    for epoch in (1, 2):
        assert resumed[epoch]["loss"] == straight[epoch]["loss"]
        assert resumed[epoch]["bad_images"] == straight[epoch]["bad_images"] == 1
    assert bad["truncated"].is_file()  # nothing in the data folder was touched


def test_evaluation_under_skip_leaves_the_file_out_with_its_label(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    data, bad = bad_folder(tmp_path / "data")
    truncated_test = data / "test" / "dog" / "bad.jpg"
    truncated_test.write_bytes((data / "test" / "dog" / "1.jpg").read_bytes()[:-200])
    assert run(["pretrain", "--dataset", "folder", "--data-dir", data, *NET, "--max-steps", "1", "--stream",
                "--workers", "0", "--bad-images", "skip", "--knn-every", "0", "--out", tmp_path / "run"]) == 0
    checkpoint = tmp_path / "run" / "last.ckpt"
    capsys.readouterr()
    assert run(["eval", "knn", checkpoint, "--workers", "0", "--bad-images", "error"]) == 2  # one line naming the file
    err = capsys.readouterr().err.strip()
    assert err.startswith("idaa: error:") and "\n" not in err and "--bad-images skip" in err
    assert not (tmp_path / "run" / "eval_knn.json").exists()
    assert run(["eval", "knn", checkpoint, "--workers", "0"]) == 0  # the run's own --bad-images skip carries over
    result = json.loads((tmp_path / "run" / "eval_knn.json").read_text())
    assert result["bank"] == 15 and result["queries"] == 6  # 16 - truncated, 7 - bad.jpg: no zero rows
    features = [torch.load(p, weights_only=True)["features"] for p in (tmp_path / "run" / "feature-cache").iterdir()]
    assert sorted(len(f) for f in features) == [6, 15] and all(bool((f.norm(dim=1) > 0).all()) for f in features)
    assert "left out 1 unreadable image(s)" in capsys.readouterr().err
    assert run(["eval", "linear", checkpoint, "--workers", "0", "--no-progress"]) == 0
    linear = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert linear["train_images"] == 15 and linear["test_images"] == 6


def test_data_check_names_each_bad_file_and_data_list_counts_them(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    clean = good_folder(tmp_path / "clean")
    assert run(["data", "check", clean, "--workers", "0", "--no-progress"]) == 0
    assert "all 22 image files" in capsys.readouterr().out
    assert run(["data", "list", clean]) == 0
    assert "zero-byte" not in capsys.readouterr().out
    data, bad = bad_folder(tmp_path / "data")
    assert run(["data", "check", data, "--workers", "2", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3 and {line.split(": ")[0] for line in lines} == {str(p) for p in bad.values()}
    assert f"{bad['empty']}: empty file (0 bytes)" in lines
    assert any(line.startswith(f"{bad['truncated']}: ") and "truncated" in line for line in lines)
    assert err.startswith("idaa: error: 3 of 24 image files") and err.count("\n") == 1 and "Traceback" not in err
    assert run(["data", "list", data]) == 0
    assert "train: 18 images, 2 classes, 1 zero-byte and 1 unreadable file(s)" in capsys.readouterr().out
    assert run(["data", "check", data, "--workers", "-1"]) == 2
    assert "--workers must be" in capsys.readouterr().err


def test_data_check_decodes_every_image_of_a_shard_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = good_folder(tmp_path / "data")
    truncated = data / "train" / "cat" / "truncated.jpg"
    truncated.write_bytes((data / "train" / "cat" / "1.jpg").read_bytes()[:-200])  # packs: its header reads
    assert run(["data", "pack", data, "--out", tmp_path / "shards", "--shard-size", "5", "--no-progress"]) == 0
    capsys.readouterr()
    assert run(["data", "check", tmp_path / "shards", "--workers", "2", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1 and ".tar:" in lines[0] and "truncated" in lines[0]
    assert err.startswith("idaa: error: 1 of 23 images in the shards of") and err.count("\n") == 1
    truncated.unlink()
    assert run(["data", "pack", data, "--out", tmp_path / "clean", "--no-progress"]) == 0
    assert run(["data", "check", tmp_path / "clean", "--workers", "0", "--no-progress"]) == 0
    assert "all 22 images in the shards of" in capsys.readouterr().out
    shard = next((tmp_path / "clean").glob("train-*.tar"))
    shard.write_bytes(shard.read_bytes()[:3000])  # a cut tar: its readable samples are checked, the cut is named
    assert run(["data", "check", tmp_path / "clean", "--workers", "0", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert f"cannot read shard '{shard}'" in out and "Traceback" not in err
    # the cut is a shard that stops early, not an image: only the images read before it are counted
    assert err.startswith(f"idaa: error: 1 shard(s) of '{tmp_path / 'clean'}' cannot be read to the end")
    undecoded, read = map(int, re.search(r"and (\d+) of the (\d+) images read before", err).groups())
    assert undecoded == sum(1 for line in out.splitlines() if "cannot read shard" not in line)
    assert read < 22 and err.count("\n") == 1


def test_decode_results_are_reused_by_evaluation_until_a_file_changes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data, bad = bad_folder(tmp_path / "data")
    files = sorted(str(p) for p in (data / "train").rglob("*.jpg"))
    found = find_unreadable(files)
    assert set(found) == {str(p) for p in bad.values()}
    monkeypatch.setattr(unreadable, "_decode_reason", lambda path: pytest.fail(f"decoded {path} again"))
    assert find_unreadable(files) == found  # from the results kept beside the files
    monkeypatch.undo()
    bad["truncated"].write_bytes((data / "train" / "cat" / "1.jpg").read_bytes())  # repaired
    assert set(find_unreadable(files)) == {str(bad["empty"]), str(bad["text"])}


def test_screen_keeps_ranks_in_step_and_stops_on_an_unreadable_batch() -> None:
    skip = Screen("skip", torch.device("cpu"))
    skip.start(0)
    assert skip.keep(["", "cannot read image 'a'", "", ""]).tolist() == [True, False, True, True]
    assert skip.left_out == 1 and skip.report(lambda _: None) == {"bad_images": 1}
    assert skip.keep(["x", "y"]) is None and "every image of a batch" in skip.failure
    skip.start(3)  # a resumed epoch continues its count
    assert skip.left_out == 3 and skip.failure is None
    stop = Screen("error", torch.device("cpu"))
    assert stop.keep(["", ""]).all() and stop.keep(["", "cannot read image 'b'"]) is None
    assert stop.failure == "cannot read image 'b'" and stop.report() == {}


def test_two_ranks_skip_in_step(tmp_path: Path) -> None:
    """Under DDP (gloo, 2 processes) a rank that meets the truncated file makes the other keep as many rows."""
    data, _ = bad_folder(tmp_path / "data")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "idaa",
               "pretrain", "--dataset", "folder", "--data-dir", str(data), "--width", "4", "--batch-size", "8",
               "--image-size", "16", "--epochs", "2", "--stream", "--workers", "0", "--bad-images", "skip",
               "--knn-every", "1", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).parents[1]),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[:4000]  # the workers' own lines come first, torchrun's report last
    assert [r["bad_images"] for r in records(tmp_path / "ddp").values()] == [1, 1]


def test_vae_and_semi_read_every_image_whole_and_leave_bad_ones_out(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    data, _ = bad_folder(tmp_path / "data")
    (data / "test" / "dog" / "bad.jpg").write_bytes((data / "test" / "dog" / "1.jpg").read_bytes()[:-200])
    flags = ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--workers", "0", "--bad-images", "skip",
             "--no-progress"]
    assert run(["vae", "train", *flags, "--latent-dim", "4", "--hidden", "4", "--epochs", "1", "--batch-size", "4",
                "--out", tmp_path / "vae"]) == 0  # the held-out split without its truncated image
    assert run(["semi", *flags, "--backbone", "wrn10-1", "--batch-size", "4", "--mu", "1", "--labels", "4",
                "--steps", "2", "--out", tmp_path / "semi"]) == 0, capsys.readouterr().err
    assert "left out 1 unreadable image(s)" in capsys.readouterr().err
