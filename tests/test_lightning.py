"""idaa.integrations: the IDAA term in a user's own loop and LightningModule (examples/lightning_simclr.py)."""

import copy
import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from idaa import IDAA, VAE, IdaaError
from idaa.data.memory import load_dataset
from idaa.integrations import AdversarialTerm, adversarial_mode, convert_to_dual_bn
from idaa.losses import nt_xent
from idaa.nets.dual_bn import DualBatchNorm2d

pytest.importorskip("lightning")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_simclr.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lightning_simclr", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def warmed_vae() -> VAE:
    """A small untrained VAE whose BN statistics are warmed on noise (so eval mode is not degenerate)."""
    vae = VAE(image_size=32, latent_dim=16, hidden=16).train()
    with torch.no_grad():
        for _ in range(3):
            vae(torch.randn(16, 3, 32, 32))
    return vae.freeze()


def test_example_trains_a_few_steps(example):
    result = example.main(["--steps", "2", "--width", "4", "--batch-size", "16", "--accelerator", "cpu"])
    assert result["steps"] == 2
    assert all(math.isfinite(v) for v in result.values())
    assert result["loss"] == pytest.approx(result["clean_loss"] + result["adversarial_loss"], rel=1e-5)


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_example_x_adv_equals_idaa_perturb(example):
    data = load_dataset("digits")
    vae = warmed_vae()
    model = example.SimCLR(IDAA(vae, eps=0.15), data.image_size, data.mean, data.std, width=4).train()
    for m in model.modules():  # adversarial twins unlike the main BNs, so the BN routing shows in x'
        if isinstance(m, DualBatchNorm2d):
            nn.init.uniform_(m.adv.weight, 0.5, 1.5)
            nn.init.uniform_(m.adv.bias, -0.5, 0.5)
    reference = copy.deepcopy(model)
    images = data.images[:16]

    torch.manual_seed(7)
    model.training_step([images], 0)
    x_adv = model.idaa_last.x_adv

    torch.manual_seed(7)  # the same views, made by hand, and the adversary called directly
    v1, _v2 = reference.augment(images), reference.augment(images)  # v2 drawn too: the same random stream
    anchors = reference(v1).detach()

    def attack(adv: bool):
        return lambda x: nt_xent(anchors, reference.projector(reference.backbone(x, adv=adv)))

    expected = IDAA(vae, eps=0.15).perturb(v1, attack(True))
    assert torch.equal(x_adv, expected)
    assert not torch.equal(x_adv, IDAA(vae, eps=0.15).perturb(v1, attack(False))), "main BN would give another x'"
    assert not torch.equal(x_adv, v1)


def test_mixin_keeps_the_vae_out_of_the_module(example):
    data = load_dataset("digits")
    model = example.SimCLR(IDAA(warmed_vae()), data.image_size, data.mean, data.std, width=4)
    assert not any(k.startswith(("idaa", "vae")) or ".vae." in k for k in model.state_dict())
    model.train()
    assert not model.idaa_term.adversary.vae.training


def test_mixin_needs_a_lightning_module():
    from idaa.integrations.lightning import IDAAMixin

    class NotLightning(IDAAMixin, nn.Module):
        pass

    with pytest.raises(IdaaError, match="LightningModule"):
        NotLightning().configure_idaa(IDAA(warmed_vae()))


# ----------------------------------------------------------------- plain PyTorch models


def plain_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 8))


def test_convert_to_dual_bn_keeps_the_clean_path_and_adds_a_twin():
    model = plain_model()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))  # some running statistics
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    before, bn = model(x), model[1]
    convert_to_dual_bn(model)
    assert isinstance(model[1], DualBatchNorm2d) and model[1].main is bn and model[1].adv.momentum == 0.01
    assert torch.equal(model(x), before)
    with torch.no_grad():
        model[1].adv.weight.mul_(3)
    with adversarial_mode(model):
        assert not torch.allclose(model(x), before)
    assert torch.equal(model(x), before)


def test_term_on_a_plain_model_warns_and_on_a_converted_one_does_not():
    images = torch.randn(8, 3, 32, 32)
    term = AdversarialTerm(IDAA(warmed_vae(), eps=0.15))
    with pytest.warns(UserWarning, match="dual BN"):
        shared = term(plain_model(), nt_xent, images, images + 0.1)
    assert shared.x_adv.shape == images.shape and shared.total.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = AdversarialTerm(IDAA(warmed_vae()), alpha=0.5)(convert_to_dual_bn(plain_model()), nt_xent, images,
                                                                  images + 0.1)
    assert torch.allclose(losses.total, losses.clean + 0.5 * losses.adversarial)


@pytest.mark.parametrize("kwargs, words", [({"attack_loss": "kl"}, "attack_loss"), ({"alpha": -1.0}, "alpha")])
def test_term_rejects_bad_settings(kwargs, words):
    with pytest.raises(IdaaError, match=words):
        AdversarialTerm(IDAA(warmed_vae()), **kwargs)
