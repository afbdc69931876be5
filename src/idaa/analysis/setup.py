"""What the diagnostic and the gallery share: a model to attack, its data and views, the VAE and the adversaries.

The model comes from a pretraining checkpoint (or is a randomly initialised SimCLR); the adversaries are built
with the budget the checkpoint was trained with when it used that adversary, else the SPEC defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from idaa.adversaries import Adversary, build_adversary
from idaa.checkpoints import CheckpointData, build_from_config, checkpoint_data, load_method
from idaa.data.options import StreamOptions, checkpoint_options
from idaa.data.protocol import Source
from idaa.data.sources import open_dataset
from idaa.data.unreadable import readable
from idaa.data.views import ViewPolicy, build_view_policy
from idaa.devices import resolve_device
from idaa.errors import IdaaError
from idaa.methods import Method
from idaa.nets.dual_bn import DualBatchNorm2d
from idaa.nets.vae import VAE, check_vae_fits, load_vae

DEFAULT_EPS = {"clae": 0.03, "idaa": 0.15}  # SPEC 1
RANDOM_INIT = {"method": "simclr", "backbone": "resnet18-cifar", "width": 16, "temperature": None,
               "attack_loss": "anchored", "batch_size": 64, "adversary": "none"}


@dataclass
class AttackSetup:
    """A model in the state to attack, the images, their view policy and the two adversaries (CLAE, IDAA)."""

    method: Method
    config: dict[str, Any]
    data: Source
    views: ViewPolicy
    vae: VAE
    adversaries: dict[str, Adversary]
    device: torch.device
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def eps(self) -> dict[str, float]:
        return {name: float(adv.eps) for name, adv in self.adversaries.items()}  # type: ignore[attr-defined]


def loss_embedding(method: Method, x: torch.Tensor, adv: bool = False) -> torch.Tensor:
    """The L2-normalised embedding the loss is applied to: projector output (contrastive: `method.embed`)."""
    if hasattr(method, "embed"):
        z = method.embed(x, adv=adv)
    elif hasattr(method, "projector"):
        z = method.projector(method.backbone(x, adv=adv))
    else:
        z = method.backbone(x, adv=adv)
    return F.normalize(z.float(), dim=1)


def share_main_bn(method: Method) -> int:
    """Copy every main BN into its adversarial twin (for runs that never trained the twin); returns the count."""
    duals = [m for m in method.modules() if isinstance(m, DualBatchNorm2d)]
    for m in duals:
        m.adv.load_state_dict(m.main.state_dict())
    return len(duals)


def _budget(name: str, given: float | None, cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """eps (and PGD settings) for one adversary: given > the run's own when it trained with it > SPEC default."""
    trained_with = cfg.get("adversary") == name
    attack = {"steps": 1, "step_size": None, "norm": "linf", "random_start": False}
    if trained_with:
        attack = {"steps": cfg.get("attack_steps", 1), "step_size": cfg.get("attack_step_size"),
                  "norm": cfg.get("attack_norm", "linf"), "random_start": bool(cfg.get("random_start", False))}
    if given is not None:
        return float(given), attack
    if trained_with and cfg.get("eps") is not None:
        return float(cfg["eps"]), attack
    return DEFAULT_EPS[name], attack


def load_attack_setup(checkpoint: str | None, vae_path: str | None, dataset: str | None = None,
                      data_dir: str | None = None, split: str = "train", eps_idaa: float | None = None,
                      eps_clae: float | None = None, device: str = "auto", seed: int = 0,
                      sources: StreamOptions | None = None) -> AttackSetup:
    """Load everything an attack on real data needs; every mismatch (data, image size, VAE) is a one-line error."""
    dev = resolve_device(device)
    notes: list[str] = []
    if checkpoint is not None:
        method, blob = load_method(checkpoint, dev)
        cfg, source = dict(blob["config"]), str(checkpoint)
        if cfg.get("adversary", "none") == "none":
            share_main_bn(method)
            notes.append("the run trained no adversarial BN: the main BN also serves adversarial inputs")
    else:
        torch.manual_seed(seed)
        cfg, source = dict(RANDOM_INIT), "a randomly initialised SimCLR (no checkpoint given)"
        method = build_from_config(cfg).to(dev).train()  # batch statistics, as at the first training step
        notes.append("randomly initialised SimCLR (ResNet-18 width 16) in train mode: BN uses batch statistics")
    if vae_path is None:
        vae_path = cfg.get("vae")
        if vae_path is None:
            raise IdaaError("the IDAA attack needs a VAE: pass --vae VAE.pt (make one with 'idaa vae train')")
    vae = load_vae(vae_path, map_location=dev)
    chosen = checkpoint_data(cfg, dataset, data_dir, sources) if checkpoint is not None else \
        _vae_data(vae.meta, dataset, data_dir, sources)
    name = chosen.name
    size = blob["data"]["image_size"] if checkpoint is not None else vae.image_size  # crop size if streamed
    data = open_dataset(name, chosen.data_dir, split, options=chosen.options, default_size=size)
    if checkpoint is not None and split == "train" and chosen.own and cfg.get("limit"):
        data = data.take(min(cfg["limit"], len(data)), seed=cfg.get("seed", 0))  # the run's own training subset
    data = readable(data)  # under --bad-images skip without the files that do not decode
    check_vae_fits(vae, data.name, data.image_size, data.mean, data.std)
    if checkpoint is not None and blob.get("data", {}).get("image_size", data.image_size) != data.image_size:
        raise IdaaError(f"checkpoint was trained on {blob['data']['image_size']} px images, '{name}' has "
                        f"{data.image_size} px")
    try:
        views = build_view_policy(cfg.get("policy") or method.view_policy, data.image_size, data.mean, data.std)
    except ValueError as exc:
        raise IdaaError(str(exc)) from None
    adversaries: dict[str, Adversary] = {}
    for adv_name, given in (("clae", eps_clae), ("idaa", eps_idaa)):
        eps, attack = _budget(adv_name, given, cfg)
        built = build_adversary(adv_name, vae=vae, eps=eps, **attack)
        assert built is not None  # only 'none' builds None
        adversaries[adv_name] = built.to(dev)
    return AttackSetup(method, cfg, data, views.to(dev), vae, adversaries, dev, source, notes)


def _vae_data(meta: dict[str, Any], dataset: str | None, data_dir: str | None,
              sources: StreamOptions | None) -> CheckpointData:
    """Without a checkpoint: --dataset, else the data the VAE was trained on (its folder when it is the same)."""
    name = dataset or meta.get("dataset")
    if name is None:
        raise IdaaError("no dataset given and the VAE does not say what it was trained on: pass --dataset")
    folder = data_dir or (meta.get("data_dir") if name == meta.get("dataset") else None)
    return CheckpointData(name, folder, checkpoint_options({}, False, sources), False)


def attacked_views(setup: AttackSetup, images: torch.Tensor, on: str = "v1") -> dict[str, torch.Tensor]:
    """One batch: the anchor view v1, the random positive v2, and x' from each adversary.

    The attack is the one training runs: the method's own `attack_loss` from the clean pass on (v1, v2).
    `on="v1"` perturbs the anchor's own view, as training does (the positive of L(v1, x')); `on="v2"` perturbs
    the second random view, so random augmentation is the eps = 0 case of each attack (the paper's Fig. 1).
    """
    if on not in ("v1", "v2"):
        raise IdaaError(f"the attack view must be v1 or v2, got {on!r}")
    images = images.to(setup.device)
    v1, v2 = setup.views(images), setup.views(images)
    with torch.no_grad():
        _, state = setup.method.clean_loss(v1, v2)
    loss_fn = setup.method.attack_loss(state)
    target = v1 if on == "v1" else v2
    out = {"anchor": v1, "random": v2}
    for name, adversary in setup.adversaries.items():
        out[name] = adversary.perturb(target, loss_fn, source=images)
    return out
