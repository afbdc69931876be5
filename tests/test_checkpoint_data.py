"""`eval knn`, `eval linear`, `embed` and `diagnose` pick the same data for the same checkpoint and flags."""

from types import SimpleNamespace

import pytest

from idaa.analysis import embed, setup
from idaa.checkpoints import checkpoint_data
from idaa.data import StreamOptions
from idaa.evaluate import knn, protocol

CONFIG = {"dataset": "folder", "data_dir": "/data/run-images", "stream": True, "image_size": 24, "seed": 3,
          "test_fraction": 0.2, "limit": None, "method": "simclr", "adversary": "idaa", "vae": "vae.pt",
          "policy": None}
BLOB = {"config": CONFIG, "data": {"name": "folder", "image_size": 24, "mean": [0.5] * 3, "std": [0.25] * 3}}


class _Picked(Exception):
    """Raised by the stand-in open_dataset once a command has chosen its data."""


def _pick_all(monkeypatch: pytest.MonkeyPatch, dataset: str | None, data_dir: str | None) -> dict[str, tuple]:
    """(name, folder, read options) each command opens for the checkpoint above and these flags."""
    picked: dict[str, tuple] = {}
    method = SimpleNamespace(name="simclr", view_policy="simclr", projector=None)
    for module in (knn, protocol, embed, setup):
        def open_dataset(name, data_dir=None, split="train", *args, options=None, _module=module.__name__, **kw):
            picked[_module] = (name, data_dir, options)
            raise _Picked

        monkeypatch.setattr(module, "open_dataset", open_dataset)
        monkeypatch.setattr(module, "load_method", lambda path, device: (method, BLOB))
    monkeypatch.setattr(setup, "load_vae", lambda path, map_location=None: SimpleNamespace(
        meta={"dataset": "digits"}, image_size=24))
    commands = [lambda: knn.knn_from_checkpoint("run/last.ckpt", dataset, data_dir, device="cpu"),
                lambda: protocol.linear_eval("run/last.ckpt", protocol.LinearEvalOptions(dataset, data_dir,
                                                                                          device="cpu")),
                lambda: embed.embed_map("run/last.ckpt", dataset, data_dir, method="tsne", device="cpu"),
                lambda: setup.load_attack_setup("run/last.ckpt", None, dataset, data_dir, device="cpu")]
    for command in commands:
        with pytest.raises(_Picked):
            command()
    return picked


@pytest.mark.parametrize(("dataset", "data_dir"), [(None, None), ("folder", None), (None, "/other"),
                                                   ("folder", "/other"), ("digits", None)])
def test_every_command_picks_the_same_data(monkeypatch: pytest.MonkeyPatch, dataset: str | None,
                                           data_dir: str | None) -> None:
    picked = _pick_all(monkeypatch, dataset, data_dir)
    assert len(picked) == 4
    expected = checkpoint_data(CONFIG, dataset, data_dir)
    assert list(picked.values()) == [(expected.name, expected.data_dir, expected.options)] * 4


def test_the_run_keeps_its_folder_and_reading_for_its_own_dataset() -> None:
    own = StreamOptions(stream=True, image_size=24, seed=3, test_fraction=0.2)
    for dataset in (None, "folder"):  # naming the run's own dataset keeps its folder
        assert checkpoint_data(CONFIG, dataset) == checkpoint_data(CONFIG)
    assert (checkpoint_data(CONFIG).data_dir, checkpoint_data(CONFIG).options) == ("/data/run-images", own)
    assert checkpoint_data(CONFIG, data_dir="/other").data_dir == "/other"
    other = checkpoint_data(CONFIG, "digits")
    assert (other.name, other.data_dir, other.options, other.own) == ("digits", None, StreamOptions(), False)


def test_a_run_trained_with_skip_is_evaluated_with_skip_unless_told_otherwise() -> None:
    config = {**CONFIG, "bad_images": "skip"}
    assert checkpoint_data(config).options.bad_images == "skip"
    assert checkpoint_data(config, data_dir="/other").options.bad_images == "skip"  # its images, another copy
    assert checkpoint_data(config, sources=StreamOptions(bad_images="error")).options.bad_images == "error"
    assert checkpoint_data(config, "digits").options.bad_images is None  # another dataset: the default, error
    assert checkpoint_data(CONFIG).options.bad_images is None  # a run from before the setting was saved
