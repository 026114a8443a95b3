"""ATST-Frame with an AaPE-augmented frame stem: the recipe of configs/atst_frame.py unchanged (views, span
masks, BYOL heads, schedules), and the 64 × 4 frame stem gains the aliasing-aware branch of
``atst_jax/models/aape.py``. A 4-frame stride leaves a token-rate modulation Nyquist of π/4 rad/frame
(12.5 Hz at the 10 ms hop), so the SBLU kernels search (π/4, π]. Subbands: the 64 mel bins in 8 groups of 8,
all of them features of every frame token.

This is the composition demo of the parts (stem × masking × predictor × objective): nothing here is
method-specific; any config can set ``model.aape`` the same way. The fusion projection starts at zero, so
step 0 is exactly ATST-Frame's. Use with ``--config configs/atst_frame_aape.py:VARIANT`` (tiny | small | base).
"""

import importlib.util
import os

import ml_collections


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"_atst_configs_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(variant: str = "tiny"):
    from atst_jax.methods.base import dataclass_defaults
    from atst_jax.models.aape import AapeConfig

    c = _load("atst_frame").get_config(variant)
    c.model.aape = ml_collections.ConfigDict(dataclass_defaults(AapeConfig))
    c.model.aape.subband_bins = 8
    if c.variant == "tiny":
        c.model.aape.update(kernels=2, taps=17, hidden=32)
    return c
