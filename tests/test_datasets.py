"""Dataset loaders on tiny synthetic copies of every supported format, plus their error messages."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idaa.data import download, folder_cache, memory
from idaa.data.download import ARCHIVES, Archive, download_and_extract
from idaa.data.memory import DATASETS, STATS, ImageDataset, load_dataset
from idaa.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def rng_u8(seed: int, *shape: int) -> np.ndarray:
    """Deterministic random uint8 array."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def dump(path: Path, obj: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, sizes: tuple[int, ...] = (3, 2, 4), n_test: int = 3) -> dict[str, np.ndarray]:
    """Fake cifar-10-batches-py with a few rows per batch; returns the pixels and labels written."""
    folder = root / "cifar-10-batches-py"
    dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072})
    data, labels = [], []
    for i, n in enumerate(sizes, 1):
        x, y = rng_u8(i, n, 3072), [int(v) for v in rng_u8(10 + i, n) % 10]
        dump(folder / f"data_batch_{i}", {b"data": x, b"labels": y, b"batch_label": b"x"}, protocol=2 + i % 2)
        data.append(x)
        labels += y
    test_x, test_y = rng_u8(99, n_test, 3072), [1, 2, 3][:n_test]
    dump(folder / "test_batch", {b"data": test_x, b"labels": test_y})
    return {"train_x": np.concatenate(data), "train_y": np.array(labels), "test_x": test_x, "test_y": test_y}


def write_images(
    folder: Path, n: int, size: int = 8, ext: str = "png", seed: int = 0, mode: str = "RGB"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.fromarray(rng_u8(seed + i, size, size, 3)).convert(mode)
        img.save(folder / f"{i:04d}.{ext}")


def raises(fn, *needles: object) -> str:
    """Assert fn raises a one-line DataError mentioning every needle; return the message."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


# ---------------------------------------------------------------- pickle / binary formats


def test_cifar10_pickles_round_trip(tmp_path: Path) -> None:
    ref = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, "train")
    assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES and len(ds) == 9
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (9, 3, 32, 32) and ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == ref["train_y"].tolist()
    assert torch.equal(ds.images, torch.from_numpy(ref["train_x"].reshape(-1, 3, 32, 32)))
    assert (ds.mean, ds.std) == STATS["cifar10"] and ds.image_size == 32 and ds.channels == 3
    test = load_dataset("CIFAR-10", tmp_path / "cifar-10-batches-py", "test")  # folder itself, alias name
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(ref["test_x"]))
    assert test.labels.tolist() == [1, 2, 3]


def test_cifar100_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    names = [f"class{i:02d}" for i in range(100)]
    dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []})
    x = rng_u8(5, 4, 3072)
    dump(folder / "train", {b"data": x, b"fine_labels": [0, 99, 42, 7], b"coarse_labels": [0, 1, 2, 3]})
    dump(folder / "test", {b"data": x[:2], b"fine_labels": [5, 6], b"coarse_labels": [0, 1]})
    ds = load_dataset("cifar100", tmp_path)
    assert ds.classes == names and ds.labels.tolist() == [0, 99, 42, 7]
    assert (
        torch.equal(ds.images, torch.from_numpy(x).reshape(4, 3, 32, 32)) and ds.mean == STATS["cifar100"][0]
    )
    assert len(load_dataset("cifar100", tmp_path, "test")) == 2


def write_stl(root: Path, n: int = 3, unlabeled: int = 2) -> np.ndarray:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    raw = rng_u8(7, n, 3 * 96 * 96)
    raw.tofile(folder / "train_X.bin")
    np.array([1, 10, 4][:n], dtype=np.uint8).tofile(folder / "train_y.bin")
    rng_u8(8, unlabeled, 3 * 96 * 96).tofile(folder / "unlabeled_X.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return raw


def test_stl10_binary_column_major(tmp_path: Path) -> None:
    raw = write_stl(tmp_path)
    ds = load_dataset("stl10", tmp_path, "train")
    assert ds.images.shape == (3, 3, 96, 96) and ds.labels.tolist() == [0, 9, 3] and ds.classes[9] == "c9"
    flat = raw.reshape(3, 3, 96 * 96)
    # byte k of a channel plane is pixel (row k % 96, column k // 96): column-major storage
    assert ds.images[1, 2, 5, 7] == flat[1, 2, 7 * 96 + 5]
    assert torch.equal(ds.images, torch.from_numpy(raw.reshape(3, 3, 96, 96).transpose(0, 1, 3, 2).copy()))
    unl = load_dataset("stl10", tmp_path / "stl10_binary", "unlabelled")
    assert (
        len(unl) == 2
        and unl.labels.tolist() == [-1, -1]
        and unl.classes == []
        and unl.mean == STATS["stl10"][0]
    )


# ---------------------------------------------------------------- image folders


def test_tinyimagenet_layout(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn09\tother\n")
    write_images(root / "train" / "n01" / "images", 2, 64, "JPEG", seed=1)
    write_images(root / "train" / "n02" / "images", 3, 64, "JPEG", seed=5, mode="L")  # greyscale -> RGB
    write_images(root / "val" / "images", 2, 64, "JPEG", seed=9)
    (root / "val" / "val_annotations.txt").write_text(
        "0000.JPEG\tn02\t0\t0\t10\t10\n0001.JPEG\tn01\t1\t1\t5\t5\n"
    )
    ds = load_dataset("tinyimagenet", tmp_path)
    assert ds.classes == ["goldfish", "tabby"] and ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert ds.images.shape == (5, 3, 64, 64) and ds.mean == STATS["tinyimagenet"][0]
    assert torch.equal(ds.images[2, 0], ds.images[2, 1])  # grey repeated into every channel
    val = load_dataset("tinyimagenet", root, "test")
    assert val.labels.tolist() == [1, 0] and val.images.shape == (2, 3, 64, 64)


def test_folder_labelled_png_round_trip_and_modes(tmp_path: Path) -> None:
    write_images(tmp_path / "b_cls", 2, seed=3)
    write_images(tmp_path / "a_cls", 1, seed=4, mode="RGBA")
    write_images(tmp_path / "a_cls" / "nested", 1, seed=6, mode="P")
    write_images(tmp_path / "c_cls", 1, ext="bmp", seed=7, mode="L")
    ds = load_dataset("folder", tmp_path)
    assert ds.classes == ["a_cls", "b_cls", "c_cls"] and ds.labels.tolist() == [0, 0, 1, 1, 2]
    assert ds.images.shape == (5, 3, 8, 8)
    assert torch.equal(ds.images[2], torch.from_numpy(rng_u8(3, 8, 8, 3)).permute(2, 0, 1))  # lossless PNG
    assert torch.equal(ds.images[3], torch.from_numpy(rng_u8(4, 8, 8, 3)).permute(2, 0, 1))
    x = ds.images.double() / 255
    assert np.allclose(ds.mean, x.mean(dim=(0, 2, 3))) and np.allclose(
        ds.std, x.std(dim=(0, 2, 3), correction=0)
    )


def test_folder_unlabelled_and_split(tmp_path: Path) -> None:
    write_images(tmp_path / "flat", 3, ext="jpg")
    flat = load_dataset("folder", tmp_path / "flat")
    assert flat.labels.tolist() == [-1, -1, -1] and flat.classes == [] and flat.name == "folder"
    raises(lambda: load_dataset("folder", tmp_path / "flat", "test"), tmp_path / "flat", "test")
    write_images(tmp_path / "split" / "train" / "cat", 2, seed=1)
    write_images(tmp_path / "split" / "train" / "dog", 2, seed=2)
    write_images(tmp_path / "split" / "test" / "dog", 1, seed=3)  # a class missing from test keeps its label
    train, test = (
        load_dataset("folder", tmp_path / "split"),
        load_dataset("folder", tmp_path / "split", "test"),
    )
    assert test.classes == ["cat", "dog"] and test.labels.tolist() == [1] and test.mean == train.mean


def write_cifar_jpg(base: Path, per_class: int = 2) -> None:
    for split, seed in (("train", 0), ("test", 50)):
        for c, name in enumerate(CIFAR10_CLASSES):
            write_images(base / split / name, per_class, 32, "jpg", seed=seed + 5 * c)


def test_cifar10_jpg_layout_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "cifar10_jpg"
    write_cifar_jpg(base)
    ds = load_dataset("cifar10", tmp_path, "train")
    assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES and (ds.mean, ds.std) == STATS["cifar10"]
    assert ds.images.shape == (20, 3, 32, 32) and ds.labels.tolist() == [i // 2 for i in range(20)]
    assert (base / ".idaa-cache-train.pt").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(folder_cache, "decode_images", fail)
    again = load_dataset("cifar10", base, "train")  # data_dir pointing straight at the layout
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    write_images(base / "train" / "cat", 3, 32, "jpg", seed=77)  # a new file changes the fingerprint
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("cifar10", base, "train")


def test_cache_skipped_when_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar_jpg(tmp_path, per_class=1)

    def readonly(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(folder_cache.tempfile, "mkstemp", readonly)
    assert len(load_dataset("cifar10", tmp_path, "test")) == 10
    assert not list(tmp_path.glob(".idaa-cache*"))


def test_digits_split_is_fixed_and_stratified() -> None:
    train, test = load_dataset("digits", split="train"), load_dataset("digits", "/ignored", "test")
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == [str(i) for i in range(10)] and int(train.images.max()) > 200
    counts = torch.bincount(test.labels, minlength=10).double() / torch.bincount(train.labels, minlength=10)
    assert counts.min() > 0.2 and counts.max() < 0.3
    assert torch.equal(load_dataset("digits").images, train.images) and test.mean == train.mean
    x = train.images.double() / 255
    assert np.allclose(train.mean, x.mean(dim=(0, 2, 3)))


# ---------------------------------------------------------------- ImageDataset


def make_ds(labels: list[int]) -> ImageDataset:
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    classes = [str(c) for c in range(max(labels) + 1)] if max(labels) >= 0 else []
    return ImageDataset(images, torch.tensor(labels), classes, "folder", (0.5,) * 3, (0.25,) * 3)


def test_subset_and_take() -> None:
    ds = make_ds([0] * 10 + [1] * 10 + [2] * 4)
    sub = ds.subset([3, 1, 20])
    assert sub.labels.tolist() == [0, 0, 2] and sub.images[:, 0, 0, 0].tolist() == [3, 1, 20]
    assert (sub.name, sub.classes, sub.mean, sub.std) == (ds.name, ds.classes, ds.mean, ds.std)
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0 and "n=24" in repr(ds)
    small = ds.take(9, seed=3)
    assert torch.bincount(small.labels).tolist() == [3, 3, 3]
    assert torch.equal(small.images, ds.take(9, seed=3).images)
    assert not torch.equal(small.images, ds.take(9, seed=4).images)
    assert torch.bincount(ds.take(20).labels).tolist() == [8, 8, 4]  # the small class is exhausted
    assert len(ds.take(24)) == 24 and len(make_ds([-1] * 5).take(3)) == 3
    raises(lambda: ds.take(25), "25", "24")


# ---------------------------------------------------------------- errors


def test_bad_names_and_dirs(tmp_path: Path) -> None:
    raises(lambda: load_dataset("imagenet", tmp_path), "imagenet", ", ".join(DATASETS))
    raises(lambda: load_dataset("cifar10", tmp_path, "unlabeled"), "unlabeled", "train, test")
    raises(lambda: load_dataset("stl10", tmp_path, "val2"), "train, test, unlabeled")
    raises(
        lambda: load_dataset("cifar10", tmp_path / "nope"),
        f"data directory '{tmp_path / 'nope'}' does not exist",
    )
    (tmp_path / "empty").mkdir()
    raises(lambda: load_dataset("cifar10", tmp_path / "empty"), tmp_path / "empty", "cifar-10-batches-py")
    raises(lambda: load_dataset("stl10", tmp_path / "empty"), tmp_path / "empty", "train_X.bin")
    raises(lambda: load_dataset("tinyimagenet", tmp_path / "empty"), tmp_path / "empty", "wnids.txt")
    raises(lambda: load_dataset("folder", tmp_path / "empty"), tmp_path / "empty", "empty")
    (tmp_path / "empty" / "cls").mkdir()
    raises(lambda: load_dataset("folder", tmp_path / "empty"), tmp_path / "empty" / "cls", "no images")
    raises(lambda: load_dataset("folder", tmp_path, download=True), "download")


def test_corrupt_pickles(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    batch = folder / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:200])
    raises(lambda: load_dataset("cifar10", tmp_path), batch, "truncated")
    batch.write_bytes(b"\x00garbage")
    raises(lambda: load_dataset("cifar10", tmp_path), batch)
    dump(batch, {b"data": rng_u8(0, 2, 100), b"labels": [0, 1]})
    raises(lambda: load_dataset("cifar10", tmp_path), batch, "3072")
    dump(batch, {b"data": rng_u8(0, 2, 3072), b"labels": [0]})
    raises(lambda: load_dataset("cifar10", tmp_path), batch, "labels")
    batch.write_bytes(pickle.dumps({b"data": os.getcwd}))  # a non-numpy global must be refused, never called
    raises(lambda: load_dataset("cifar10", tmp_path), batch, "posix")
    (folder / "batches.meta").unlink()
    raises(lambda: load_dataset("cifar10", tmp_path, "test"), folder / "batches.meta")
    (folder / "test_batch").unlink()
    raises(lambda: load_dataset("cifar10", tmp_path, "test"), folder / "test_batch")


def test_truncated_stl(tmp_path: Path) -> None:
    write_stl(tmp_path)
    x = tmp_path / "stl10_binary" / "unlabeled_X.bin"
    x.write_bytes(x.read_bytes()[:-5])
    raises(lambda: load_dataset("stl10", tmp_path, "unlabeled"), x, "truncated")
    y = tmp_path / "stl10_binary" / "train_y.bin"
    y.write_bytes(b"\x01")
    raises(lambda: load_dataset("stl10", tmp_path, "train"), y)


def test_unreadable_and_mixed_images(tmp_path: Path) -> None:
    write_images(tmp_path / "a", 2, ext="jpg")
    bad = tmp_path / "a" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:-200])  # truncated JPEG: only load() notices
    raises(lambda: load_dataset("folder", tmp_path), bad)
    bad.write_bytes(b"not an image")
    raises(lambda: load_dataset("folder", tmp_path), bad)
    write_images(tmp_path / "a", 2, ext="jpg")
    write_images(tmp_path / "b", 1, size=12, ext="png")
    raises(
        lambda: load_dataset("folder", tmp_path),
        tmp_path / "a" / "0000.jpg",
        tmp_path / "b" / "0000.png",
        "8x8",
        "12x12",
        "resize",
    )


def test_threaded_decode_matches_serial(tmp_path: Path) -> None:
    write_images(tmp_path, 7, ext="png")
    files = sorted(tmp_path.glob("*.png"))
    assert torch.equal(folder_cache.decode_images(files, workers=3), folder_cache.decode_images(files, workers=1))
    write_images(tmp_path / "big", 1, size=9)
    files.insert(5, tmp_path / "big" / "0000.png")
    raises(lambda: folder_cache.decode_images(files, workers=3), files[0], files[5], "9x9")


# ---------------------------------------------------------------- download


def make_archive(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src"
    write_cifar10(src, sizes=(2,), n_test=1)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_and_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, md5 = make_archive(tmp_path)
    dest = tmp_path / "dest"
    assert ARCHIVES["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    out = download_and_extract("cifar10", dest, url=archive.as_uri(), md5=md5)
    assert out == dest / "cifar-10-batches-py" and len(load_dataset("cifar10", dest)) == 2
    assert (
        download_and_extract("cifar10", dest, url="file:///missing.tar.gz") == out
    )  # already there: no fetch
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py"]
    spec = ARCHIVES["cifar10"]
    monkeypatch.setitem(
        download.ARCHIVES, "cifar10", Archive(archive.as_uri(), spec.filename, md5, spec.folder)
    )
    assert len(load_dataset("cifar10", tmp_path / "auto", "test", download=True)) == 1
    assert memory.ARCHIVES is download.ARCHIVES


def test_download_failures(tmp_path: Path) -> None:
    archive, md5 = make_archive(tmp_path)
    dest = tmp_path / "dest"
    raises(
        lambda: download_and_extract("cifar10", dest, url=archive.as_uri(), md5="0" * 32), "checksum mismatch"
    )
    assert list(dest.iterdir()) == []  # no partial folder or temp file left behind
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:-300])
    cut_md5 = hashlib.md5(cut.read_bytes()).hexdigest()
    raises(
        lambda: download_and_extract("cifar10", dest, url=cut.as_uri(), md5=cut_md5),
        "truncated",
        cut.as_uri(),
    )
    assert list(dest.iterdir()) == []
    raises(
        lambda: download_and_extract("cifar10", dest, url=(tmp_path / "no.tgz").as_uri()), "cannot download"
    )
    raises(lambda: download_and_extract("tinyimagenet", dest), "tinyimagenet")
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    evil_md5 = hashlib.md5(evil.read_bytes()).hexdigest()
    raises(lambda: download_and_extract("cifar10", dest, url=evil.as_uri(), md5=evil_md5), "unsafe", "escape")
    assert not (tmp_path / "escape.txt").exists() and list(dest.iterdir()) == []
