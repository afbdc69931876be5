"""Linear evaluation, feature cache, transfer, export and report (SPEC 4) on tiny data and nets."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run
from PIL import Image

import idaa.evaluate.protocol as protocol
from idaa import load_backbone, preprocess
from idaa.checkpoints import load_method
from idaa.cli import main
from idaa.data.memory import load_dataset
from idaa.data.views import build_view_policy
from idaa.evaluate.features import CACHE_FOLDER
from idaa.evaluate.linear import fit_augmented, holdout_split, select_and_fit, topk_accuracy
from idaa.evaluate.protocol import LinearEvalOptions, linear_eval
from idaa.evaluate.report import build_report


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny SimCLR checkpoint on digits, made through the CLI like a user would."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["pretrain", "--dataset", "digits", "--width", "4", "--batch-size", "32", "--limit", "128", "--epochs", "1",
            "--knn-every", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out / "last.ckpt"


def fresh_run(checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run so each test starts without a feature cache."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.ckpt").write_bytes(checkpoint.read_bytes())
    return run_dir / "last.ckpt"


def blobs(n_per_class: int, classes: int, dim: int, separation: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * separation
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(len(y), dim, generator=gen), y


# ----------------------------------------------------------------- the probe itself


def test_probe_separates_separable_features_and_is_at_chance_on_random_ones():
    x, y = blobs(60, 10, 32, separation=3.0, seed=0)
    xt, yt = blobs(30, 10, 32, separation=3.0, seed=0)  # same centres, fresh noise
    xt = xt + torch.randn(xt.shape, generator=torch.Generator().manual_seed(9))
    probe, record = select_and_fit(x, y, 10, seed=0)
    assert topk_accuracy(probe.logits(xt), yt)[1] > 95
    assert record["final_fit"]["converged"], record["final_fit"]
    assert record["chosen_weight_decay"] in record["grid"] and len(record["val_top1"]) == len(record["grid"])

    noise, labels = torch.randn(1200, 32), torch.randint(0, 10, (1200,))
    probe, _ = select_and_fit(noise, labels, 10, seed=0)
    chance = topk_accuracy(probe.logits(torch.randn(2000, 32)), torch.randint(0, 10, (2000,)))
    assert 5 < chance[1] < 15 and 40 < chance[5] < 60


def test_holdout_split_is_seeded_class_balanced_and_disjoint():
    labels = torch.arange(5).repeat_interleave(40)[torch.randperm(200)]
    fit, val = holdout_split(labels, 0.1, seed=3)
    assert len(set(fit.tolist()) | set(val.tolist())) == 200 and not set(fit.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val], minlength=5).tolist() == [4] * 5
    assert torch.equal(val, holdout_split(labels, 0.1, seed=3)[1])
    assert not torch.equal(val, holdout_split(labels, 0.1, seed=4)[1])


def test_augmented_heads_learn_from_fresh_views():
    x, y = blobs(50, 4, 16, separation=3.0, seed=1)
    _, val_idx = holdout_split(y, 0.1, seed=0)
    seen = []

    def epoch_features(epoch):
        seen.append(epoch)
        return x + 0.3 * torch.randn(x.shape)  # a fresh "view" of every sample each epoch

    probe, record = fit_augmented(epoch_features, y, x[val_idx], val_idx, 4, epochs=3, batch_size=64)
    assert seen == [0, 1, 2] and record["steps"] == 3 * 4
    assert topk_accuracy(probe.logits(x), y)[1] > 95


# ----------------------------------------------------------------- cache, split hygiene, transfer


def count_backbone_forwards(monkeypatch) -> list[int]:
    calls = [0]

    def loading(path, device):
        method, blob = load_method(path, device)
        method.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return method, blob

    monkeypatch.setattr(protocol, "load_method", loading)
    return calls


def test_feature_cache_is_reused_then_invalidated_when_the_checkpoint_changes(checkpoint, tmp_path, monkeypatch):
    ckpt = fresh_run(checkpoint, tmp_path)
    calls = count_backbone_forwards(monkeypatch)
    opts = LinearEvalOptions(progress=False)
    first = linear_eval(str(ckpt), opts)
    assert calls[0] > 0 and not first["times"]["train_cache_hit"]
    assert len(list((ckpt.parent / CACHE_FOLDER).glob("*.pt"))) == 2

    calls[0] = 0
    second = linear_eval(str(ckpt), opts)
    assert calls[0] == 0, "a cached evaluation ran the backbone"
    assert second["times"]["train_cache_hit"] and second["times"]["test_cache_hit"]
    assert second["linear_top1"] == first["linear_top1"]

    blob = torch.load(ckpt, weights_only=False)
    key = next(k for k in blob["method"] if k.endswith("conv1.weight"))
    blob["method"][key] = blob["method"][key] * 1.5
    torch.save(blob, ckpt)
    calls[0] = 0
    third = linear_eval(str(ckpt), opts)
    assert calls[0] > 0 and not third["times"]["train_cache_hit"] and not third["times"]["test_cache_hit"]
    assert third["checkpoint_sha256"] != first["checkpoint_sha256"]

    calls[0] = 0
    linear_eval(str(ckpt), LinearEvalOptions(progress=False, limit=300))  # another subset is another key
    assert calls[0] > 0


def test_selection_sees_training_features_only_and_the_test_set_once(checkpoint, tmp_path, monkeypatch):
    ckpt = fresh_run(checkpoint, tmp_path)
    events, splits = [], {}
    real_select, real_get = protocol.select_and_fit, protocol.FeatureCache.get

    def get(self, *, data, split, **kwargs):
        events.append(f"features:{split}")
        out = real_get(self, data=data, split=split, **kwargs)
        splits[split] = out.features
        return out

    def select(x, y, num_classes, seed=0):
        events.append("select")
        assert x is splits["train"] and len(y) == len(x)
        fit, val = holdout_split(y, 0.1, seed)
        assert int(val.max()) < len(x) and not set(fit.tolist()) & set(val.tolist())
        return real_select(x, y, num_classes, seed)

    monkeypatch.setattr(protocol.FeatureCache, "get", get)
    monkeypatch.setattr(protocol, "select_and_fit", select)
    result = linear_eval(str(ckpt), LinearEvalOptions(progress=False, seed=5))
    assert events == ["features:train", "select", "features:test"]
    train = load_dataset("digits", split="train")
    assert result["train_images"] == len(train) and result["protocol"]["split_seed"] == 5
    assert result["protocol"]["fit_images"] + result["protocol"]["val_images"] == len(train)
    assert 20 < result["linear_top1"] <= result["linear_top5"] <= 100  # a trained net beats 10% chance


def digits_folder(root: Path, size: int = 16, classes: int = 3, train: int = 10, test: int = 5) -> Path:
    """A `folder` dataset (train/<class>/, test/<class>/) of real digits at another resolution."""
    data = load_dataset("digits", split="train")
    for c in range(classes):
        members = (data.labels == c).nonzero().squeeze(1)[: train + test]
        for i, idx in enumerate(members.tolist()):
            split = "train" if i < train else "test"
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            pixels = data.images[idx].permute(1, 2, 0).numpy()
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(root / split / str(c) / f"{i}.png")
    return root


def test_transfer_end_to_end_to_digits_and_to_a_resized_folder(checkpoint, tmp_path, capsys):
    ckpt = fresh_run(checkpoint, tmp_path)
    code, out, err = run(["eval", "transfer", str(ckpt), "--dataset", "digits", "--no-progress"], capsys)
    assert code == 0, err
    record = json.loads((ckpt.parent / "eval_transfer_digits.json").read_text())
    assert record["kind"] == "transfer" and record["linear_top1"] > 20 and "top-1" in out

    folder = digits_folder(tmp_path / "small_digits")
    code, _, err = run(["eval", "transfer", str(ckpt), "--dataset", "folder", "--data-dir", str(folder),
                        "--no-progress"], capsys)
    assert code == 0, err
    record = json.loads((ckpt.parent / "eval_transfer_small_digits.json").read_text())
    assert record["resized"] and record["train_images"] == 30 and record["num_classes"] == 3
    assert 0 <= record["linear_top1"] <= record["linear_top5"] == 100  # top-5 of 3 classes is always right


def test_augmented_protocol_keeps_no_train_cache(checkpoint, tmp_path, capsys):
    ckpt = fresh_run(checkpoint, tmp_path)
    code, _, err = run(["eval", "linear", str(ckpt), "--augment", "--epochs", "2", "--limit", "200",
                        "--no-progress", "--out", str(tmp_path / "aug.json")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "aug.json").read_text())
    assert record["augment"] and record["protocol"]["epochs"] == 2 and record["train_images"] == 200
    cached = [p.name for p in (ckpt.parent / CACHE_FOLDER).glob("*.pt")]
    assert cached and all(".test" in name for name in cached), cached


# ----------------------------------------------------------------- export


def test_export_round_trip_gives_the_checkpoints_features(checkpoint, tmp_path, capsys):
    out = tmp_path / "backbone.pt"
    code, _, err = run(["export", str(checkpoint), "--out", str(out)], capsys)
    assert code == 0, err
    state = torch.load(out, weights_only=True)["state_dict"]
    assert not any(".adv." in k or ".main." in k for k in state), "dual-BN twins must be gone"

    net = load_backbone(out)
    method, blob = load_method(checkpoint)
    images = load_dataset("digits", split="test").images[:16]
    view = build_view_policy("eval", 32, blob["data"]["mean"], blob["data"]["std"])
    x = preprocess(images, net.meta)
    assert torch.allclose(x, view(images), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(net(x), method.backbone(x), atol=1e-5)
    assert net.meta["out_dim"] == net(x).shape[1] and not net.training

    code, _, err = run(["export", str(checkpoint), "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err


# ----------------------------------------------------------------- report


def fake_result(folder: Path, name: str, seed: int, **values) -> None:
    config = {"method": "simclr", "adversary": values.pop("adversary", "idaa"), "dataset": "cifar10", "seed": seed,
              "out": str(folder), "eps": 0.1, "epochs": 15}
    folder.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(folder / "last.ckpt"), "checkpoint_sha256": f"{folder.name}", "config": config,
              **values}
    (folder / name).write_text(json.dumps(record))


def test_report_averages_seeds_in_markdown_and_csv(tmp_path, capsys):
    for seed, (knn, top1, top5) in enumerate([(40.0, 50.0, 90.0), (42.0, 54.0, 92.0)]):
        run_dir = tmp_path / f"idaa-s{seed}"
        fake_result(run_dir, "eval_knn.json", seed, kind="knn", knn_top1=knn)
        fake_result(run_dir, "eval.json", seed, kind="linear", linear_top1=top1, linear_top5=top5)
        fake_result(run_dir, "eval_transfer_digits.json", seed, kind="transfer", transfer_name="digits",
                    linear_top1=70.0 + seed)
    fake_result(tmp_path / "none-s0", "eval.json", 0, adversary="none", kind="linear", linear_top1=45.0,
                linear_top5=88.0)

    markdown = build_report([str(tmp_path)], "markdown")
    lines = markdown.splitlines()
    assert "transfer digits top-1" in lines[0] and len(lines) == 4
    assert lines[2].startswith("| simclr + none | cifar10 | 1 |") and "45.00" in lines[2]
    assert lines[3].startswith("| simclr + idaa | cifar10 | 2 | 41.00 ± 1.41 | 52.00 ± 2.83 | 91.00 ± 1.41 |")
    assert "70.50 ± 0.71" in lines[3]

    rows = list(csv.DictReader(io.StringIO(build_report([str(tmp_path)], "csv"))))
    idaa_row = next(r for r in rows if r["adversary"] == "idaa")
    assert idaa_row["seeds"] == "2" and float(idaa_row["linear_top1_mean"]) == 52.0
    assert float(idaa_row["linear_top1_std"]) == pytest.approx(np.sqrt(8), abs=1e-5)
    none_row = next(r for r in rows if r["adversary"] == "none")
    assert none_row["linear_top1_std"] == "" and none_row["knn_top1_mean"] == ""

    code, out, err = run(["report", str(tmp_path), "--format", "csv", "--out", str(tmp_path / "t.csv")], capsys)
    assert code == 0, err
    assert (tmp_path / "t.csv").read_text().startswith("label,method,adversary,dataset,seeds")


def test_report_separates_runs_that_differ_in_more_than_the_seed(tmp_path):
    fake_result(tmp_path / "a", "eval.json", 0, kind="linear", linear_top1=50.0, linear_top5=90.0)
    fake_result(tmp_path / "b", "eval.json", 1, kind="linear", linear_top1=52.0, linear_top5=90.0)
    record = json.loads((tmp_path / "b" / "eval.json").read_text())
    record["config"]["eps"] = 0.2
    (tmp_path / "b" / "eval.json").write_text(json.dumps(record))
    lines = build_report([str(tmp_path)]).splitlines()
    assert len(lines) == 4 and any("eps=0.2" in line for line in lines) and "±" not in "".join(lines[2:])


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, words", [
    (["eval", "linear", "{tmp}/gone.ckpt"], ["gone.ckpt"]),
    (["eval", "transfer", "{tmp}/gone.ckpt", "--dataset", "digits"], ["gone.ckpt"]),
    (["eval", "transfer", "{ckpt}"], ["--dataset"]),
    (["eval", "linear", "{ckpt}", "--features", "logits"], ["--features"]),
    (["eval", "knn", "{ckpt}", "--features", "logits"], ["--features"]),
    (["eval", "linear", "{ckpt}", "--limit", "0"], ["--limit"]),
    (["eval", "linear", "{ckpt}", "--batch-size", "-3"], ["--batch-size"]),
    (["eval", "linear", "{ckpt}", "--epochs", "3"], ["--augment"]),
    (["eval", "linear", "{ckpt}", "--augment", "--epochs", "0"], ["--epochs"]),
    (["eval", "linear", "{ckpt}", "--limit", "ten"], ["--limit"]),
    (["eval", "linear", "{ckpt}", "--dataset", "mnist"], ["mnist"]),
    (["eval", "linear", "{ckpt}", "--device", "cuda:7"], ["cuda"]),
    (["eval", "transfer", "{ckpt}", "--dataset", "folder", "--data-dir", "{tmp}/nowhere"], ["nowhere"]),
    (["export", "{tmp}/gone.ckpt", "--out", "{tmp}/b.pt"], ["gone.ckpt"]),
    (["export", "{ckpt}"], ["--out"]),
    (["report", "{tmp}/nothing-here"], ["nothing-here"]),
    (["report", "{tmp}"], ["no eval.json"]),
    (["report", "{tmp}/bad.json"], ["bad.json"]),
    (["report", "{tmp}", "--format", "xlsx"], ["--format"]),
])
def test_bad_input_is_one_line_exit_2(argv, words, checkpoint, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    argv = [a.format(tmp=tmp_path / "empty" if a == "{tmp}" else tmp_path, ckpt=checkpoint) for a in argv]
    (tmp_path / "empty").mkdir()
    code, _, err = run(argv, capsys)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
