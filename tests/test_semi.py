"""`idaa semi`: the labelled split, FixMatch's loss terms, EMA, the adversarial strong branch, the CLI contract."""

import json
import math

import pytest
import torch
import yaml
from cli_run import run

from idaa.adversaries import ADVERSARIES, build_adversary
from idaa.data.memory import load_dataset
from idaa.data.views import build_view_policy
from idaa.nets import VAE, build_backbone
from idaa.nets.vae import save_vae
from idaa.semi import (
    EMA,
    Classifier,
    class_balanced_split,
    fixmatch_losses,
    masked_cross_entropy,
    pseudo_labels,
    strong_branch_attack,
)
from idaa.semi.config import SemiConfig
from idaa.semi.loop import build_optimizer

TINY = ["--dataset", "digits", "--limit", "300", "--backbone", "wrn10-1", "--batch-size", "8", "--mu", "2",
        "--no-progress"]



# ---------------------------------------------------------------- split


def test_split_is_seeded_class_balanced_and_disjoint():
    labels = torch.arange(10).repeat_interleave(torch.arange(20, 30))  # unequal class sizes, 245 images
    labelled, unlabelled = class_balanced_split(labels, 40, 10, seed=3)
    again, _ = class_balanced_split(labels, 40, 10, seed=3)
    other, _ = class_balanced_split(labels, 40, 10, seed=4)
    assert torch.equal(labelled, again) and not torch.equal(labelled, other)
    assert torch.bincount(labels[labelled], minlength=10).tolist() == [4] * 10
    assert set(labelled.tolist()).isdisjoint(unlabelled.tolist())
    assert sorted(labelled.tolist() + unlabelled.tolist()) == list(range(len(labels)))


@pytest.mark.parametrize(("n", "message"), [(0, "positive integer"), (5, "fewer than the 10 classes"),
                                            (45, "multiple of the number of classes"), (300, "no unlabelled"),
                                            (240, "class 0 has 20")])
def test_split_rejects_impossible_label_counts(n, message):
    labels = torch.arange(10).repeat_interleave(torch.arange(20, 30))
    with pytest.raises(Exception, match=message):
        class_balanced_split(labels, n, 10, seed=0)


# ---------------------------------------------------------------- loss terms


def naive_masked_ce(logits, targets, mask):
    total = 0.0
    for row, target, keep in zip(logits, targets, mask, strict=True):
        log_norm = torch.log(sum(torch.exp(v) for v in row))
        total = total + keep * (log_norm - row[target])
    return total / len(logits)


def test_masked_cross_entropy_matches_a_naive_loop_in_value_and_gradient():
    logits = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (12,))
    mask = (torch.rand(12) < 0.5).double()
    fast = masked_cross_entropy(logits, targets, mask)
    (grad_fast,) = torch.autograd.grad(fast, logits)
    slow = naive_masked_ce(logits, targets, mask)
    (grad_slow,) = torch.autograd.grad(slow, logits)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
    assert torch.allclose(grad_fast.double(), grad_slow, atol=1e-6)
    assert torch.all(grad_fast[mask == 0] == 0), "unconfident samples get no gradient"


def test_threshold_masks_unconfident_pseudo_labels():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 9.0]])  # top softmax 0.79, 0.36, 0.9998
    targets, mask = pseudo_labels(logits, threshold=0.95)
    assert targets.tolist() == [0, 1, 2] and mask.tolist() == [0.0, 0.0, 1.0]
    top = torch.softmax(logits, 1).max(1).values
    assert mask.tolist() == (top >= 0.95).float().tolist()
    _, exact = pseudo_labels(logits, threshold=float(top[2]))
    assert exact[2] == 1.0, "a confidence equal to the threshold is kept (>=)"
    _, none_kept = pseudo_labels(logits, threshold=1.0 + 1e-9)
    assert none_kept.sum() == 0
    assert masked_cross_entropy(torch.randn(3, 3), targets, none_kept).item() == 0.0


def test_nothing_above_threshold_gives_zero_unlabelled_loss(tiny_classifier):
    x = torch.randn(6, 3, 32, 32)
    losses = fixmatch_losses(tiny_classifier, None, x[:2], torch.tensor([0, 1]), x[2:4], x[4:], threshold=1.0 + 1e-6)
    assert losses.mask.sum() == 0 and losses.unlabelled.item() == 0.0
    assert losses.total.item() == pytest.approx(losses.supervised.item())


def test_ema_update_math():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(4, 3))  # moves the BN running statistics
    ema.update(model)
    for e, s, p in zip(ema.model.parameters(), start, model.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * s + 0.1 * p)
    for e, b in zip(ema.model.buffers(), model.buffers(), strict=True):
        assert torch.equal(e, b)
    ema.update(model)
    for e, s, p in zip(ema.model.parameters(), start, model.parameters(), strict=True):
        assert torch.allclose(e, 0.81 * s + 0.19 * p)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_cosine_schedule_is_fixmatchs():
    cfg = SemiConfig(out="x", labels=10, steps=100)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer, scheduler = build_optimizer(cfg, model)
    for _ in range(60):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.03 * math.cos(7 * math.pi * 60 / 1600))
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in optimizer.param_groups[1]["params"]), "no decay on biases and BN"


# ---------------------------------------------------------------- the adversarial strong branch


@pytest.fixture(scope="module")
def tiny_vae():
    """A random frozen VAE shared by the module (its BN statistics stay at their defaults)."""
    return VAE(image_size=32, channels=3, latent_dim=16, hidden=16).freeze()


@pytest.fixture
def tiny_classifier():
    return Classifier(build_backbone("wrn10-1"), num_classes=4).train()


@pytest.mark.parametrize("name", ["clae", "idaa"])
def test_adversary_raises_the_strong_branch_loss_without_parameter_gradients(tiny_classifier, tiny_vae, name):
    strong = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        targets, mask = pseudo_labels(tiny_classifier(strong), threshold=0.0)
    attack = strong_branch_attack(tiny_classifier, targets, mask)
    adversary = build_adversary(name, vae=tiny_vae, eps=0.05 if name == "clae" else 0.5)
    reference = strong if name == "clae" else adversary.perturb(strong, lambda x: x.sum() * 0)  # x~(0) = R + G
    x_adv = adversary.perturb(strong, attack)
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    with torch.no_grad():
        assert attack(x_adv) > attack(reference) + 1e-4
    assert all(p.grad is None for p in tiny_classifier.parameters())
    assert all(p.grad is None for p in tiny_vae.parameters())


def test_adversarial_prediction_goes_through_the_adversarial_bn(tiny_classifier):
    seen = []
    duals = [m for m in tiny_classifier.backbone.modules() if hasattr(m, "use_adv")]
    duals[0].adv.register_forward_hook(lambda *_: seen.append("adv"))
    duals[0].main.register_forward_hook(lambda *_: seen.append("main"))
    x = torch.randn(6, 3, 32, 32)
    fixmatch_losses(tiny_classifier, build_adversary("clae"), x[:2], torch.tensor([0, 1]), x[2:4], x[4:],
                    threshold=0.0)
    assert seen == ["main", "adv", "adv"], "one clean forward, then the attack's and x' through the adversarial BN"


@pytest.mark.parametrize("name", ADVERSARIES)
def test_two_fixmatch_steps_move_parameters_and_stay_finite(tiny_classifier, tiny_vae, name):
    source = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    weak = build_view_policy("fixmatch-weak", 32, (0.5,) * 3, (0.25,) * 3)
    strong = build_view_policy("fixmatch-strong", 32, (0.5,) * 3, (0.25,) * 3)
    adversary = build_adversary(name, vae=tiny_vae, eps=0.3 if "idaa" in name else None, view_fn=strong)
    cfg = SemiConfig(out="x", labels=4, steps=10, lr=0.05)
    optimizer, scheduler = build_optimizer(cfg, tiny_classifier)
    before = {n: p.detach().clone() for n, p in tiny_classifier.named_parameters()}
    for _ in range(2):
        u = source[4:]
        losses = fixmatch_losses(tiny_classifier, adversary, weak(source[:4]), torch.tensor([0, 1, 2, 3]), weak(u),
                                 strong(u), u, threshold=0.0)
        assert all(p.grad is None for p in tiny_classifier.parameters()), "the attack writes no parameter gradient"
        assert torch.isfinite(losses.total) and losses.mask.sum() == len(u)
        assert (losses.adversarial is None) == (name == "none")
        losses.total.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    moved = {n: not torch.equal(before[n], p) for n, p in tiny_classifier.named_parameters()}
    assert all(flag for n, flag in moved.items() if ".adv." not in n), "every clean-path parameter moves"
    assert all(flag for n, flag in moved.items() if ".adv." in n) == (name != "none")
    assert all(torch.isfinite(p).all() for p in tiny_classifier.parameters())


# ---------------------------------------------------------------- command line


def test_semi_cli_writes_the_run_folder_and_the_baseline_uses_the_same_split(tmp_path, capsys):
    fix, sup = tmp_path / "fixmatch", tmp_path / "supervised"
    common = [*TINY, "--labels", "20", "--steps", "4", "--seed", "1"]
    code, out, err = run(["semi", *common, "--eval-every", "2", "--adversary", "clae", "--out", str(fix)], capsys)
    assert code == 0, err
    assert "EMA test top-1" in out
    code, _, err = run(["semi", *common, "--method", "supervised", "--out", str(sup)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (fix / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(0 <= r["test_top1"] <= 100 and math.isfinite(r["loss"]) for r in records)
    config = yaml.safe_load((fix / "config.yaml").read_text())
    assert config["command"] == "semi" and config["threshold"] == 0.95 and config["ema_decay"] == 0.999
    assert (fix / "last.ckpt").is_file() and not list(fix.glob(".last.ckpt*")), "checkpoint written atomically"
    split = json.loads((fix / "labelled_indices.json").read_text())
    data = load_dataset("digits", split="train").take(300, seed=1)
    assert split["labelled"] == class_balanced_split(data.labels, 20, 10, seed=1)[0].tolist()
    assert json.loads((sup / "labelled_indices.json").read_text())["labelled"] == split["labelled"]
    assert "mask_rate" not in json.loads((sup / "metrics.jsonl").read_text().splitlines()[-1])


def test_resume_continues_exactly(tmp_path, capsys):
    straight, split_run = tmp_path / "straight", tmp_path / "resumed"
    common = [*TINY, "--labels", "20", "--steps", "4"]
    assert run(["semi", *common, "--out", str(straight)], capsys)[0] == 0
    assert run(["semi", *common, "--max-steps", "2", "--out", str(split_run)], capsys)[0] == 0
    assert run(["semi", "--resume", "--out", str(split_run), "--no-progress"], capsys)[0] == 0
    a, b = (torch.load(p / "last.ckpt", weights_only=False) for p in (straight, split_run))
    assert a["step"] == b["step"] == 4
    for key in a["ema"]:
        assert torch.allclose(a["ema"][key].float(), b["ema"][key].float(), atol=1e-5), key
    code, _, err = run(["semi", "--resume", "--out", str(split_run), "--lr", "0.1", "--no-progress"], capsys)
    assert code == 2 and "cannot change --lr" in err


@pytest.fixture(scope="module")
def foreign_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae.pt"
    save_vae(VAE(image_size=32, latent_dim=4, hidden=8), path, {"dataset": "cifar10", "image_size": 32})
    return path


@pytest.mark.parametrize(("extra", "message"), [
    (["--labels", "55"], "multiple of the number of classes"),
    (["--labels", "0"], "--labels must be"),
    (["--labels", "5"], "fewer than the 10 classes"),
    (["--labels", "5000"], "leaves no unlabelled images"),
    (["--labels", "20", "--adversary", "pgd"], "unknown adversary 'pgd'"),
    (["--labels", "20", "--adversary", "idaa"], "needs --vae"),
    (["--labels", "20", "--adversary", "idaa", "--vae", "FOREIGN"], "trained on 'cifar10'"),
    (["--labels", "20", "--method", "supervised", "--adversary", "clae"], "takes no adversary"),
    (["--labels", "20", "--method", "mixmatch"], "unknown semi-supervised method"),
    (["--labels", "20", "--threshold", "1.5"], "--threshold must lie in [0, 1]"),
    (["--labels", "20", "--width", "8"], "--width sets a ResNet"),
    ([], "--labels is required"),
])
def test_bad_inputs_are_one_line_errors_and_create_nothing(tmp_path, capsys, foreign_vae, extra, message):
    out = tmp_path / "run"
    extra = [str(foreign_vae) if e == "FOREIGN" else e for e in extra]
    code, _, err = run(["semi", *TINY, "--steps", "2", "--out", str(out), *extra], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists(), "a rejected run must not create its folder"


def test_existing_run_folder_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run(["semi", *TINY, "--labels", "20", "--steps", "2", "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_sigterm_saves_and_resume_finishes_the_same_run(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import idaa.semi.loop as loop

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = [*TINY, "--labels", "20", "--steps", "6", "--eval-every", "4"]
    assert run(["semi", *common, "--out", str(straight)], capsys)[0] == 0
    real, calls = loop.fixmatch_losses, []

    def signal_during_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "fixmatch_losses", signal_during_step_3)
    code, _, err = run(["semi", *common, "--out", str(stopped)], capsys)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM after step 3" in err
    assert torch.load(stopped / "last.ckpt", weights_only=False)["step"] == 3
    monkeypatch.setattr(loop, "fixmatch_losses", real)
    assert run(["semi", "--resume", "--out", str(stopped), "--no-progress"], capsys)[0] == 0
    a, b = (torch.load(p / "last.ckpt", weights_only=False) for p in (straight, stopped))
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
