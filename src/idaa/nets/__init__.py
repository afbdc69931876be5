"""Networks: the identity-disentangling VAE, dual-BN backbones and heads."""

from idaa.nets.dual_bn import DualBatchNorm2d, adversarial_bn
from idaa.nets.heads import MLPHead
from idaa.nets.resnet import BACKBONES, Backbone, ResNet, WideResNet, build_backbone
from idaa.nets.vae import VAE, check_vae_fits, load_vae, save_vae, vae_loss

__all__ = ["BACKBONES", "VAE", "Backbone", "DualBatchNorm2d", "MLPHead", "ResNet", "WideResNet",
           "adversarial_bn", "build_backbone", "check_vae_fits", "load_vae", "save_vae", "vae_loss"]
