"""`--attack-graph shared` (the attack's gradient from the clean loss's own backward), the detached anchor and the
VAE's bf16 precision: the same gradients as the objective written out, the same x' as the clean-graph mode."""

import pytest
import torch

from idaa.adversaries import build_adversary
from idaa.cli import main
from idaa.errors import IdaaError
from idaa.methods import METHODS, Method, build_method
from idaa.nets import VAE, build_backbone
from idaa.train.step import compute_losses, forward_backward

SMALL = {"simclr": {"proj_hidden": 32, "proj_dim": 16},
         "simsiam": {"proj_hidden": 32, "proj_dim": 32, "pred_hidden": 8},
         "byol": {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 8},
         "moco": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 32}}


def fresh(name="simclr", graph="shared", anchor="live", fraction=1.0):
    torch.manual_seed(0)
    method = build_method(name, build_backbone("resnet18-cifar", width=4), **SMALL.get(name, {})).train()
    method.attack_graph, method.adversarial_anchor, method.attack_fraction = graph, anchor, fraction
    return method


def views(n=8):
    generator = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randn(n, 3, 32, 32, generator=generator)


def gradients(method):
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("anchor", ["live", "detached"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("adversary", ["idaa", "clae"])
def test_shared_step_gradients_equal_one_backward_of_the_objective(anchor, fraction, adversary, tiny_vae):
    v1, v2 = views()
    adv = build_adversary(adversary, vae=tiny_vae, eps=0.2)
    method = fresh(anchor=anchor, fraction=fraction)
    losses = forward_backward(method, adv, v1, v2, alpha=0.7)
    shared = gradients(method)

    reference = fresh(anchor=anchor, fraction=fraction)  # L(v1, v2) + alpha * L(v1, x') with the same x'
    clean, state = reference.clean_loss(v1, v2)
    m = losses.x_adv.shape[0]
    assert m == (8 if fraction == 1 else 4)
    z1 = state["z1"][:m] if anchor == "live" else state["z1"][:m].detach()
    total = clean + 0.7 * reference.pair_loss(z1, reference.embed(losses.x_adv, adv=True))
    total.backward()
    expected = gradients(reference)
    assert shared.keys() == expected.keys() and any(".adv." in n for n in shared)
    for name, grad in expected.items():
        torch.testing.assert_close(shared[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(losses.total, total.detach(), atol=1e-6, rtol=1e-6)
    assert not losses.x_adv.requires_grad


def test_the_anchor_matters(tiny_vae):
    # the detached anchor drops exactly the adversarial term's gradient through v1: the two must differ
    v1, v2 = views()
    adv = build_adversary("idaa", vae=tiny_vae, eps=0.2)
    results = []
    for anchor in ("live", "detached"):
        method = fresh(anchor=anchor)
        forward_backward(method, adv, v1, v2)
        results.append(gradients(method))
    main_bn = [n for n in results[0] if ".adv." not in n and "bn" in n]
    assert main_bn and any(not torch.allclose(results[0][n], results[1][n]) for n in main_bn)


@pytest.mark.parametrize("adversary", ["idaa", "clae"])
def test_shared_x_adv_equals_the_clean_graph_one_when_the_attack_loss_is_the_clean_loss(adversary, tiny_vae):
    v1, v2 = views()
    adv = build_adversary(adversary, vae=tiny_vae, eps=0.2)
    outputs = []
    for graph in ("clean", "shared"):
        method = fresh(graph=graph)
        own = method.clean_loss

        def clean_loss(a, b, own=own):
            loss, state = own(a, b)
            return loss, {**state, "clean": loss}

        method.clean_loss = clean_loss
        method.clean_attack_value = lambda state: state["clean"]
        if graph == "clean":
            losses = compute_losses(method, adv, v1, v2)
            losses.total.backward()
        else:
            losses = forward_backward(method, adv, v1, v2)
        outputs.append(losses.x_adv)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)
    assert not torch.equal(outputs[0], v1)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"fixmatch"}))
@pytest.mark.parametrize("adversary", ["idaa", "clae"])
def test_every_method_with_a_clean_graph_runs_shared(name, adversary, tiny_vae):
    v1, v2 = views()
    adv = build_adversary(adversary, vae=tiny_vae, eps=0.2)
    method = fresh(name)
    assert type(method).clean_attack_value is not Method.clean_attack_value  # it has the clean-graph attack
    losses = forward_backward(method, adv, v1, v2)
    assert losses.adversarial is not None and torch.isfinite(losses.total)
    grads = gradients(method)
    assert any(".adv." in n for n in grads), "the adversarial BN was trained"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(p.grad is None for p in tiny_vae.parameters()), "no gradient reaches the frozen VAE"


def test_both_backwards_go_through_the_grad_scaler(tiny_vae):
    v1, v2 = views()
    adv = build_adversary("idaa", vae=tiny_vae, eps=0.2)
    plain = fresh()
    expected = forward_backward(plain, adv, v1, v2)
    scaled = fresh()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    losses = forward_backward(scaled, adv, v1, v2, scaler=scaler)
    torch.testing.assert_close(losses.x_adv, expected.x_adv, atol=1e-6, rtol=0)  # dL/dv1 unscaled for the attack
    for name, grad in gradients(plain).items():
        torch.testing.assert_close(scaled.get_parameter(name).grad / 1024.0, grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("flags", [["--adversary", "idaa", "--attack-steps", "3"],
                                   ["--adversary", "idaa", "--random-start"],
                                   ["--adversary", "idaa-nodecomp"], ["--adversary", "random-view"],
                                   ["--adversary", "latent-noise"]])
def test_shared_graph_refuses_what_cannot_use_it(flags, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--dataset", "folder", "--data-dir", str(tmp_path / "missing"), "--attack-graph", "shared",
            "--vae", str(tmp_path / "missing.pt"), *flags, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--attack-graph shared needs the FGSM idaa or clae adversary" in err and err.count("\n") == 1
    assert not out.exists()  # refused before any data is read or anything written


@pytest.mark.parametrize(("flag", "value"), [("--adversarial-anchor", "frozen"), ("--vae-precision", "fp16")])
def test_bad_anchor_and_vae_precision_are_one_line(flag, value, tmp_path, capsys):
    assert main(["pretrain", "--dataset", "digits", flag, value, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_vae_mean_alone_equals_the_encoders_mu(tiny_vae):
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(tiny_vae.encode_mean(x), tiny_vae.encode(x)[0])


def test_bf16_vae_changes_x_adv_only_slightly_and_is_its_own_setting():
    torch.manual_seed(0)
    vae = VAE(image_size=32, channels=3, latent_dim=32, hidden=16)
    vae.train()
    with torch.no_grad():
        vae(torch.randn(32, 3, 32, 32))
    vae.freeze()
    adv = build_adversary("idaa", vae=vae, eps=0.15)
    x, grad = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    exact = adv.perturb_from_gradient(x, grad)
    vae.set_precision("bf16")
    fast = adv.perturb_from_gradient(x, grad)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    # bf16 keeps 8 bits of mantissa: x' moves by a small fraction of its own spread
    assert (fast - exact).abs().mean() < 0.02 * exact.std()
    with pytest.raises(IdaaError, match="--vae-precision"):
        vae.set_precision("fp8")
