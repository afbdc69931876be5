"""The bad-input suite: every wrong value or file at the CLI gets exit code 2, one line naming the problem, no
traceback, and an existing run folder is left byte-for-byte as it was (docs/robustness.md lists these cases)."""

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idaa.cli import main
from idaa.data import download
from idaa.data.download import Archive
from idaa.data.memory import load_dataset
from idaa.nets import VAE, save_vae

TINY = ["--width", "4", "--batch-size", "32", "--limit", "128", "--epochs", "1", "--no-progress"]


def digits_vae(tmp: Path, **meta_overrides) -> str:
    digits = load_dataset("digits")
    path = tmp / "vae.pt"
    meta = {"dataset": "digits", "mean": list(digits.mean), "std": list(digits.std), **meta_overrides}
    save_vae(VAE(image_size=meta.pop("size", 32), latent_dim=8, hidden=8).freeze(), path, meta)
    return str(path)


def write_folder(root: Path, size: int = 32, per_class: int = 4) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    for name in ["data_batch_1", "test_batch"]:
        batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def truncated_download(tmp: Path, monkeypatch) -> list[str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()  # incompressible
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = tmp / "cifar-10-python.tar.gz"
    archive.write_bytes(buffer.getvalue()[:20_000])  # cut short, as an interrupted transfer leaves it
    import hashlib

    md5 = hashlib.md5(archive.read_bytes()).hexdigest()  # the checksum matches: extraction itself must fail
    monkeypatch.setitem(download.ARCHIVES, "cifar10", Archive(archive.as_uri(), archive.name, md5,
                                                              "cifar-10-batches-py"))
    return ["pretrain", "--dataset", "cifar10", "--data-dir", str(tmp / "dl"), "--download", *TINY]


def existing_checkpoint_run(tmp: Path, garbage: bool) -> Path:
    run = tmp / "other"
    run.mkdir()
    (run / "config.yaml").write_text("method: simclr\nout: x\n")
    if garbage:
        (run / "last.ckpt").write_bytes(b"\x00not a checkpoint")
    return run


def after(_done: object, argv: list[str]) -> list[str]:
    """Run a setup expression (its value is ignored), then give the argv."""
    return argv


# id -> (argv builder taking (tmp, monkeypatch), words the one-line message must contain)
CASES = {
    "missing data dir": (lambda t, m: ["pretrain", "--dataset", "cifar10", "--data-dir", str(t / "nope"), *TINY],
                         ["does not exist"]),
    "empty folder": (lambda t, m: after((t / "empty").mkdir(), ["pretrain", "--dataset", "folder", "--data-dir",
                                                             str(t / "empty"), *TINY]), ["empty"]),
    "truncated archive": (truncated_download, ["truncated archive"]),
    "truncated pickle": (lambda t, m: after((write_cifar10(t / "c") / "data_batch_1").write_bytes(b"\x80\x04\x95"),
                         ["pretrain", "--dataset", "cifar10", "--data-dir", str(t / "c"), *TINY]), ["data_batch_1"]),
    "corrupt JPEG": (lambda t, m: after((write_folder(t / "f") / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage"),
                     ["pretrain", "--dataset", "folder", "--data-dir", str(t / "f"), *TINY]), ["bad.jpg"]),
    "wrong image size for the VAE": (lambda t, m: ["pretrain", "--adversary", "idaa", "--dataset", "digits",
                                                   "--vae", digits_vae(t, size=64), *TINY], ["64 px", "32 px"]),
    "VAE from another dataset": (lambda t, m: ["pretrain", "--adversary", "idaa", "--dataset", "digits", "--vae",
                                               digits_vae(t, dataset="cifar10"), *TINY], ["trained on 'cifar10'"]),
    "VAE file missing": (lambda t, m: ["pretrain", "--adversary", "idaa", "--dataset", "digits", "--vae",
                                       str(t / "none.pt"), *TINY], ["none.pt"]),
    "VAE file corrupt": (lambda t, m: after((t / "v.pt").write_bytes(b"junk"),
                         ["pretrain", "--adversary", "idaa", "--dataset", "digits", "--vae", str(t / "v.pt"), *TINY]),
                         ["v.pt"]),
    "idaa without a VAE": (lambda t, m: ["pretrain", "--adversary", "idaa", "--dataset", "digits", *TINY],
                           ["--vae"]),
    "unknown method": (lambda t, m: ["pretrain", "--method", "swav", "--dataset", "digits", *TINY],
                       ["unknown method 'swav'"]),
    "unknown adversary": (lambda t, m: ["pretrain", "--adversary", "fgsm", "--dataset", "digits", *TINY],
                          ["unknown adversary 'fgsm'"]),
    "unknown dataset": (lambda t, m: ["pretrain", "--dataset", "mnist", *TINY], ["mnist"]),
    "eps < 0": (lambda t, m: ["pretrain", "--adversary", "clae", "--eps", "-0.1", "--dataset", "digits", *TINY],
                ["--eps"]),
    "batch size 0": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--batch-size", "0"], ["--batch-size"]),
    "batch larger than the dataset": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--batch-size", "999"],
                                      ["larger than the dataset"]),
    "epochs 0": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--epochs", "0"], ["--epochs"]),
    "learning rate NaN": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--lr", "nan"], ["--lr"]),
    "non-numeric flag": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--epochs", "two"], ["--epochs"]),
    "unknown precision": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--precision", "fp8"],
                          ["--precision"]),
    "unavailable device": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--device", "cuda:7"], ["cuda"]),
    "bad method option": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--method", "hcl",
                                        "--method-option", "tau_plus=2"], ["tau_plus"]),
    "unwritable output": (lambda t, m: after((t / "file").write_text("x"),
                          ["pretrain", "--dataset", "digits", *TINY, "--out", str(t / "file" / "run")]), ["file"]),
    "existing run without --resume": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--out",
                                                    str(t / "run")], ["already exists", "--resume"]),
    "--resume and --overwrite together": (lambda t, m: ["pretrain", "--dataset", "digits", *TINY, "--out",
                                                        str(t / "run"), "--resume", "--overwrite"], ["exclude"]),
    "--resume without a checkpoint": (lambda t, m: ["pretrain", "--resume", "--out",
                                                    str(existing_checkpoint_run(t, garbage=False))], ["last.ckpt"]),
    "--resume from a corrupt checkpoint": (lambda t, m: ["pretrain", "--resume", "--out",
                                                         str(existing_checkpoint_run(t, garbage=True))],
                                           ["last.ckpt", "not a readable checkpoint"]),
    "malformed YAML": (lambda t, m: after((t / "bad.yaml").write_text("method: [simclr\n"),
                       ["pretrain", "--config", str(t / "bad.yaml"), *TINY]), ["not valid YAML"]),
    "unknown config key": (lambda t, m: after((t / "k.yaml").write_text("method: simclr\nlearning_rate: 1\n"),
                           ["pretrain", "--config", str(t / "k.yaml"), *TINY]), ["learning_rate"]),
    "missing config file": (lambda t, m: ["pretrain", "--config", str(t / "no.yaml"), *TINY], ["no.yaml"]),
    "eval of a missing checkpoint": (lambda t, m: ["eval", "knn", str(t / "gone.ckpt")], ["gone.ckpt"]),
    "semi with more labels than images": (lambda t, m: ["semi", "--dataset", "digits", "--labels", "5000",
                                                        "--no-progress"], ["--labels"]),
    "vae check against the wrong data": (lambda t, m: ["vae", "check", digits_vae(t, dataset="cifar10"),
                                                       "--dataset", "digits"], ["trained on 'cifar10'"]),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_harmless(case, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: simclr\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 1}\n')
    torch.save({"format": 1}, run / "last.ckpt")
    before = snapshot(run)
    build, words = CASES[case]
    argv = build(tmp_path, monkeypatch)
    if argv[0] in ("pretrain", "semi") and "--out" not in argv:
        argv += ["--out", str(run), "--overwrite"]  # even a requested overwrite must not happen on bad input
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside the parser
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit code {code}: {err}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert snapshot(run) == before, "the existing run folder was modified"


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
