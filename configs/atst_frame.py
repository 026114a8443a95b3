"""ATST-Frame pretraining (spec/methods.md §0–§1); the shared parts are in configs/common.py.

Use with ``--config configs/atst_frame.py:VARIANT``; VARIANT is ``tiny`` (tests, the embedded-data demo),
``small`` (D=384, official small recipe) or ``base`` (D=768, official base recipe). Every field can be
overridden on the command line, e.g. ``--config.train.steps=20 --config.atst_frame.crop_seconds=6``.
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
    c = common.base(variant, "atst_frame")
    batch, base_lr, warmup, steps, ema = _RUNS[c.variant]
    common.set_run(c, global_batch=batch, base_lr=base_lr, warmup_steps=warmup, steps=steps, ema=ema)
    if c.variant == "tiny":
        # The official recipe crops 10 s; tiny uses 6 s so the CPU demo and tests stay fast.
        c.atst_frame.crop_seconds = 6.0
        c.atst_frame.update(common.TINY_HEADS)
    if c.variant == "small":
        c.data.subset = 200_000
    return c
