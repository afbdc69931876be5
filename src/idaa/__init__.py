"""idaa: Identity-Disentangled Adversarial Augmentation (ICML 2022) for self-supervised learning."""

from idaa.adversaries import ADVERSARIES, CLAE, IDAA, Adversary, LatentNoise, RandomView, build_adversary
from idaa.errors import IdaaError
from idaa.export import load_backbone, preprocess
from idaa.nets import VAE, MLPHead, build_backbone, load_vae

__version__ = "0.1.0"

__all__ = ["ADVERSARIES", "CLAE", "IDAA", "VAE", "Adversary", "IdaaError", "LatentNoise", "MLPHead", "RandomView",
           "build_adversary", "build_backbone", "load_backbone", "load_vae", "preprocess", "__version__"]
