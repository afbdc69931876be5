"""The training step and `idaa pretrain`: pass structure, gradients, every adversary, run folders, resume."""

import json
from pathlib import Path

import pytest
import torch

from idaa.adversaries import build_adversary
from idaa.cli import main
from idaa.methods import build_method
from idaa.nets import build_backbone
from idaa.train.config import read_preset, resolve_config
from idaa.train.step import compute_losses


@pytest.fixture
def method():
    return build_method("simclr", build_backbone("resnet18-cifar", width=4), proj_hidden=32, proj_dim=16).train()


def views(n=8):
    source = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    return torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32), source


def adversary_for(name, vae):
    return build_adversary(name, vae=vae, eps=0.1, view_fn=lambda s: s.float() / 255)


@pytest.mark.parametrize(("name", "forwards"), [("none", 2), ("idaa", 4), ("clae", 4), ("idaa-nodecomp", 4),
                                                ("latent-noise", 3), ("random-view", 3)])
def test_backbone_forwards_per_step(method, tiny_vae, name, forwards):
    calls = []
    method.backbone.register_forward_hook(lambda *_: calls.append(1))
    v1, v2, source = views()
    compute_losses(method, adversary_for(name, tiny_vae), v1, v2, source)
    assert len(calls) == forwards, "clean anchors must be reused: v1, v2, the attack's x~ and x'"


@pytest.mark.parametrize("name", ["none", "idaa", "clae", "idaa-nodecomp", "latent-noise", "random-view"])
def test_one_step_of_each_adversary_moves_the_parameters(method, tiny_vae, name):
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    v1, v2, source = views()
    losses = compute_losses(method, adversary_for(name, tiny_vae), v1, v2, source)
    assert all(p.grad is None for p in method.parameters()), "the attack must not write parameter gradients"
    assert torch.isfinite(losses.total)
    assert (losses.adversarial is None) == (name == "none")
    losses.total.backward()
    optimizer.step()
    moved = {n: not torch.equal(before[n], p) for n, p in method.named_parameters()}
    assert all(flag for n, flag in moved.items() if ".adv." not in n), "every clean-path parameter moves"
    adversarial_bn_moved = [flag for n, flag in moved.items() if ".adv." in n]
    assert all(adversarial_bn_moved) == (name != "none") and any(adversarial_bn_moved) == (name != "none")
    assert all(p.grad is None for p in tiny_vae.parameters())


def test_adversarial_term_uses_the_adversarial_bn(method, tiny_vae):
    duals = [m for m in method.backbone.modules() if hasattr(m, "use_adv")]
    adv_means = [m.adv.running_mean.clone() for m in duals]
    v1, v2, source = views()
    compute_losses(method, adversary_for("idaa", tiny_vae), v1, v2, source)
    assert all(not torch.equal(m.adv.running_mean, before) for m, before in zip(duals, adv_means, strict=True))


def test_symmetric_attack_loss_option(tiny_vae):
    m = build_method("simclr", build_backbone("resnet18-cifar", width=4), attack_loss="symmetric").train()
    v1, v2, source = views()
    assert torch.isfinite(compute_losses(m, adversary_for("idaa", tiny_vae), v1, v2, source).total)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: simclr\n  epochs: [\n")
    with pytest.raises(Exception, match="not valid YAML"):
        read_preset(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("method: simclr\nepochz: 3\n")
    with pytest.raises(Exception, match="unknown config key"):
        read_preset(unknown)
    with pytest.raises(Exception, match="--eps must be"):
        resolve_config(None, {"out": "x", "eps": -1.0})
    with pytest.raises(Exception, match="unknown adversary"):
        resolve_config(None, {"out": "x", "adversary": "pgd"})


TINY = ["--dataset", "digits", "--width", "4", "--batch-size", "64", "--limit", "256", "--no-progress"]


def test_pretrain_run_folder_resume_and_refusal(tmp_path, tiny_vae, capsys):
    from idaa.data.memory import load_dataset
    from idaa.nets import save_vae

    digits = load_dataset("digits")
    vae_path = tmp_path / "vae.pt"
    save_vae(tiny_vae, vae_path, {"dataset": "digits", "mean": list(digits.mean), "std": list(digits.std)})
    out = tmp_path / "run"
    argv = ["pretrain", *TINY, "--adversary", "idaa", "--vae", str(vae_path), "--epochs", "2", "--out", str(out)]
    assert main([*argv, "--max-steps", "4"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1] and records[0]["step"] == 4
    assert 0 <= records[0]["knn_top1"] <= 100 and records[0]["adversarial_loss"] > 0
    assert (out / "last.ckpt").is_file() and (out / "config.yaml").is_file()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert main(["eval", "knn", str(out / "last.ckpt"), "--k", "20"]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    assert json.loads((out / "eval_knn.json").read_text())["k"] == 20


def test_pretrain_refuses_a_vae_from_another_dataset(tmp_path, tiny_vae, capsys):
    from idaa.nets import save_vae

    vae_path = tmp_path / "vae.pt"
    save_vae(tiny_vae, vae_path, {"dataset": "cifar10"})
    code = main(["pretrain", *TINY, "--adversary", "idaa", "--vae", str(vae_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "trained on 'cifar10'" in err and not (tmp_path / "r").exists()


PRESETS = sorted(p for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml")
                 if not p.name.startswith("semi-")
                 and p.parent.name not in ("sweeps", "reproduce"))  # sweep grids and reproduce protocols: not presets


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_resolves(preset):
    cfg = resolve_config(read_preset(preset), {"out": "somewhere"})
    assert cfg.method and cfg.epochs >= 1
    # the method and its options are valid (on a tiny backbone, so the check stays fast)
    build_method(cfg.method, build_backbone("resnet18-cifar", width=4), temperature=cfg.temperature,
                 attack_loss=cfg.attack_loss, **cfg.method_options)
    if preset.parent.name == "paper":  # paper presets name the VAE they were made with
        assert (cfg.adversary in ("idaa", "idaa-nodecomp", "latent-noise")) == (cfg.vae is not None)


def test_paper_presets_match_their_generator():
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "scripts" / "make_presets.py"
    assert subprocess.run([sys.executable, str(script), "--check"]).returncode == 0
    assert len([p for p in PRESETS if p.parent.name == "paper"]) == 72


@pytest.mark.parametrize("preset", sorted((Path(__file__).parents[1] / "configs").rglob("semi-*.yaml")),
                         ids=lambda p: p.name)
def test_every_semi_preset_resolves(preset):
    from idaa.cli import build_parser
    from idaa.semi.cli_args import resolve_semi_config

    args = build_parser().parse_args(["semi", "--config", str(preset), "--out", "somewhere"])
    cfg = resolve_semi_config(args)
    assert cfg.method == "fixmatch" and cfg.labels in (400, 2500, 10000) and cfg.backbone == "wrn28-8"
