"""Shared fixtures: tiny nets and data so the suite stays fast on two CPU cores."""

import pytest
import torch

from idaa.nets import VAE, MLPHead, build_backbone


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds overhead, and oversubscribes shared 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_vae() -> VAE:
    """A small randomly-initialised 32 px VAE with BN statistics warmed up on noise, then frozen."""
    vae = VAE(image_size=32, channels=3, latent_dim=16, hidden=16)
    vae.train()
    with torch.no_grad():
        for _ in range(3):
            vae(torch.randn(16, 3, 32, 32))
    return vae.freeze()


class TinyModel(torch.nn.Module):
    """Backbone + projector, with the adversarial BN selectable, like the methods use."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_backbone("resnet18-cifar", width=8)
        self.head = MLPHead([self.backbone.out_dim, 32, 16])

    def forward(self, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
        return self.head(self.backbone(x, adv=adv))


@pytest.fixture
def tiny_model() -> TinyModel:
    return TinyModel()
