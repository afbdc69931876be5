"""Method registry: `--method NAME` -> class. Adding a method is one file plus one line here."""

from __future__ import annotations

from typing import Any

from idaa.errors import IdaaError
from idaa.methods.base import Method
from idaa.methods.contrastive import HCL, UEL, ContrastiveMethod, Debiased, Plain
from idaa.methods.momentum import BYOL, MoCo
from idaa.methods.simclr import SimCLR
from idaa.methods.simsiam import SimSiam
from idaa.nets.resnet import Backbone

METHODS: dict[str, type[Method]] = {
    "plain": Plain, "uel": UEL, "simclr": SimCLR, "simsiam": SimSiam, "hcl": HCL, "debiased": Debiased,
    "moco": MoCo, "byol": BYOL,
}


def build_method(name: str, backbone: Backbone, **options: Any) -> Method:
    """Instantiate a registered method around `backbone`; `options` are the method's own settings."""
    if name not in METHODS:
        raise IdaaError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](backbone, **options)
    except (TypeError, ValueError) as exc:
        raise IdaaError(f"bad option for method {name!r}: {exc}") from None


__all__ = ["BYOL", "HCL", "METHODS", "UEL", "ContrastiveMethod", "Debiased", "Method", "MoCo", "Plain", "SimCLR",
           "SimSiam", "build_method"]
