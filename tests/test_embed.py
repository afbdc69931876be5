"""`idaa embed`, `pretrain --embed-map`: a 2-d map of test features as PNG + CSV (t-SNE always, UMAP if installed)."""

import csv
import math
import sys
from pathlib import Path

import pytest
from cli_run import run
from PIL import Image

from idaa.cli import main
from idaa.data.memory import load_dataset

TINY = ["--dataset", "digits", "--width", "4", "--batch-size", "32", "--limit", "64", "--epochs", "1",
        "--knn-every", "0", "--no-progress"]



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["pretrain", *TINY, "--out", str(out)]) == 0
    return out / "last.ckpt"


def read_map(folder: Path) -> list[dict]:
    with (folder / "embed.csv").open() as handle:
        return list(csv.DictReader(handle))


def check_map(folder: Path, n: int) -> list[dict]:
    rows = read_map(folder)
    assert len(rows) == n and list(rows[0]) == ["index", "label", "class", "x", "y"]
    test = load_dataset("digits", split="test")
    for row in rows:  # each row is the test image it says it is
        label = int(test.labels[int(row["index"])])
        assert int(row["label"]) == label and row["class"] == test.classes[label]
        assert math.isfinite(float(row["x"])) and math.isfinite(float(row["y"]))
    assert len({row["x"] for row in rows}) > n // 2, "the map collapsed to a few points"
    assert len({row["label"] for row in rows}) == 10
    with Image.open(folder / "embed.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    return rows


def test_tsne_map_is_written_and_reproducible(checkpoint, tmp_path, capsys):
    code, out, err = run(["embed", str(checkpoint), "--method", "tsne", "--limit", "80", "--out", str(tmp_path / "a"),
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "(tsne)" in out and "embed.png" in out
    first = check_map(tmp_path / "a", 80)
    assert run(["embed", str(checkpoint), "--method", "tsne", "--limit", "80", "--out", str(tmp_path / "b"),
                "--no-progress"], capsys)[0] == 0
    assert read_map(tmp_path / "b") == first, "same seed, same map"


def test_auto_falls_back_to_tsne_without_umap(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now raises ImportError
    code, out, err = run(["embed", str(checkpoint), "--limit", "40", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    assert "(tsne)" in out
    check_map(tmp_path, 40)
    code, _, err = run(["embed", str(checkpoint), "--method", "umap", "--out", str(tmp_path)], capsys)
    assert code == 2 and "umap-learn" in err and len(err.strip().splitlines()) == 1, err


def test_umap_map_when_installed(checkpoint, tmp_path, capsys):
    if not hasattr(pytest.importorskip("umap"), "UMAP"):
        pytest.skip("the installed 'umap' is not umap-learn")
    code, out, err = run(["embed", str(checkpoint), "--method", "umap", "--limit", "60", "--out", str(tmp_path),
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "(umap)" in out
    check_map(tmp_path, 60)


def test_pretrain_embed_map_writes_the_map_into_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # t-SNE: fast and always available
    out = tmp_path / "run"
    code, printed, err = run(["pretrain", *TINY, "--max-steps", "1", "--embed-map", "--out", str(out)], capsys)
    assert code == 0, err
    assert "embedding map" in printed
    check_map(out, len(load_dataset("digits", split="test")))


@pytest.mark.parametrize("argv, words", [
    (["embed", "{tmp}/gone.ckpt"], ["gone.ckpt"]),
    (["embed", "{ckpt}", "--limit", "3"], ["--limit"]),
    (["embed", "{ckpt}", "--method", "pca"], ["--method"]),
    (["embed", "{ckpt}", "--dataset", "folder", "--data-dir", "{tmp}/nowhere"], ["nowhere"]),
])
def test_bad_input_is_one_line_exit_2(argv, words, checkpoint, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    code, _, err = run(argv, capsys)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
