"""The parts every method's config shares: model sizes, optimizer, train loop, data, mesh, sharding rules.

Method config files (``configs/<method>.py``) call ``base(variant, method)`` and state only what differs.
The method's own section (``config.<method>``) starts from the method's config dataclass, the single source
of its defaults.
"""

import ml_collections

from atst_jax.models.collapse import HEALTH_MIN

# width, depth, heads (tiny is ours, for tests and the CPU demo)
MODELS = {
    "tiny": (128, 4, 2),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    # Beyond the recipes, for scaling studies (python -m atst_jax.sweep / atst_jax.scaling): 64-wide heads.
    "xl": (1280, 24, 20),
    "xxl": (1280, 32, 20),
}
# Projection/prediction heads of tiny (the recipes' 4096 → 256 is far too big for a CPU test model).
TINY_HEADS = {"proj_hidden": 512, "proj_dim": 128}


def base(variant: str, method: str) -> ml_collections.ConfigDict:
    """A config for ``method`` at ``variant`` size with the shared defaults (ATST's AdamW and schedules)."""
    from atst_jax.methods import get_class
    from atst_jax.methods.base import dataclass_defaults

    variant = variant or "tiny"
    if variant not in MODELS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(MODELS)}")
    width, depth, heads = MODELS[variant]

    c = ml_collections.ConfigDict()
    c.method = method
    c.variant = variant
    c.seed = 0
    # Parameters to start from (fresh optimizer): a run directory, RUN/checkpoints/<step>, or an exported /
    # official PyTorch file (.safetensors, ATST-SED .pt, Lightning .ckpt).
    c.init_from = ""

    c.model = ml_collections.ConfigDict(
        dict(
            width=width,
            depth=depth,
            heads=heads,
            mlp_ratio=4.0,
            n_mels=64,
            patch_w=4,
            num_pos=251,
            drop_path=0.1,
            use_cls=False,
            dtype="float32",  # compute dtype ("bfloat16" on accelerators); params stay float32
            scan_layers=True,
            remat="none",  # none | full | save_dots
            attention="xla",  # xla | dot_product_attention | cudnn (GPU, bf16): same parameters for all
            norm_style="pre",  # pre | post (EAT / data2vec 2.0: LayerNorm after each residual add)
        )
    )
    # The method's section: every field of its config dataclass, at the dataclass defaults.
    c[method] = ml_collections.ConfigDict(dataclass_defaults(get_class(method).Config))
    c.optim = ml_collections.ConfigDict(
        dict(
            base_lr=4e-4,  # peak LR = base_lr × global_batch / 256
            final_lr=1e-6,
            warmup_steps=30,
            b1=0.9,
            b2=0.999,
            eps=1e-6,
            wd_start=0.04,
            wd_end=0.4,
            wd_schedule="cosine",  # cosine (wd_start → wd_end) | constant (wd_start)
            adamw="transformers",  # transformers (ATST) | torch (torch.optim.AdamW: DINO, ASiT) | fairseq (EAT)
            grad_clip="none",  # none | global_norm | per_param (before AdamW)
            clip_norm=0.0,
            ema=0.99,  # teacher momentum at step 0 (the method's schedule takes it from there)
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=300,
            global_batch=16,
            log_every=10,
            ckpt_every=100,
            keep_checkpoints=3,  # newest K checkpoints kept ...
            keep_every=0,  # ... plus every M-th step for good (0 = none)
            nonfinite="halt",  # halt | skip: what a NaN/Inf loss or gradient does
            max_skipped=10,  # with nonfinite=skip: halt after this many skipped steps
            inject_nan_at_step=-1,  # fault injection for tests: make the N-th step's loss NaN (1-based)
            # Split each global batch into this many microbatches run one after another (same update for
            # per-example losses; BatchNorm statistics become per-microbatch). For the official 1008–1536
            # batches on few devices.
            grad_accum_steps=1,
            chip="",  # for perf/mfu: v4 | v5e | v5p | v6e | h100 | h200; "" = detect from the device kind
            # Start over in a workdir that holds another run's checkpoints (moved to WORKDIR/set_aside/, not
            # deleted) instead of refusing it. A workdir holding this same run's checkpoints still resumes.
            fresh=False,
            # TensorBoard image of the first clip's views and masks as the step drew them, every N steps
            # (0 = never).
            image_every=100,
            # Encoder-health warning (models/collapse.py): the progress line warns when the teacher tokens'
            # within-clip variance share or effective dimension stays under its floor (0 = off) at every
            # logged step for this many steps.
            health_min=ml_collections.ConfigDict(dict(HEALTH_MIN)),
            health_patience=200,
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="embedded",  # embedded | records
            records_dir="",  # for source=records: a directory of prepared ArrayRecord shards
            cache_dir="",  # embedded data cache; default ~/.cache/atst_jax/embedded
            num_clips=512,
            # Train on a seeded random subset of this many clips (0 = all). The official small recipes of
            # ATST-Frame and ATST-Clip use 200,000 AudioSet clips drawn with seed 1234.
            subset=0,
            subset_seed=1234,
            sample_rate=16000,
            hop_length=160,
            worker_count=0,  # Grain worker processes (0 = in the main process)
        )
    )
    # The frozen-encoder probe during / after pretraining (atst_jax/pretrain_probe.py): off unless probe.train
    # names prepared labelled data, or "embedded" (the held-out embedded probe split).
    c.probe = ml_collections.ConfigDict(
        dict(
            train="",  # a prepared labelled dataset, or "embedded"
            test="",  # with a dataset in train: the one to test on
            every=0,  # quick probe every N steps (0 = never): TensorBoard probe/*, WORKDIR/probe.jsonl
            final=True,  # after the last step: the full probe with baselines, WORKDIR/probe/RESULTS.json + PNGs
            task="auto",
            layers=0,  # concatenate the last N blocks (0 = all)
            lrs=[1e-3, 3e-3, 1e-2],
            epochs=20,
            quick_lrs=[1e-2],
            quick_epochs=5,
            baselines=["random_init", "logmel"],
            seed=0,
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Logical axis → mesh axes (see atst_jax/sharding.py). Lists, so configs stay plain data.
    c.sharding_rules = [
        ["batch", ["data", "fsdp"]],
        ["embed", "fsdp"],
        # MLP hidden units over tensor, and over fsdp where the other dim did not take it (the fc1 bias).
        ["mlp", ["tensor", "fsdp"]],
        ["heads", "tensor"],
        ["kv", None],
        ["layers", None],
        ["patch", None],
        # Head hidden units (4096): over tensor, and over fsdp where the other dim did not take it, so
        # FSDP shards the heads too (otherwise ~3M replicated head weights dominate at fsdp=256).
        ["proj_hidden", ["fsdp", "tensor"]],
        ["proj_out", None],
        # DINO prototype layers (8192 / 1024 outputs): sharded like the head hidden units.
        ["prototypes", ["fsdp", "tensor"]],
        # Pixels of a patch (the reconstruction head's output, 16·16 = 256): over fsdp, so FSDP shards it too.
        ["pixels", "fsdp"],
        # Activations: examples over (data, fsdp); heads and MLP units over tensor; features unsharded.
        ["act_batch", ["data", "fsdp"]],
        ["act_length", None],
        ["act_embed", None],
        ["act_heads", "tensor"],
        ["act_mlp", "tensor"],
    ]
    return c


def eat_vit(c, frames: int):
    """The 2-D patch ViT of EAT / AaSP on ``frames``-frame crops of the 128-bin Kaldi fbank at 32 kHz: 16 × 16
    patches, a CLS token, qkv bias, fixed 2-D sin-cos positions; EAT's optimiser (fairseq's ``adam``: eps
    before the bias correction, decay before the step; β (0.9, 0.95), constant weight decay 0.05, global
    gradient-norm clipping at 4)."""
    c.model.update(
        n_mels=128,
        stem="patch2d",
        patch_size=(16, 16),
        num_pos=(frames // 16) * 8 + 1,
        use_cls=True,
        qkv_bias=True,
        pos_embed="sincos2d",
    )
    c.optim.update(
        adamw="fairseq", b1=0.9, b2=0.95, eps=1e-6, wd_start=0.05, wd_schedule="constant",
        grad_clip="global_norm", clip_norm=4.0, final_lr=1e-6,
    )  # fmt: skip
    c.data.update(sample_rate=32000, hop_length=320)


def set_run(c, *, global_batch, base_lr, warmup_steps, steps, ema):
    """The recipe's run: global batch, base LR (× batch / 256), warm-up and total steps, teacher EMA."""
    c.train.global_batch = global_batch
    c.train.steps = steps
    c.optim.base_lr = base_lr
    c.optim.warmup_steps = warmup_steps
    c.optim.ema = ema
