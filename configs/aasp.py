"""AaSP pretraining (spec/methods.md §5; a reconstruction, see atst_jax/methods/aasp.py); the shared parts are
in configs/common.py.

Use with ``--config configs/aasp.py:VARIANT``: ``tiny`` (tests, the embedded-data demo: 4 masked copies,
256-frame crops, a 1-block predictor), ``small`` (ViT-S, D=384) or ``base`` (ViT-B, D=768). ``small`` and
``base`` take EAT's settings (its pretraining config and the fairseq defaults it leaves in place), the
closest public anchor: 1024-frame crops of EAT's 128-bin Kaldi fbank at 16 kHz (``kaldi_fbank128_16k``; a
10 s clip's 998 frames padded as EAT pads, ``aasp.pad_is_signal``), 16 masked copies at 80 %, global batch
48 (EAT: 12 clips per GPU × 4 GPUs), peak LR 5e-4 after 53,333 warm-up steps of 400k, cosine to 0, Adam
with decoupled weight decay, β (0.9, 0.95), eps 1e-8, constant weight decay 0.05, global gradient-norm
clipping at 4, no drop-path, teacher momentum 0.9998 → 0.99999 over the first 100k steps. The encoder is
the 2-D 16×16 patch ViT with a CLS token, fixed 2-D sin-cos positions, qkv bias and the AaPE branch
(``model.aape``, every field a knob: ``--config.model.aape.kernels=8``). Its trunk is EAT's
(``model.norm_style="post"``: a LayerNorm on the embedded patches, post-norm blocks, no final norm);
``--config.model.norm_style=pre`` is this project's pre-norm ViT with a final LayerNorm (a run's saved config
says which). A run saved with ``norm_style=pre``, ``kaldi_fbank128`` and masked padding resumes with
``--config.model.norm_style=pre --config.aasp.features=kaldi_fbank128 --config.aasp.pad_is_signal=false``.
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "_atst_configs_common", os.path.join(os.path.dirname(__file__), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

# global batch, peak LR, warm-up steps, total steps
_RUNS = {
    "tiny": (16, 1e-3, 20, 300),
    "small": (48, 5e-4, 53_333, 400_000),
    "base": (48, 5e-4, 53_333, 400_000),
    "large": (48, 5e-4, 53_333, 400_000),
    "xl": (48, 5e-4, 53_333, 400_000),
    "xxl": (48, 5e-4, 53_333, 400_000),
}


def aape_defaults() -> ml_collections.ConfigDict:
    from atst_jax.methods.base import dataclass_defaults
    from atst_jax.models.aape import AapeConfig

    return ml_collections.ConfigDict(dataclass_defaults(AapeConfig))


def get_config(variant: str = "tiny"):
    c = common.base(variant, "aasp")
    batch, peak_lr, warmup, steps = _RUNS[c.variant]
    # base_lr is scaled by batch / 256: state the peak.
    common.set_run(
        c, global_batch=batch, base_lr=peak_lr * 256 / batch, warmup_steps=warmup, steps=steps, ema=0.9998
    )
    frames = c.aasp.crop_frames if c.variant != "tiny" else 256
    common.eat_vit(c, frames)
    # EAT: no drop-path (start/end_drop_path_rate 0), fairseq Adam's eps 1e-8, cosine to min_lr 0.
    c.model.drop_path = 0.0
    c.optim.update(eps=1e-8, final_lr=0.0)
    c.model.aape = aape_defaults()
    # post: EAT's trunk (embedding LayerNorm, post-norm blocks, no final norm); pre: this project's pre-norm
    # blocks + final LayerNorm (what other methods' 2-D encoders use).
    c.model.norm_style = "post"
    if c.variant == "tiny":
        # CPU-sized: 16 × 8 tokens, 4 copies, a 1-block predictor, a teacher that moves within 300 steps.
        c.aasp.update(crop_frames=frames, num_masks=4, pred_dim=64, pred_depth=1, pred_heads=2, ema_end=0.999)
        c.aasp.ema_anneal_steps = steps
        c.optim.ema = 0.99
        c.model.aape.update(kernels=2, taps=17, hidden=32)
    return c
