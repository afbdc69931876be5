"""`idaa export --format safetensors|detectron2`: round trip, header metadata, bad files, detectron2 naming."""

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from idaa import IdaaError, build_backbone, load_backbone, preprocess
from idaa.cli import main
from idaa.data.memory import load_dataset
from idaa.export import collapse_dual_bn
from idaa.export_detectron2 import detectron2_checkpoint

META = {"backbone": "resnet50", "in_channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    argv = ["pretrain", "--dataset", "digits", "--width", "4", "--batch-size", "32", "--limit", "64", "--epochs", "1",
            "--knn-every", "0", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out / "last.ckpt"


# ----------------------------------------------------------------- safetensors


def test_safetensors_round_trip_gives_the_pt_features(checkpoint, tmp_path, capsys):
    pt, st = tmp_path / "b.pt", tmp_path / "b.weights"  # no suffix hint: --format decides, the header is sniffed
    assert run(["export", str(checkpoint), "--out", str(pt)], capsys)[0] == 0
    code, out, err = run(["export", str(checkpoint), "--out", str(st), "--format", "safetensors"], capsys)
    assert code == 0, err

    header = safe_open(str(st), framework="pt").metadata()  # any safetensors reader sees the metadata
    assert header["backbone"] == "resnet18-cifar" and header["width"] == "4" and header["image_size"] == "32"
    assert len(json.loads(header["mean"])) == 3 and len(json.loads(header["std"])) == 3
    net_pt, net_st = load_backbone(pt), load_backbone(st)
    assert net_st.meta == net_pt.meta
    x = preprocess(load_dataset("digits", split="test").images[:16], net_st.meta)
    with torch.no_grad():
        assert torch.equal(net_st(x), net_pt(x))
    assert not net_st.training


def test_suffix_picks_the_format(checkpoint, tmp_path, capsys):
    assert run(["export", str(checkpoint), "--out", str(tmp_path / "b.safetensors")], capsys)[0] == 0
    assert (tmp_path / "b.safetensors").read_bytes()[8:9] == b"{"
    assert run(["export", str(checkpoint), "--out", str(tmp_path / "b.pkl")], capsys)[0] == 0
    assert pickle.loads((tmp_path / "b.pkl").read_bytes())["__author__"] == "idaa"


@pytest.mark.parametrize("damage, words", [
    ("drop", ["lacks the tensor", "layers.7.bn2.running_var"]),
    ("reshape", ["stem.0.weight", "shape"]),
    ("extra", ["head.weight", "does not have"]),
    ("no-meta", ["without `idaa export` metadata"]),
    ("truncate", ["not a readable safetensors file"]),
])
def test_damaged_safetensors_is_a_one_line_error(checkpoint, tmp_path, capsys, damage, words):
    good = tmp_path / "good.safetensors"
    assert run(["export", str(checkpoint), "--out", str(good)], capsys)[0] == 0
    state, header = load_file(str(good)), safe_open(str(good), framework="pt").metadata()
    bad = tmp_path / "bad.safetensors"
    if damage == "drop":
        del state["layers.7.bn2.running_var"]
    elif damage == "reshape":
        state["stem.0.weight"] = state["stem.0.weight"][:2].clone()
    elif damage == "extra":
        state["head.weight"] = torch.zeros(3)
    elif damage == "no-meta":
        header = {}
    if damage == "truncate":
        bad.write_bytes(good.read_bytes()[:-100])
    else:
        save_file(state, str(bad), metadata=header)
    with pytest.raises(IdaaError) as info:
        load_backbone(bad)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_exported_files_convert_and_a_missing_tensor_is_exit_2(checkpoint, tmp_path, capsys):
    st = tmp_path / "b.safetensors"
    assert run(["export", str(checkpoint), "--out", str(st)], capsys)[0] == 0
    for source, target in ((st, "from-st.pt"), (tmp_path / "from-st.pt", "from-pt.pkl")):
        code, _, err = run(["export", str(source), "--out", str(tmp_path / target)], capsys)
        assert code == 0, err
    assert run(["export", str(checkpoint), "--out", str(tmp_path / "direct.pkl")], capsys)[0] == 0
    converted, direct = (pickle.loads((tmp_path / n).read_bytes()) for n in ("from-pt.pkl", "direct.pkl"))
    assert converted["model"].keys() == direct["model"].keys()
    assert all(np.array_equal(converted["model"][k], direct["model"][k]) for k in direct["model"])
    assert converted["idaa"]["checkpoint_sha256"] == direct["idaa"]["checkpoint_sha256"]

    state = load_file(str(st))
    del state["layers.3.conv1.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=safe_open(str(st), framework="pt").metadata())
    code, _, err = run(["export", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "lacks the tensor 'layers.3.conv1.weight'" in err and not (tmp_path / "x.pt").exists()


def test_pt_file_with_a_missing_tensor_is_a_one_line_error(checkpoint, tmp_path, capsys):
    path = tmp_path / "b.pt"
    assert run(["export", str(checkpoint), "--out", str(path)], capsys)[0] == 0
    blob = torch.load(path, weights_only=True)
    del blob["state_dict"]["stem.1.weight"]
    torch.save(blob, path)
    with pytest.raises(IdaaError, match="lacks the tensor 'stem.1.weight'"):
        load_backbone(path)


# ----------------------------------------------------------------- detectron2

_NORM = r"norm\.(weight|bias|running_mean|running_var)"
_KEY = re.compile(rf"^(stem\.conv1|res[2-5]\.\d+\.(conv[123]|shortcut))\.(weight|{_NORM})$")


def expected_detectron2_shapes(depth: int, width: int, stem_kernel: int) -> dict[str, tuple[int, ...]]:
    """Shapes by detectron2's build_resnet_backbone rules (RES2_OUT_CHANNELS, WIDTH_PER_GROUP, shortcut iff the
    channel count changes), written out independently of the converter."""
    shapes = {"stem.conv1.weight": (width, 3, stem_kernel, stem_kernel)}
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    basic = depth < 50
    in_ch, out_ch, bottleneck = width, width * (1 if basic else 4), width
    for stage, count in zip(range(2, 6), blocks, strict=True):
        for b in range(count):
            p = f"res{stage}.{b}"
            if basic:
                shapes[f"{p}.conv1.weight"] = (out_ch, in_ch, 3, 3)
                shapes[f"{p}.conv2.weight"] = (out_ch, out_ch, 3, 3)
            else:
                shapes[f"{p}.conv1.weight"] = (bottleneck, in_ch, 1, 1)
                shapes[f"{p}.conv2.weight"] = (bottleneck, bottleneck, 3, 3)
                shapes[f"{p}.conv3.weight"] = (out_ch, bottleneck, 1, 1)
            if in_ch != out_ch:
                shapes[f"{p}.shortcut.weight"] = (out_ch, in_ch, 1, 1)
            in_ch = out_ch
        out_ch, bottleneck = out_ch * 2, bottleneck * 2
    for key, shape in list(shapes.items()):
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[key.replace(".weight", f".norm.{field}")] = (shape[0],)
    return shapes


@pytest.mark.parametrize("name, depth, kernel", [("resnet18", 18, 7), ("resnet18-cifar", 18, 3),
                                                 ("resnet50", 50, 7), ("resnet50-cifar", 50, 3)])
def test_detectron2_names_and_shapes(name, depth, kernel):
    backbone = collapse_dual_bn(build_backbone(name, width=8)).eval()
    for m in backbone.modules():  # distinct statistics, so a swapped tensor would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    payload = detectron2_checkpoint(backbone, {**META, "backbone": name})
    model = payload["model"]
    assert payload["__author__"] == "idaa" and payload["matching_heuristics"] is True
    bad = [key for key in model if not _KEY.match(key)]
    assert not bad, bad
    expected = expected_detectron2_shapes(depth, 8, kernel)
    assert set(model) == set(expected)
    assert all(isinstance(v, np.ndarray) and v.shape == expected[k] for k, v in model.items())
    last = backbone.layers[-1]
    conv = "conv3" if depth >= 50 else "conv2"
    np.testing.assert_array_equal(model[f"res5.{1 if depth == 18 else 2}.{conv}.norm.running_var"],
                                  getattr(last, "bn3" if depth >= 50 else "bn2").running_var.numpy())
    np.testing.assert_array_equal(model["stem.conv1.weight"], backbone.stem[0].weight.detach().numpy())

    config, notes = payload["idaa"]["detectron2_config"], payload["idaa"]["detectron2_notes"]
    assert config["MODEL.RESNETS.DEPTH"] == depth and config["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert config["MODEL.RESNETS.RES2_OUT_CHANNELS"] == (8 if depth == 18 else 32)
    assert config["MODEL.PIXEL_MEAN"] == pytest.approx([123.675, 116.28, 103.53], abs=1e-3)
    assert config["INPUT.FORMAT"] == "RGB"
    assert any("CIFAR stem" in n for n in notes) == (kernel == 3)
    assert any("BasicBlocks" in n for n in notes) == (depth == 18)


def test_detectron2_export_through_the_cli(checkpoint, tmp_path, capsys):
    out = tmp_path / "d2.pkl"
    code, printed, err = run(["export", str(checkpoint), "--out", str(out)], capsys)
    assert code == 0, err
    assert "MODEL.WEIGHTS" in printed and "MODEL.RESNETS.DEPTH 18" in printed and "STRIDE_IN_1X1 False" in printed
    payload = pickle.loads(out.read_bytes())
    assert set(payload["model"]) == set(expected_detectron2_shapes(18, 4, 3))
    assert payload["idaa"]["backbone"] == "resnet18-cifar" and payload["idaa"]["checkpoint_sha256"]
    with pytest.raises(IdaaError, match="detectron2"):
        load_backbone(out)


def test_wide_resnet_cannot_go_to_detectron2(tmp_path, capsys):
    run_dir = tmp_path / "wrn"
    assert main(["pretrain", "--dataset", "digits", "--backbone", "wrn10-1", "--batch-size", "16", "--limit", "32",
                 "--epochs", "1", "--knn-every", "0", "--no-progress", "--out", str(run_dir)]) == 0
    code, _, err = run(["export", str(run_dir / "last.ckpt"), "--out", str(tmp_path / "w.pkl")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "WideResNet" in err, err
    assert not (tmp_path / "w.pkl").exists()


def test_unknown_format_is_rejected(checkpoint, tmp_path, capsys):
    code, _, err = run(["export", str(checkpoint), "--out", str(tmp_path / "b.onnx"), "--format", "onnx"], capsys)
    assert code == 2 and "--format" in err and len(err.strip().splitlines()) == 1
