"""ASiT pretraining (spec/methods.md §4); the shared parts are in configs/common.py.

Use with ``--config configs/asit.py:VARIANT``: ``tiny`` (tests, the embedded-data demo: small heads, 256-frame
crops, batch 16), ``small`` (ViT-S, D=384) or ``base`` (ViT-B, D=768). ``small`` and ``base`` follow the official run:
4 GPUs × 32 = global batch 128, 100 epochs of AS-2M (≈ 2.0M clips → 15,625 steps per epoch), 10 warm-up
epochs, τ_t warm-up over 30 epochs, base LR 5e-4 (× batch / 256), EMA 0.996, ``torch.optim.AdamW``,
per-parameter clipping at 3.0. The encoder is the 2-D patch ViT on 128-bin Kaldi fbank records: prepare data
with ``python -m atst_jax.data.prepare ... --features kaldi_fbank128`` (the embedded dataset is built with
it automatically).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_atst_configs_common", os.path.join(os.path.dirname(__file__), "common.py")
)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

_EPOCH = 15_625  # steps per AS-2M epoch at batch 128
# global batch, base_lr (×batch/256), warm-up steps, total steps, τ_t warm-up steps
_RUNS = {
    "tiny": (16, 5e-3, 30, 300, 90),
    "small": (128, 5e-4, 10 * _EPOCH, 100 * _EPOCH, 30 * _EPOCH),
    "base": (128, 5e-4, 10 * _EPOCH, 100 * _EPOCH, 30 * _EPOCH),
    "large": (128, 5e-4, 10 * _EPOCH, 100 * _EPOCH, 30 * _EPOCH),
    "xl": (128, 5e-4, 10 * _EPOCH, 100 * _EPOCH, 30 * _EPOCH),
    "xxl": (128, 5e-4, 10 * _EPOCH, 100 * _EPOCH, 30 * _EPOCH),
}
# The recipe's heads are far too big for a CPU test model.
_TINY_HEADS = dict(
    head_hidden=256,
    head_bottleneck=64,
    cls_prototypes=512,
    data_prototypes=128,
    rec_hidden=128,
    rec_bottleneck=64,
)


def get_config(variant: str = "tiny"):
    c = common.base(variant, "asit")
    batch, base_lr, warmup, steps, temp_warmup = _RUNS[c.variant]
    common.set_run(c, global_batch=batch, base_lr=base_lr, warmup_steps=warmup, steps=steps, ema=0.996)
    c.model.update(
        n_mels=128,
        stem="patch2d",
        patch_size=(16, 16),
        num_pos=297,
        use_cls=True,
        qkv_bias=True,
        pos_embed="learned",
    )
    c.optim.update(adamw="torch", eps=1e-8, grad_clip="per_param", clip_norm=3.0, wd_start=0.04, wd_end=0.4)
    c.optim.final_lr = 1e-6
    c.data.update(sample_rate=32000, hop_length=320)
    c.asit.teacher_temp_warmup_steps = temp_warmup
    if c.variant == "tiny":
        c.asit.update(_TINY_HEADS)
        c.asit.crop_frames = 256  # 16 × 8 patches: the recipe's 592-frame crops cost ~3× more on a CPU
    return c
