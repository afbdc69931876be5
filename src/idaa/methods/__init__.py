"""Method registry: `--method NAME` -> class. Adding a method is one file plus one line here."""

from __future__ import annotations

from typing import Any

from idaa.errors import IdaaError
from idaa.methods.base import Method
from idaa.methods.simclr import SimCLR
from idaa.nets.resnet import Backbone

METHODS: dict[str, type[Method]] = {"simclr": SimCLR}


def build_method(name: str, backbone: Backbone, **options: Any) -> Method:
    """Instantiate a registered method around `backbone`; `options` are the method's own settings."""
    if name not in METHODS:
        raise IdaaError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](backbone, **options)
    except TypeError as exc:
        raise IdaaError(f"bad option for method {name!r}: {exc}") from None


__all__ = ["METHODS", "Method", "SimCLR", "build_method"]
