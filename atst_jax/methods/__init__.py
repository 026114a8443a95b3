"""Pretraining methods. Each module provides ``method_config(config)``, ``init(rng, encoder_config,
method_config) -> (student, teacher, extra_state)``, ``loss(student, teacher, batch, key, method_config)
-> (scalar, metrics)`` and ``EMA_COVERS`` (the student sub-modules the teacher tracks). A method never imports
another method."""

import importlib

_METHODS = {
    "atst_frame": "atst_jax.methods.atst_frame",
}


def get_method(name: str):
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_METHODS)}")
    return importlib.import_module(_METHODS[name])
