"""Pretraining methods: one file per method over the shared models, each a ``Method`` subclass (the contract
is in ``atst_jax/methods/base.py``). Code outside this package reaches a method only through ``build`` /
``get_class`` and the contract; a method never imports another method."""

from __future__ import annotations

import importlib

from atst_jax.methods.base import Crop, Method  # noqa: F401 (the contract's public names)
from atst_jax.sharding import ConfigError

_METHODS = {
    "aasp": "atst_jax.methods.aasp:Aasp",
    "asit": "atst_jax.methods.asit:Asit",
    "atst_frame": "atst_jax.methods.atst_frame:AtstFrame",
    "atst_clip": "atst_jax.methods.atst_clip:AtstClip",
    "compose": "atst_jax.methods.compose:Compose",
}


def names() -> list[str]:
    return sorted(_METHODS)


def get_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(names())}")
    module, _, cls = _METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build(config) -> Method:
    """The method of a run config (``config.method``), built from its section and checked."""
    method = get_class(config.method)(config)
    method.check()
    return method
