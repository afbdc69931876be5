"""Layout readers on tiny synthetic copies of each official layout (ImageNet, ImageNet-100, folders, transfer sets)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idaa.cli import main
from idaa.data.layouts import imagenet100_classes, read_layout, split_listing
from idaa.errors import DataError

WNIDS = ["n01440764", "n01443537", "n01484850"]


def image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(listing):
    return sorted((p.name, listing.classes[label]) for p, label in zip(listing.files, listing.labels, strict=True))


def imagenet_train(root: Path, wnids=WNIDS, per_class: int = 2) -> None:
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            image(root / "train" / wnid / f"{wnid}_{i}.JPEG", seed=c * 10 + i)


def flat_val(root: Path) -> dict[str, str]:
    truth = {f"ILSVRC2012_val_{i:08d}": WNIDS[(i * 2) % 3] for i in range(1, 5)}
    for i, name in enumerate(truth):
        image(root / "val" / f"{name}.JPEG", seed=100 + i)
    return truth


def test_imagenet_train_and_val_class_folders(tmp_path):
    imagenet_train(tmp_path)
    image(tmp_path / "val" / WNIDS[1] / "v.JPEG")
    train, test = read_layout("imagenet", tmp_path, "train"), read_layout("ImageNet", tmp_path, "val")
    assert train.classes == WNIDS and len(train.files) == 6 and sorted(set(train.labels)) == [0, 1, 2]
    assert names(test) == [("v.JPEG", WNIDS[1])] and test.classes == WNIDS


@pytest.mark.parametrize("kind", ["loc_csv", "val_txt", "caffe_index", "devkit"])
def test_imagenet_flat_val_with_each_labels_file(tmp_path, kind):
    imagenet_train(tmp_path)
    truth = flat_val(tmp_path)
    if kind == "loc_csv":  # Kaggle: the wnid starts the prediction string, boxes follow
        rows = "".join(f"{n},{w} 1 2 30 40 {w} 5 6 7 8\n" for n, w in truth.items())
        write(tmp_path / "LOC_val_solution.csv", "ImageId,PredictionString\n" + rows)
    elif kind == "val_txt":
        write(tmp_path / "val.txt", "".join(f"{n}.JPEG {w}\n" for n, w in truth.items()))
    elif kind == "caffe_index":  # indices into the sorted 1000 wnids: needs the full class list in train/
        everything = sorted(WNIDS + [f"n09{i:06d}" for i in range(997)])
        for wnid in everything:
            (tmp_path / "train" / wnid).mkdir(parents=True, exist_ok=True)
        write(tmp_path / "val.txt", "".join(f"{n}.JPEG {everything.index(w)}\n" for n, w in truth.items()))
    else:  # the devkit: ILSVRC2012_IDs that meta.mat maps to wnids (not in sorted order)
        from scipy.io import savemat

        ids = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[1]: 3}
        synsets = np.array([(i, w, 0) for w, i in ids.items()] + [(4, "n00000001", 3)],
                           dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
        data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        savemat(str(data / "meta.mat"), {"synsets": synsets})
        write(data / "ILSVRC2012_validation_ground_truth.txt", "".join(f"{ids[w]}\n" for w in truth.values()))
    listing = read_layout("imagenet", tmp_path, "test")
    assert names(listing) == sorted((f"{n}.JPEG", w) for n, w in truth.items())


def test_imagenet_refuses_a_flat_val_without_labels_or_with_unknown_classes(tmp_path, capsys):
    imagenet_train(tmp_path)
    truth = flat_val(tmp_path)
    out = tmp_path / "shards"
    assert main(["data", "pack", str(tmp_path), "--dataset", "imagenet", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs a labels file" in err and "LOC_val_solution.csv" in err and len(err.splitlines()) == 1
    bad = dict(truth, **{next(iter(truth)): "n07999999"})
    write(tmp_path / "val.txt", "".join(f"{n}.JPEG {w}\n" for n, w in bad.items()))
    assert main(["data", "pack", str(tmp_path), "--dataset", "imagenet", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "names class 'n07999999'" in err and len(err.splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".shards") for p in tmp_path.iterdir())


def test_imagenet100_selects_the_shipped_classes_from_a_full_copy(tmp_path):
    wanted = imagenet100_classes()
    assert len(wanted) == 100 == len(set(wanted)) and wanted[:2] == ["n02869837", "n01749939"]
    imagenet_train(tmp_path, wnids=wanted + ["n01440764"], per_class=1)
    truth = {"ILSVRC2012_val_00000001": wanted[5], "ILSVRC2012_val_00000002": "n01440764"}
    for i, name in enumerate(truth):
        image(tmp_path / "val" / f"{name}.JPEG", seed=i)
    write(tmp_path / "val.txt", "".join(f"{n}.JPEG {w}\n" for n, w in truth.items()))
    train = read_layout("imagenet-100", tmp_path, "train")
    assert train.classes == sorted(wanted) and len(train.files) == 100
    assert names(read_layout("imagenet100", tmp_path, "test")) == [("ILSVRC2012_val_00000001.JPEG", wanted[5])]
    (tmp_path / "train" / wanted[0] / f"{wanted[0]}_0.JPEG").unlink()
    (tmp_path / "train" / wanted[0]).rmdir()
    with pytest.raises(DataError, match="lacks 1 of the 100 classes"):
        read_layout("imagenet100", tmp_path, "train")


def test_folder_layouts_and_the_seeded_split(tmp_path):
    for split, count in (("train", 3), ("test", 1)):
        for c in ("cat", "dog"):
            for i in range(count):
                image(tmp_path / "split" / split / c / f"{i}.png", seed=i)
    assert len(read_layout("folder", tmp_path / "split", "train").files) == 6
    assert names(read_layout("folder", tmp_path / "split", "test")) == [("0.png", "cat"), ("0.png", "dog")]
    for c in ("a", "b"):
        for i in range(10):
            image(tmp_path / "one" / c / f"{i}.jpg", seed=i)
    train = read_layout("folder", tmp_path / "one", "train", test_fraction=0.2, seed=3)
    test = read_layout("folder", tmp_path / "one", "test", test_fraction=0.2, seed=3)
    assert len(test.files) == 4 and sorted(test.labels) == [0, 0, 1, 1]  # 20% of each class
    assert not set(train.files) & set(test.files) and len(train.files) + len(test.files) == 20
    assert test.files == read_layout("folder", tmp_path / "one", "test", test_fraction=0.2, seed=3).files
    assert test.files != read_layout("folder", tmp_path / "one", "test", test_fraction=0.2, seed=4).files
    with pytest.raises(DataError, match="--test-fraction"):
        read_layout("folder", tmp_path / "one", "test")
    for i in range(3):
        image(tmp_path / "flat" / f"{i}.jpg")
    flat = read_layout("folder", tmp_path / "flat", "train")
    assert flat.labels == [-1, -1, -1] and flat.classes == []
    assert len(split_listing(flat, 0.34, seed=0)[1].files) == 1


def test_empty_folders_and_empty_class_folders_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    image(tmp_path / "classes" / "a" / "0.jpg")
    (tmp_path / "classes" / "b").mkdir()
    for folder, message in (("empty", "is empty"), ("classes", "contains no images")):
        out = tmp_path / f"out-{folder}"
        assert main(["data", "pack", str(tmp_path / folder), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("idaa: error:") and len(err.splitlines()) == 1
        assert not out.exists()


def transfer_copy(root: Path, name: str) -> None:
    """A tiny copy of each transfer set's official layout: 2 classes, 2 train and 1 test image each."""
    if name == "aircraft":
        data = root / "fgvc-aircraft-2013b" / "data"
        for i in range(6):
            image(data / "images" / f"{1000 + i}.jpg", seed=i)
        write(data / "variants.txt", "707-320\nCessna 172\n")
        write(data / "images_variant_trainval.txt", "1000 707-320\n1001 707-320\n1002 Cessna 172\n1003 Cessna 172\n")
        write(data / "images_variant_test.txt", "1004 707-320\n1005 Cessna 172\n")
    elif name == "dtd":
        for c in ("banded", "zigzagged"):
            for i in range(3):
                image(root / "dtd" / "images" / c / f"{c}_{i}.jpg", seed=i)
        write(root / "dtd" / "labels" / "train1.txt", "banded/banded_0.jpg\nzigzagged/zigzagged_0.jpg\n")
        write(root / "dtd" / "labels" / "val1.txt", "banded/banded_1.jpg\nzigzagged/zigzagged_1.jpg\n")
        write(root / "dtd" / "labels" / "test1.txt", "banded/banded_2.jpg\nzigzagged/zigzagged_2.jpg\n")
    elif name == "pets":
        base = root / "oxford-iiit-pet"
        for breed in ("Abyssinian", "american_bulldog"):
            for i in range(3):
                image(base / "images" / f"{breed}_{i}.jpg", seed=i)
        write(base / "annotations" / "trainval.txt",
              "Abyssinian_0 1 1 1\nAbyssinian_1 1 1 1\namerican_bulldog_0 2 2 1\namerican_bulldog_1 2 2 1\n")
        write(base / "annotations" / "test.txt", "Abyssinian_2 1 1 1\namerican_bulldog_2 2 2 1\n")
    elif name == "flowers102":
        from scipy.io import savemat

        for i in range(1, 7):
            image(root / "jpg" / f"image_{i:05d}.jpg", seed=i)
        savemat(str(root / "imagelabels.mat"), {"labels": np.array([[1, 2, 1, 2, 1, 2]])})
        savemat(str(root / "setid.mat"), {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]),
                                         "tstid": np.array([[5, 6]])})
    elif name == "cub200":
        base = root / "CUB_200_2011"
        classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
        paths = [f"{classes[i % 2]}/img_{i}.jpg" for i in range(6)]
        for i, rel in enumerate(paths):
            image(base / "images" / rel, seed=i)
        write(base / "classes.txt", "".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
        write(base / "images.txt", "".join(f"{i + 1} {p}\n" for i, p in enumerate(paths)))
        write(base / "image_class_labels.txt", "".join(f"{i + 1} {i % 2 + 1}\n" for i in range(6)))
        write(base / "train_test_split.txt", "".join(f"{i + 1} {int(i < 4)}\n" for i in range(6)))
    elif name == "birdsnap":
        for c in ("Acadian_Flycatcher", "Blue_Jay"):
            for i in range(3):
                image(root / "download" / "images" / c / f"{i}.jpg", seed=i)
        write(root / "test_images.txt", "path\nAcadian_Flycatcher/2.jpg\nBlue_Jay/2.jpg\nBlue_Jay/9.jpg\n")


@pytest.mark.parametrize("name", ["aircraft", "dtd", "pets", "flowers102", "cub200", "birdsnap"])
def test_transfer_set_readers(tmp_path, name):
    transfer_copy(tmp_path, name)
    train, test = read_layout(name, tmp_path, "train"), read_layout(name, tmp_path, "test")
    assert len(train.classes) == 2 and train.classes == test.classes
    assert len(train.files) == 4 and len(test.files) == 2  # birdsnap: the never-downloaded test image is skipped
    assert sorted(train.labels) == [0, 0, 1, 1] and sorted(test.labels) == [0, 1]
    assert not set(train.files) & set(test.files) and all(p.is_file() for p in train.files + test.files)


@pytest.mark.parametrize("name", ["aircraft", "dtd", "pets", "cub200"])
def test_transfer_readers_name_a_missing_listed_image(tmp_path, name):
    transfer_copy(tmp_path, name)
    victim = read_layout(name, tmp_path, "test").files[0]
    victim.unlink()
    with pytest.raises(DataError, match="missing image"):
        read_layout(name, tmp_path, "test")


def test_a_transfer_listing_naming_an_unknown_class_is_refused(tmp_path):
    transfer_copy(tmp_path, "dtd")
    write(tmp_path / "dtd" / "labels" / "test1.txt", "banded/banded_2.jpg\nwoven/woven_1.jpg\n")
    with pytest.raises(DataError, match="class 'woven'"):
        read_layout("dtd", tmp_path, "test")
    with pytest.raises(DataError, match="no Oxford-IIIT Pets data"):
        read_layout("pets", tmp_path, "train")


TRANSFER_PRESETS = sorted((Path(__file__).parents[1] / "configs" / "paper").glob("table[49]-*.yaml"))


@pytest.mark.parametrize("preset", TRANSFER_PRESETS, ids=lambda p: p.name)
def test_table4_and_9_presets_list_a_parsable_transfer_command_per_dataset(preset):
    from idaa.cli import build_parser
    from idaa.data.layouts import LAYOUTS
    from idaa.data.memory import DATASETS

    commands = [line[2:].split() for line in preset.read_text().splitlines() if line.startswith("# idaa eval transfer")]
    datasets = []
    for command in commands:
        args = build_parser().parse_args(command[1:])
        assert args.eval_command == "transfer" and args.checkpoint.endswith("/last.ckpt") and args.data_dir
        assert args.dataset in LAYOUTS or args.dataset in DATASETS
        datasets.append(args.dataset)
    assert datasets == ["cifar10", "cifar100", "birdsnap", "aircraft", "dtd", "pets", "flowers102", "cub200"]
