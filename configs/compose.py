"""Composed pretraining (atst_jax/methods/compose.py): stem × masking × predictor × objectives from shared parts.

Use with ``--config configs/compose.py:VARIANT[,STEM]``. VARIANT is a size of configs/common.py ``MODELS``
(``tiny`` for tests and CPU runs, ``small``, ``base``, ...); STEM is

- ``frame`` (default): the ATST frame stem, 64-bin ATST log-mel at 16 kHz, 64 × 4 patches, learned positions;
- ``aape``: the same plus the AaPE branch (``model.aape``, models/aape.py);
- ``patch2d``: the 2-D 16 × 16 patch ViT over the 128-bin Kaldi fbank at 32 kHz, a CLS token, 2-D sin-cos
  positions (EAT / AaSP);
- ``patch2d_aape``: the same plus AaPE.

The parts are fields of ``config.compose``, e.g.::

    --config.compose.masking=span --config.compose.predictor=bn_mlp \\
    --config.compose.frame_byol=1 --config.compose.contrastive=0 --config.compose.num_masks=1

(that is ATST-Frame's single-pair loss without augmentation), or ``masking=gmml`` with ``dino=1
reconstruction=2`` (ASiT's terms on one crop). The default: ATST-Frame's frame BYOL objective with AaSP's
inverse-block multi-mask (M = 4) and cross-attention predictor, plus 0.1 × the multi-mask InfoNCE.

The run (batch, LR, schedule, EMA) follows ATST-Frame's recipes for the frame stems and AaSP's (EAT's) for
the 2-D stems; ``tiny`` trains 300 steps of batch 16 on 6 s (frame) / 256-frame (2-D) crops.
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "_atst_configs_common", os.path.join(os.path.dirname(__file__), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

STEMS = ("frame", "aape", "patch2d", "patch2d_aape")
# Frame stems: ATST-Frame's runs (global batch, base LR × batch / 256, warm-up, steps, EMA base).
_FRAME_RUNS = {
    "tiny": (16, 1.6e-3, 30, 300, 0.99),
    "small": (1024, 4e-4, 1950, 58500, 0.997),
}
_FRAME_DEFAULT = (1008, 8e-5, 19900, 398000, 0.9996)
# 2-D stems: EAT / AaSP's (global batch, peak LR, warm-up, steps, EMA base).
_PATCH_RUNS = {"tiny": (16, 1e-4, 30, 300, 0.99)}
_PATCH_DEFAULT = (96, 5e-4, 13_000, 400_000, 0.9998)
_TINY = dict(
    num_masks=4,
    pred_hidden=512,
    pred_dim=64,
    pred_depth=1,
    pred_heads=2,
    proj_hidden=512,
    proj_dim=128,
    top_k_layers=4,
    dino_hidden=256,
    dino_bottleneck=64,
    dino_prototypes=512,
    dino_token_prototypes=128,
    rec_hidden=128,
    rec_bottleneck=64,
)


def _aape():
    from atst_jax.methods.base import dataclass_defaults
    from atst_jax.models.aape import AapeConfig

    return ml_collections.ConfigDict(dataclass_defaults(AapeConfig))


def get_config(spec: str = "tiny"):
    variant, _, stem = (spec or "tiny").partition(",")
    stem = stem or "frame"
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r} in {spec!r}; choose one of {', '.join(STEMS)}")
    c = common.base(variant, "compose")
    tiny = c.variant == "tiny"
    if stem.startswith("patch2d"):
        batch, peak_lr, warmup, steps, ema = _PATCH_RUNS.get(c.variant, _PATCH_DEFAULT)
        common.set_run(
            c, global_batch=batch, base_lr=peak_lr * 256 / batch, warmup_steps=warmup, steps=steps, ema=ema
        )
        frames = 256 if tiny else 1024
        common.eat_vit(c, frames)
        c.compose.update(crop_frames=frames, features="kaldi_fbank128")
    else:
        batch, base_lr, warmup, steps, ema = _FRAME_RUNS.get(c.variant, _FRAME_DEFAULT)
        common.set_run(c, global_batch=batch, base_lr=base_lr, warmup_steps=warmup, steps=steps, ema=ema)
        # 6 s crops for tiny (as ATST-Frame's tiny); the whole 10 s clip otherwise.
        c.compose.crop_frames = 601 if tiny else 1001
        c.compose.mask_block = (5, 1)  # one frequency patch: blocks of 5 time steps
    if stem.endswith("aape"):
        c.model.aape = _aape()
        if stem == "aape":
            c.model.aape.subband_bins = 8
        if tiny:
            c.model.aape.update(kernels=2, taps=17, hidden=32)
    if tiny:
        c.compose.update(_TINY)
    if c.variant == "small" and not stem.startswith("patch2d"):
        c.data.subset = 200_000
    return c
