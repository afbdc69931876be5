"""`idaa vae train` / `idaa vae check` end to end on tiny data, and the one-line error contract."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_run import run
from PIL import Image

from idaa.cli import main
from idaa.nets import load_vae

TINY = ["--latent-dim", "8", "--hidden", "16", "--batch-size", "64", "--limit", "192", "--no-progress"]



def image_folder(root: Path, size: int, n: int = 8) -> Path:
    rng = np.random.default_rng(size)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    assert main(["vae", "train", "--dataset", "digits", "--epochs", "2", "--out", str(out), *TINY]) == 0
    return out


def test_vae_train_writes_a_complete_run_folder(digits_vae):
    records = [json.loads(line) for line in (digits_vae / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("loss", "train_mse", "train_kl", "test_mse", "test_kl", "lr", "images_per_s", "time"):
        assert np.isfinite(records[-1][key])
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-9), "linear decay ends at zero"
    grid = Image.open(digits_vae / "reconstructions.png")
    grid.load()
    assert grid.size[0] > grid.size[1] > 0
    assert (digits_vae / "config.yaml").read_text().startswith("command: vae train")
    vae = load_vae(digits_vae / "vae.pt")
    assert vae.meta["dataset"] == "digits" and vae.meta["image_size"] == 32 and vae.meta["epochs"] == 2
    assert vae.latent_dim == 8


def test_existing_run_is_refused_and_left_untouched(digits_vae, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in digits_vae.iterdir()}
    code, _, err = run(["vae", "train", "--dataset", "digits", "--epochs", "1", "--out", str(digits_vae), *TINY],
                       capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 1 and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in digits_vae.iterdir()} == before


def test_vae_check_refuses_another_dataset_and_size(digits_vae, tmp_path, capsys):
    code, out, _ = run(["vae", "check", str(digits_vae / "vae.pt"), "--dataset", "digits"], capsys)
    assert code == 0 and "fits digits" in out
    folder = image_folder(tmp_path / "imgs32", 32)
    code, _, err = run(["vae", "check", str(digits_vae / "vae.pt"), "--dataset", "folder", "--data-dir", str(folder)],
                       capsys)
    assert code == 2 and "trained on 'digits'" in err and err.count("\n") == 1
    out64 = tmp_path / "vae64"
    folder64 = image_folder(tmp_path / "imgs64", 64)
    assert main(["vae", "train", "--dataset", "folder", "--data-dir", str(folder64), "--out", str(out64),
                 "--epochs", "1", "--latent-dim", "4", "--hidden", "8", "--batch-size", "8", "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = run(["vae", "check", str(out64 / "vae.pt"), "--dataset", "folder", "--data-dir", str(folder)],
                       capsys)
    assert code == 2 and "64 px" in err and "32 px" in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--beta", "-1"], "--beta must be"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--lr", "nan"], "--lr must be"),
    (["--batch-size", "5000"], "larger than the dataset"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
    (["--dataset", "imagenet"], "needs --data-dir"),  # the same --dataset as pretrain: any layout
    (["--device", "cuda:7"], "CUDA is not available"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = ["vae", "train", "--dataset", "digits", "--out", str(out), "--epochs", "1", "--no-progress", *extra]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists(), "a rejected run must not create its folder"


def test_python_dash_m_and_help():
    done = subprocess.run([sys.executable, "-m", "idaa", "vae", "check", "/no/such/vae.pt"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "idaa: error: VAE checkpoint '/no/such/vae.pt' does not exist"


def test_example_simclr_loop_runs_two_steps():
    script = Path(__file__).parents[1] / "examples" / "simclr_with_idaa.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "2", "--batch-size", "16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and all(np.isfinite(losses))
