"""ATST-Clip pretraining (spec/methods.md §2); the shared parts are in configs/common.py.

Use with ``--config configs/atst_clip.py:VARIANT``: ``tiny`` (tests, the embedded-data demo), ``small``
(D=384: 9 s anchor / 6 s positive, global batch 1536, base LR 5e-4, 1,300 / 39,100 steps, EMA 0.99, on the
200k-clip AudioSet subset) or ``base`` (D=768: 6 s / 6 s, batch 1536, base LR 2e-4, 15,860 / 318,000 steps,
EMA 0.9995). The encoder is FrameAST with a CLS token (``model.use_cls``); the representation is its output.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_atst_configs_common", os.path.join(os.path.dirname(__file__), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

# global batch, base_lr (×batch/256), warm-up steps, total steps, teacher EMA base, anchor s, positive s
_RUNS = {
    "tiny": (16, 4e-4, 30, 300, 0.99, 4.0, 3.0),
    "small": (1536, 5e-4, 1300, 39100, 0.99, 9.0, 6.0),
    "base": (1536, 2e-4, 15860, 318000, 0.9995, 6.0, 6.0),
    "large": (1536, 2e-4, 15860, 318000, 0.9995, 6.0, 6.0),
    "xl": (1536, 2e-4, 15860, 318000, 0.9995, 6.0, 6.0),
    "xxl": (1536, 2e-4, 15860, 318000, 0.9995, 6.0, 6.0),
}


def get_config(variant: str = "tiny"):
    c = common.base(variant, "atst_clip")
    batch, base_lr, warmup, steps, ema, anchor, positive = _RUNS[c.variant]
    common.set_run(c, global_batch=batch, base_lr=base_lr, warmup_steps=warmup, steps=steps, ema=ema)
    c.model.use_cls = True
    c.atst_clip.anchor_seconds = anchor
    c.atst_clip.positive_seconds = positive
    if c.variant == "tiny":
        c.atst_clip.update(common.TINY_HEADS)
        c.atst_clip.mixup_bank = 0  # mixup within the batch (the official 2,000-crop bank: see atst_frame.py)
    if c.variant == "small":
        c.data.subset = 200_000
    return c
