"""ATST-Frame pretraining (spec/methods.md §0–§1); the shared parts are in configs/common.py.

Use with ``--config configs/atst_frame.py:VARIANT``; VARIANT is ``tiny`` (tests), ``demo`` (the README's CPU
demo: the tiny model with the recipe below), ``small`` (D=384, official small recipe) or ``base`` (D=768,
official base recipe). Every field can be overridden on the command line, e.g. ``--config.train.steps=20
--config.atst_frame.crop_seconds=6``.

``demo`` is ours, chosen by measurement (BENCHMARKS.md, "The demo recipe: within-clip variance and covariance terms") so that ~4 CPU minutes of
pretraining leave features worth more than the encoder's random initialisation: 1.6 s crops (40 tokens) at
batch 48 — the features, and the chunks inference runs (the trained crop), stay local instead of averaging a
10 s scene — peak LR 2.5e-4, the recipe's views and span masks, and VICReg-style within-clip variance /
covariance terms on the student's tokens (``atst_frame.var_weight`` / ``cov_weight`` / ``var_target``),
without which the features collapse onto one vector per clip within a few hundred steps. It ends with the
probe on the held-out embedded split (``probe.train=embedded``).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_atst_configs_common", os.path.join(os.path.dirname(__file__), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

# Official runs: global batch, base_lr (×batch/256), warm-up steps, total steps, teacher EMA base.
_RUNS = {
    "tiny": (16, 4e-4, 30, 300, 0.99),
    "small": (1024, 4e-4, 1950, 58500, 0.997),  # 200k-clip AudioSet subset
    "base": (1008, 8e-5, 19900, 398000, 0.9996),  # full unbalanced AudioSet
    "large": (1008, 8e-5, 19900, 398000, 0.9996),
    "xl": (1008, 8e-5, 19900, 398000, 0.9996),
    "xxl": (1008, 8e-5, 19900, 398000, 0.9996),
}


def get_config(variant: str = "tiny"):
    if variant == "demo":
        return _demo()
    c = common.base(variant, "atst_frame")
    batch, base_lr, warmup, steps, ema = _RUNS[c.variant]
    common.set_run(c, global_batch=batch, base_lr=base_lr, warmup_steps=warmup, steps=steps, ema=ema)
    if c.variant == "tiny":
        # The official recipe crops 10 s; tiny uses 6 s so the CPU demo and tests stay fast.
        c.atst_frame.crop_seconds = 6.0
        c.atst_frame.update(common.TINY_HEADS)
        # Mixup within the batch: the official bank of 2,000 crops would be 125 tiny batches (300 MB of 6 s
        # crops), more than the rest of the tiny state; tests and the CPU demo keep their in-batch partner.
        c.atst_frame.mixup_bank = 0
    if c.variant == "small":
        c.data.subset = 200_000
    if c.variant != "tiny":
        # The official loss is a mean per GPU (DDP averages them): 4 GPUs for small, 7 for base.
        c.atst_frame.loss_groups = 4 if c.variant == "small" else 7
    return c


def _demo():
    """The CPU demo (README command 1): the tiny model, the recipe in the module docstring."""
    c = get_config("tiny")
    c.variant = "demo"
    # Peak LR 2.5e-4 (= base_lr × 48 / 256), ten times the tiny recipe's.
    common.set_run(c, global_batch=48, base_lr=2.5e-4 * 256 / 48, warmup_steps=30, steps=300, ema=0.99)
    c.atst_frame.update(crop_seconds=1.6, var_weight=1.0, cov_weight=0.1, var_target=0.8)
    c.probe.train = "embedded"  # the held-out embedded probe split, with both baselines, after the last step
    return c
