"""WebDataset shards: pack a folder, stream the same images and labels back, disjoint readers, one-line refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idaa.cli import main
from idaa.data.crops import center_crop, crop_views
from idaa.data.feeds import ShardFeed
from idaa.data.layouts import read_layout
from idaa.data.memory import ImageDataset
from idaa.data.options import StreamOptions
from idaa.data.shards import ShardSource, pack_shards
from idaa.data.sources import open_dataset
from idaa.errors import DataError

SCALE = (0.2, 1.0)


def make_folder(root: Path, train: int = 8, test: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in ("ant", "bee", "cow"):
            for i in range(count):
                pixels = rng.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8)  # mixed sizes
                path = root / split / c / f"{c}{i}.{'png' if i % 2 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("data") / "folder")
    out = tmp_path_factory.mktemp("packed") / "shards"
    assert main(["data", "pack", str(root), "--out", str(out), "--shard-size", "3", "--no-progress"]) == 0
    return root, out


def test_pack_writes_shards_and_an_index_and_the_original_bytes(packed):
    root, out = packed
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["ant", "bee", "cow"] and index["splits"]["train"]["images"] == 24
    assert [s["images"] for s in index["splits"]["train"]["shards"]] == [3] * 8
    assert [s["images"] for s in index["splits"]["test"]["shards"]] == [3, 3]
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "test-000001.tar"] + [
        f"train-{i:06d}.tar" for i in range(8)]
    import webdataset as wds

    listing = read_layout("folder", root, "train")
    sample = next(iter(wds.tarfile_samples([{"url": str(out / "train-000001.tar")}])))
    suffix = listing.files[3].suffix.lstrip(".")
    assert sample[suffix] == listing.files[3].read_bytes()  # stored as is, never re-encoded
    assert int(sample["idx"]) == 3 and int(sample["cls"]) == listing.labels[3]


@pytest.mark.parametrize("split", ["train", "test"])
def test_round_trip_streams_the_same_images_and_labels(packed, split):
    root, out = packed
    listing = read_layout("folder", root, split)
    source = ShardSource(out, split, image_size=8)
    assert source.labels.tolist() == listing.labels and source.classes == listing.classes
    seen = {}
    for crops, labels, indices, errors in source.eval_batches(0, 1, batch_size=4, workers=2):
        assert not any(errors)
        for crop, label, i in zip(crops, labels.tolist(), indices.tolist(), strict=True):
            seen[i] = label
            assert torch.equal(crop, center_crop(listing.files[i], 8))
    assert seen == dict(enumerate(listing.labels))


def test_training_stream_is_seeded_by_index_and_every_image_comes_once(packed):
    root, out = packed
    listing = read_layout("folder", root, "train")
    source = ShardSource(out, "train", image_size=8)
    runs = {}
    for workers in (0, 2):
        batches = list(source.train_loader(epoch=3, seed=7, local_batch=4, rank=0, world=1, workers=workers,
                                           scale=SCALE, views=2))
        assert len(batches) == 6 and all(b[0].shape == (4, 2, 3, 8, 8) for b in batches)
        runs[workers] = {i: c for b in batches for c, i in zip(b[0], b[2].tolist(), strict=True)}
        assert sorted(runs[workers]) == list(range(24))  # 24 images, 6 batches of 4: each once
    for i, crops in runs[0].items():  # the worker count changes the order, never a crop
        assert torch.equal(crops, runs[2][i])
    assert torch.equal(runs[0][5], crop_views(listing.files[5], 5, 3, 7, 8, SCALE, 2))
    resumed = list(source.train_loader(epoch=3, seed=7, local_batch=4, rank=0, world=1, workers=2, scale=SCALE,
                                       views=2, first=4))
    full = list(source.train_loader(epoch=3, seed=7, local_batch=4, rank=0, world=1, workers=2, scale=SCALE, views=2))
    assert [b[2].tolist() for b in resumed] == [b[2].tolist() for b in full[4:]]


def test_ranks_and_workers_read_disjoint_shards(packed):
    _, out = packed
    source = ShardSource(out, "train", image_size=8)
    shares = []
    for rank in (0, 1):
        batches = list(source.train_loader(0, 0, local_batch=3, rank=rank, world=2, workers=2, scale=SCALE, views=1))
        assert len(batches) == 4  # 24 // (3 x 2): the same count on every rank keeps DDP in step
        shares.append({i for b in batches for i in b[2].tolist()})
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 24
    evaluated = [{i for b in source.eval_batches(rank, 2, 5, workers=2) for i in b[2].tolist()} for rank in (0, 1)]
    assert not evaluated[0] & evaluated[1] and evaluated[0] | evaluated[1] == set(range(24))
    with pytest.raises(DataError, match="8 train shards, fewer than the 3 rank"):
        source.train_loader(0, 0, local_batch=2, rank=0, world=3, workers=3, scale=SCALE)


def test_a_broken_image_is_reported_with_its_shard(tmp_path):
    root = make_folder(tmp_path / "folder", train=2, test=1)
    victim = root / "train" / "ant" / "ant0.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(victim)
    victim.write_bytes(victim.read_bytes()[:2000])  # a valid header, a truncated body
    pack_shards("folder", root, tmp_path / "shards", shard_size=4)
    errors = [e for b in ShardSource(tmp_path / "shards", "train", 8).eval_batches(0, 1, 8) for e in b[3] if e]
    assert len(errors) == 1 and "cannot read image" in errors[0] and "train-000000.tar" in errors[0]
    victim.write_bytes(b"not an image")
    with pytest.raises(DataError, match="ant0.jpg': not a readable image"):
        pack_shards("folder", root, tmp_path / "again", shard_size=4)
    assert not (tmp_path / "again").exists() and not (tmp_path / ".again.packing").exists()


def test_bad_shard_folders_are_one_line_errors(tmp_path, packed, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "list", str(tmp_path / "empty"), "--dataset", "shards"]) == 2
    err = capsys.readouterr().err
    assert "holds no shards" in err and "idaa data pack" in err and len(err.splitlines()) == 1
    _, out = packed
    assert main(["data", "list", str(out), "--dataset", "shards"]) == 0
    assert "train: 24 images in 8 shards" in capsys.readouterr().out
    root = make_folder(tmp_path / "f", train=1, test=1)
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for args, message in ((["--out", str(target)], "not an empty folder"),
                          (["--out", str(tmp_path / "n"), "--shard-size", "0"], "--shard-size must be >= 1"),
                          (["--out", str(tmp_path / "n"), "--test-fraction", "0.5"], "has its own test split")):
        assert main(["data", "pack", str(root), *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"] and not (tmp_path / "n").exists()


def test_shard_feed_gives_training_batches_like_the_folder_feed(packed):
    _, out = packed
    source = ShardSource(out, "train", image_size=8, options=StreamOptions(workers=0, seed=1))
    feed = ShardFeed(source, torch.device("cpu"), batch_size=6, local_batch=6, rank=0, policy="simsiam", views=3)
    batches = list(feed.batches(epoch=0, order=torch.arange(len(source))))
    assert len(batches) == 4 and feed.failure is None and feed.crops
    first = batches[0]
    assert first.first.shape == first.second.shape == first.source.shape == (6, 3, 8, 8)
    assert not torch.equal(first.first, first.second)  # two different seeded crops of the same images
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(24))


def test_a_folder_and_its_shards_have_one_normalisation_so_its_vae_fits_them(tmp_path):
    """The same images get the same mean/std in memory, streamed and packed; a VAE trained on the folder (in memory)
    is accepted for pretraining on its shards (it was refused: 'VAE was trained with normalisation mean=...')."""
    root, rng = tmp_path / "folder", np.random.default_rng(1)
    for split, count in (("train", 8), ("test", 2)):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    shards = tmp_path / "shards"
    assert main(["data", "pack", str(root), "--out", str(shards), "--shard-size", "4", "--no-progress"]) == 0
    in_memory = open_dataset("folder", root)
    streamed = open_dataset("folder", root, options=StreamOptions(stream=True, workers=0))
    packed = open_dataset("folder", shards, options=StreamOptions(image_size=16, workers=0))
    assert isinstance(in_memory, ImageDataset) and isinstance(packed, ShardSource)
    assert in_memory.mean == streamed.mean == packed.mean and in_memory.std == streamed.std == packed.std
    pixels = in_memory.images.double() / 255  # 16 px images are measured at their own size: the exact statistic
    assert np.allclose(in_memory.mean, pixels.mean(dim=(0, 2, 3)))
    tiny = ["--dataset", "folder", "--batch-size", "4", "--workers", "0", "--no-progress"]
    assert main(["vae", "train", *tiny, "--data-dir", str(root), "--latent-dim", "4", "--hidden", "4", "--epochs", "1",
                 "--out", str(tmp_path / "vae")]) == 0
    assert main(["pretrain", *tiny, "--data-dir", str(shards), "--image-size", "16", "--width", "4", "--epochs", "1",
                 "--adversary", "idaa", "--vae", str(tmp_path / "vae" / "vae.pt"), "--eps", "0.1",
                 "--out", str(tmp_path / "run")]) == 0
