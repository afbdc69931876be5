"""Every method with every adversary family: two real steps move the weights; momentum state is clean-only."""

import json

import pytest
import torch

from idaa.adversaries import build_adversary
from idaa.cli import main
from idaa.errors import IdaaError
from idaa.methods import METHODS, build_method
from idaa.methods.base import cosine_momentum
from idaa.nets import build_backbone
from idaa.train.step import compute_losses

SMALL = {
    "plain": {"proj_dim": 16}, "uel": {"proj_dim": 16},
    "simclr": {"proj_hidden": 32, "proj_dim": 16},
    "hcl": {"proj_hidden": 32, "proj_dim": 16}, "debiased": {"proj_hidden": 32, "proj_dim": 16},
    "simsiam": {"proj_hidden": 32, "proj_dim": 32, "pred_hidden": 8},
    "moco": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 24},
    "byol": {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
}
MOMENTUM_TWINS = {"moco": ("key_backbone", "key_projector"), "byol": ("target_backbone", "target_projector")}


def small(name, **extra):
    return build_method(name, build_backbone("resnet18-cifar", width=4), **{**SMALL[name], **extra}).train()


def batch(n=8):
    return torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32)


def test_every_registered_method_is_covered():
    assert set(SMALL) == set(METHODS)


@pytest.mark.parametrize("adversary", ["none", "clae", "idaa"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_steps_move_parameters_and_stay_finite(name, adversary, tiny_vae):
    method = small(name)
    adv = None if adversary == "none" else build_adversary(adversary, vae=tiny_vae, eps=0.1)
    optimizer = torch.optim.SGD([g["params"] for g in method.parameter_groups()][0], lr=0.05, momentum=0.9)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    for step in range(2):
        v1, v2 = batch()
        losses = compute_losses(method, adv, v1, v2)
        assert torch.isfinite(losses.total), f"step {step}: {losses}"
        assert (losses.adversarial is None) == (adversary == "none")
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        method.after_step((step + 1) / 2)
    assert all(torch.isfinite(p).all() for p in method.parameters())
    moved = {n for n, p in method.named_parameters() if not torch.equal(before[n], p)}
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    clean_path = {n for n in trainable if ".adv." not in n}
    assert clean_path <= moved, f"did not move: {sorted(clean_path - moved)[:5]}"
    adversarial_bn = {n for n in trainable if ".adv." in n}
    assert (adversarial_bn <= moved) == (adversary != "none") and bool(adversarial_bn & moved) == (adversary != "none")
    for twin in MOMENTUM_TWINS.get(name, ()):
        assert any(n.startswith(twin) for n in moved), "the momentum encoder follows the online one"
    assert all(p.grad is None for p in tiny_vae.parameters())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_attack_raises_the_methods_attack_loss(name, tiny_vae):
    method = small(name)
    v1, v2 = batch(16)
    _, state = method.clean_loss(v1, v2)
    loss_fn = method.attack_loss(state)
    for adv in (build_adversary("clae", eps=0.05), build_adversary("idaa", vae=tiny_vae, eps=0.5)):
        x_adv = adv.perturb(v1, loss_fn)
        assert not x_adv.requires_grad and x_adv.grad_fn is None
        assert loss_fn(x_adv).item() > loss_fn(v1).item(), f"{type(adv).__name__} did not raise the loss"
    assert all(p.grad is None for p in method.parameters())


def test_momentum_targets_are_not_optimised():
    for name, twins in MOMENTUM_TWINS.items():
        method = small(name)
        optimised = {id(p) for g in method.parameter_groups() for p in g["params"]}
        for twin in twins:
            assert all(id(p) not in optimised and not p.requires_grad for p in getattr(method, twin).parameters())


def test_byol_ema_update_and_schedule():
    method = small("byol", base_tau=0.9)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    old = [p.clone() for p in method.target_backbone.parameters()]
    method.after_step(0.0)  # tau = base at the start of training
    for t, o, online in zip(method.target_backbone.parameters(), old, method.backbone.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * o + 0.1 * online)
    assert cosine_momentum(0.9, 0.0) == pytest.approx(0.9)
    assert cosine_momentum(0.9, 0.5) == pytest.approx(0.95)
    assert cosine_momentum(0.9, 1.0) == pytest.approx(1.0)


def test_moco_queue_receives_the_clean_keys_only(tiny_vae):
    method = small("moco")
    v1, v2 = batch(8)
    with torch.no_grad():
        expected = torch.cat([method._key(v1), method._key(v2)])
    queue_before = method.queue.clone()
    losses = compute_losses(method, build_adversary("idaa", vae=tiny_vae, eps=0.3), v1, v2)
    losses.total.backward()
    torch.testing.assert_close(method.queue, queue_before, msg="nothing is enqueued before the step ends")
    method.after_step(0.1)
    torch.testing.assert_close(method.queue[:16], expected)
    torch.testing.assert_close(method.queue[16:], queue_before[16:])
    assert int(method.queue_ptr) == 16
    # wrap-around: 16 more keys into a queue of 24 write slots 16..23 and 0..7
    method.enqueue(torch.ones(16, 16))
    assert int(method.queue_ptr) == 8 and torch.all(method.queue[16:] == 1) and torch.all(method.queue[:8] == 1)
    state = method.state_dict()
    assert "queue" in state and "queue_ptr" in state


def test_method_options_are_checked():
    with pytest.raises(IdaaError, match="tau_plus"):
        small("hcl", tau_plus=1.5)
    with pytest.raises(IdaaError, match="queue_size"):
        small("moco", queue_size=0)
    with pytest.raises(IdaaError, match="bad option"):
        small("uel", nonsense=3)
    with pytest.raises(IdaaError, match="attack-loss"):
        small("simsiam", attack_loss="symmetric")
    with pytest.raises(IdaaError, match="unknown method"):
        build_method("swav", build_backbone("resnet18-cifar", width=4))


@pytest.mark.parametrize("name", ["moco", "simsiam"])
def test_pretrain_cli_runs_the_method(name, tmp_path, capsys):
    out = tmp_path / name
    options = [f"--method-option={k}={v}" for k, v in SMALL[name].items()]
    argv = ["pretrain", "--method", name, "--dataset", "digits", "--width", "4", "--batch-size", "32", "--limit",
            "128", "--epochs", "1", "--adversary", "clae", "--no-progress", "--out", str(out), *options]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 4 and 0 <= record["knn_top1"] <= 100
    assert main(["pretrain", "--method", name, "--method-option", "oops", "--out", str(tmp_path / "x")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err and not (tmp_path / "x").exists()
