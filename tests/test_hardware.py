"""The kind of hardware a run was timed on: recorded with its clocks, named by the report, warned about for bf16."""

import json

import pytest
import torch
from cli_run import run

from idaa import devices
from idaa.analysis.time_to_accuracy import read_metrics
from idaa.data.memory import load_dataset
from idaa.experiments.measure import read_run
from idaa.nets import VAE, save_vae
from idaa.train import pretrain

TINY = ["--dataset", "digits", "--limit", "64", "--width", "4", "--batch-size", "32", "--epochs", "1",
        "--knn-every", "0", "--no-progress"]


@pytest.fixture
def probes(monkeypatch):
    """Set what torch says of the CPU's bf16 units; `hardware` is re-read under the new answer."""
    def answer(avx512_bf16: bool, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        devices.hardware.cache_clear()
    yield answer
    devices.hardware.cache_clear()


@pytest.mark.parametrize(("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True),
                                                           (False, True, True)])
def test_native_bf16_follows_the_cpus_units_and_the_hardware_name_says_it(probes, avx512_bf16, amx, native):
    probes(avx512_bf16, amx)
    assert devices.native_bf16("cpu") is native and devices.native_bf16("cuda") is True
    name = devices.hardware("cpu")
    assert torch.backends.cpu.get_cpu_capability() in name
    assert ("native bf16" in name) is native


def test_every_epoch_record_names_the_hardware_its_clocks_ran_on(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run(["pretrain", *TINY, "--out", str(out)], capsys)
    assert code == 0
    record = read_metrics(out / "metrics.jsonl")[-1]
    assert record["hardware"] == devices.hardware("cpu") == read_run(out, 1).hardware


def _digits_vae(path):
    digits = load_dataset("digits")
    save_vae(VAE(image_size=32, latent_dim=8, hidden=8).freeze(), path,
             {"dataset": "digits", "mean": list(digits.mean), "std": list(digits.std)})
    return str(path)


@pytest.mark.parametrize("native", [False, True])
def test_a_bf16_vae_on_a_cpu_without_native_bf16_is_warned_about_once(tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr(pretrain, "native_bf16", lambda device_type: native)
    argv = ["pretrain", *TINY, "--adversary", "idaa", "--vae", _digits_vae(tmp_path / "vae.pt"),
            "--vae-precision", "bf16", "--out", str(tmp_path / "run")]
    code, _, err = run(argv, capsys)
    assert code == 0
    warnings = [line for line in err.splitlines() if "emulated" in line]
    assert len(warnings) == (0 if native else 1)
    if not native:
        assert warnings[0].startswith("idaa: warning: --vae-precision bf16 on ")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1
