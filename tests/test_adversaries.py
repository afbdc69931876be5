"""Adversaries against their mathematical properties: budgets, decomposition, no leaked gradients, ascent."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from idaa import CLAE, IDAA, LatentNoise, RandomView, build_adversary
from idaa.adversaries.base import project, random_start
from idaa.errors import IdaaError


def anchored_infonce(model, anchors, per_sample=False):
    """Cross-entropy of identifying sample i among the clean anchors (the paper's attack loss)."""
    def loss_fn(images):
        z = F.normalize(model(images, adv=True), dim=1)
        logits = z @ anchors.T / 0.5
        losses = F.cross_entropy(logits, torch.arange(len(z)), reduction="none")
        return losses if per_sample else losses.mean()
    return loss_fn


@pytest.fixture
def setup(tiny_vae, tiny_model):
    tiny_model.eval()
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        anchors = F.normalize(tiny_model(x), dim=1)
    return tiny_vae, tiny_model, x, anchored_infonce(tiny_model, anchors), anchored_infonce(tiny_model, anchors, True)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 5), scale=st.floats(0.1, 10.0))
def test_residual_plus_generated_is_the_input(n, scale):
    from idaa.nets import VAE
    vae = VAE(image_size=32, latent_dim=4, hidden=8).freeze()
    x = torch.randn(n, 3, 32, 32) * scale
    generated, residual = IDAA(vae).decompose(x)
    assert torch.allclose(generated + residual, x, atol=1e-5 * scale)
    assert torch.allclose(generated, vae.decode(vae.encode(x)[0]), atol=1e-5)


@pytest.mark.parametrize("eps", [0.01, 0.15, 1.0])
def test_fgsm_latent_delta_has_linf_norm_exactly_eps(setup, eps):
    vae, _, x, loss_fn, _ = setup
    x_adv, delta = IDAA(vae, eps=eps).attack_latent(x, loss_fn)
    assert torch.allclose(delta.abs().amax(dim=1), torch.full((len(x),), eps))
    assert (delta.abs() - eps).abs().max() < 1e-7, "FGSM moves every latent coordinate by exactly eps"
    generated, residual = IDAA(vae).decompose(x)
    assert torch.allclose(x_adv, residual + vae.decode(vae.encode(x)[0] + delta), atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball(setup, norm):
    vae, _, x, loss_fn, _ = setup
    _, delta = IDAA(vae, eps=0.3, steps=4, step_size=0.2, norm=norm, random_start=True).attack_latent(x, loss_fn)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= 0.3 + 1e-6).all()
    assert size.max() > 0.2, "a 4-step PGD with step 0.2 should reach the boundary"


def test_l2_fgsm_has_l2_norm_eps(setup):
    vae, _, x, loss_fn, _ = setup
    _, delta = IDAA(vae, eps=0.5, norm="l2").attack_latent(x, loss_fn)
    assert torch.allclose(delta.norm(dim=1), torch.full((len(x),), 0.5), atol=1e-5)


def test_random_start_is_inside_the_ball():
    like = torch.zeros(64, 10)
    assert random_start(like, 0.2, "linf").abs().max() <= 0.2
    assert (random_start(like, 0.2, "l2").norm(dim=1) <= 0.2 + 1e-6).all()
    big = torch.randn(5, 10) * 10
    assert torch.allclose(project(big, 1.0, "l2").norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("eps", [0.03, 0.1])
def test_clae_max_pixel_change_is_eps(setup, eps):
    _, _, x, loss_fn, _ = setup
    x_adv = CLAE(eps=eps).perturb(x, loss_fn)
    assert torch.allclose((x_adv - x).abs().amax(dim=(1, 2, 3)), torch.full((len(x),), eps))


@pytest.mark.parametrize("make", [lambda v: IDAA(v, eps=0.05), lambda v: CLAE(eps=0.01),
                                  lambda v: IDAA(v, eps=0.05, steps=3, norm="l2")])
def test_attack_raises_the_loss_for_most_samples(setup, make):
    vae, _, x, loss_fn, per_sample = setup
    adversary = make(vae)
    start = IDAA(vae).decompose(x)[0] + IDAA(vae).decompose(x)[1] if isinstance(adversary, IDAA) else x
    with torch.no_grad():
        before = per_sample(start)
        after = per_sample(adversary.perturb(x, loss_fn))
    assert (after > before).float().mean() >= 0.75, (before, after)
    assert after.mean() > before.mean()


@pytest.mark.parametrize("name", ["idaa", "clae", "idaa-nodecomp", "latent-noise"])
def test_no_parameter_gradients_and_no_history(setup, name):
    vae, model, x, loss_fn, _ = setup
    model.train()  # the training loop attacks with the model in train mode
    adversary = build_adversary(name, vae=vae, eps=0.1)
    x_in = x.clone().requires_grad_(True)  # even a view that carries history must not leak it
    x_adv = adversary.perturb(x_in, loss_fn)
    assert x_adv.grad_fn is None and not x_adv.requires_grad
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in vae.parameters())
    assert x_in.grad is None


def test_idaa_freezes_a_vae_handed_over_in_training_mode(tiny_vae):
    tiny_vae.train().requires_grad_(True)
    IDAA(tiny_vae)
    assert not tiny_vae.training and not any(p.requires_grad for p in tiny_vae.parameters())


def test_zero_eps_gives_back_the_view_and_nodecomp_drops_the_residual(setup):
    vae, _, x, loss_fn, _ = setup
    assert torch.allclose(IDAA(vae, eps=0.0).perturb(x, loss_fn), x, atol=1e-5)
    generated, _ = IDAA(vae).decompose(x)
    nodecomp = build_adversary("idaa-nodecomp", vae=vae, eps=0.0)
    assert torch.allclose(nodecomp.perturb(x, loss_fn), generated, atol=1e-6)


def test_latent_noise_ignores_the_loss_and_moves_by_eps(setup):
    vae, _, x, _, _ = setup

    def forbidden(_):
        raise AssertionError("latent-noise must not evaluate the loss")

    x_adv = LatentNoise(vae, eps=0.2).perturb(x, forbidden)
    assert not torch.allclose(x_adv, x) and torch.isfinite(x_adv).all()


def test_random_view_uses_the_source_batch():
    source = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    view = RandomView(lambda s: s.float() / 255)
    x = torch.zeros(4, 3, 32, 32)
    assert torch.equal(view.perturb(x, lambda _: 0, source=source), source.float() / 255)
    with pytest.raises(IdaaError, match="source"):
        view.perturb(x, lambda _: 0)


def test_factory_and_validation(tiny_vae):
    assert build_adversary("none") is None
    assert build_adversary("idaa", vae=tiny_vae).eps == 0.15
    assert build_adversary("clae").eps == 0.03
    with pytest.raises(IdaaError, match="unknown adversary"):
        build_adversary("fgsm")
    with pytest.raises(IdaaError, match="needs a trained VAE"):
        build_adversary("idaa")
    with pytest.raises(IdaaError, match="eps"):
        IDAA(tiny_vae, eps=-0.1)
    with pytest.raises(IdaaError, match="steps"):
        CLAE(steps=0)
    with pytest.raises(IdaaError, match="norm"):
        CLAE(norm="l1")
    with pytest.raises(IdaaError, match="scalar"):
        CLAE().perturb(torch.randn(2, 3, 8, 8), lambda im: im.flatten(1).sum(1))
