"""Backbones, dual BN, heads and the VAE: shapes, separate statistics, checkpoint round trips."""

import pytest
import torch

from idaa.errors import IdaaError
from idaa.nets import VAE, DualBatchNorm2d, MLPHead, adversarial_bn, build_backbone, load_vae, save_vae
from idaa.nets.vae import check_vae_fits, vae_loss


@pytest.mark.parametrize(("name", "width", "size", "dim"), [
    ("resnet18-cifar", 8, 32, 64), ("resnet50-cifar", 4, 32, 128), ("resnet18", 8, 64, 64),
    ("resnet50", 4, 64, 128), ("resnet101", 4, 64, 128), ("wrn28-2", None, 32, 128),
])
def test_backbone_shapes(name, width, size, dim):
    net = build_backbone(name, width=width)
    assert net.out_dim == dim
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, dim)
    assert net(torch.randn(2, 3, size, size), adv=True).shape == (2, dim)


def test_cifar_stem_keeps_resolution_imagenet_stem_downsamples():
    cifar, imnet = build_backbone("resnet18-cifar", width=4), build_backbone("resnet18", width=4)
    x = torch.randn(1, 3, 32, 32)
    assert cifar.stem(x).shape[-1] == 32
    assert imnet.stem(x).shape[-1] == 8


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(IdaaError, match="unknown backbone"):
        build_backbone("vgg16")


def test_dual_bn_keeps_separate_running_statistics():
    net = build_backbone("resnet18-cifar", width=4).train()
    duals = [m for m in net.modules() if isinstance(m, DualBatchNorm2d)]
    first = duals[0]
    main_before, adv_before = first.main.running_mean.clone(), first.adv.running_mean.clone()
    net(torch.randn(8, 3, 32, 32) * 3 + 5)  # clean batch: only the main stats move
    assert not torch.equal(first.main.running_mean, main_before)
    assert torch.equal(first.adv.running_mean, adv_before)
    main_mid = first.main.running_mean.clone()
    net(torch.randn(8, 3, 32, 32) - 4, adv=True)  # adversarial batch: only the twin moves
    assert torch.equal(first.main.running_mean, main_mid)
    assert not torch.equal(first.adv.running_mean, adv_before)
    assert first.adv.momentum == 0.01 and first.main.momentum == 0.1
    assert not any(m.use_adv for m in duals), "adv flag must be reset after the forward"


def test_adv_bn_changes_eval_output_when_statistics_differ():
    net = build_backbone("resnet18-cifar", width=4).train()
    for _ in range(5):
        net(torch.randn(8, 3, 32, 32) * 4 + 3, adv=True)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(net(x), net(x, adv=True))
    with adversarial_bn(net):
        assert torch.allclose(net.features(x), net(x, adv=True))


def test_mlp_head():
    head = MLPHead([512, 512, 64])
    assert head(torch.randn(4, 512)).shape == (4, 64)
    assert isinstance(MLPHead([8, 4], last_bn=True)[-1], torch.nn.BatchNorm1d)
    with pytest.raises(ValueError):
        MLPHead([8])


@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_vae_shapes_for_every_resolution(size):
    vae = VAE(image_size=size, latent_dim=8, hidden=16).eval()
    x = torch.randn(2, 3, size, size)
    recon, mu, logvar = vae(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 8)
    assert torch.equal(vae.decode(mu), recon), "eval mode must decode z = mu"


def test_vae_rejects_wrong_input_and_sizes():
    vae = VAE(image_size=32, latent_dim=8, hidden=16)
    with pytest.raises(IdaaError, match="expects"):
        vae.encode(torch.randn(2, 3, 64, 64))
    with pytest.raises(IdaaError, match="halve"):
        VAE(image_size=40 + 2)


def test_vae_loss_matches_naive_formula():
    x, recon = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    total, mse, kl = vae_loss(recon, x, mu, logvar, beta=0.1)
    naive_kl = sum(-0.5 * (1 + logvar[i, j] - mu[i, j] ** 2 - logvar[i, j].exp())
                   for i in range(3) for j in range(5)) / (3 * 5 * 3)
    assert torch.allclose(mse, ((recon - x) ** 2).sum() / x.numel())
    assert torch.allclose(kl, naive_kl)
    assert torch.allclose(total, mse + 0.1 * kl)


def test_freeze_and_checkpoint_round_trip(tmp_path, tiny_vae):
    path = tmp_path / "vae.pt"
    meta = {"dataset": "cifar10", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    save_vae(tiny_vae, path, meta)
    loaded = load_vae(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x)[0], tiny_vae(x)[0])
    check_vae_fits(loaded, "cifar10", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(IdaaError, match="trained on 'cifar10'"):
        check_vae_fits(loaded, "cifar100", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(IdaaError, match="32 px"):
        check_vae_fits(loaded, "cifar10", 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(IdaaError, match="normalisation"):
        check_vae_fits(loaded, "cifar10", 32, (0.4, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_load_vae_errors_are_one_line(tmp_path):
    with pytest.raises(IdaaError, match="does not exist"):
        load_vae(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(IdaaError, match="not a readable") as info:
        load_vae(bad)
    assert "\n" not in str(info.value)
