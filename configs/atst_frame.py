"""ATST-Frame pretraining (spec/methods.md §0–§1).

Use with ``--config configs/atst_frame.py:VARIANT``; VARIANT is ``tiny`` (tests, the embedded-data demo),
``small`` (D=384, official small recipe) or ``base`` (D=768, official base recipe). Every field can be
overridden on the command line, e.g. ``--config.train.steps=20 --config.mesh.fsdp=4``.
"""

import ml_collections

# width, depth, heads, projector hidden, projector out
_MODELS = {
    "tiny": (128, 4, 2, 512, 128),
    "small": (384, 12, 6, 4096, 256),
    "base": (768, 12, 12, 4096, 256),
    "large": (1024, 24, 16, 4096, 256),
}

# Official runs: global batch, base_lr (×batch/256), warm-up steps, total steps, teacher EMA base.
_RUNS = {
    "tiny": (16, 4e-4, 30, 300, 0.99),
    "small": (1024, 4e-4, 1950, 58500, 0.997),  # 200k-clip AudioSet subset
    "base": (1008, 8e-5, 19900, 398000, 0.9996),  # full unbalanced AudioSet
    "large": (1008, 8e-5, 19900, 398000, 0.9996),
}


def get_config(variant: str = "tiny"):
    variant = variant or "tiny"
    if variant not in _MODELS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(_MODELS)}")
    width, depth, heads, proj_hidden, proj_dim = _MODELS[variant]
    batch, base_lr, warmup, steps, ema = _RUNS[variant]

    c = ml_collections.ConfigDict()
    c.method = "atst_frame"
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
            dtype="float32",  # compute dtype ("bfloat16" on accelerators); params stay float32
            scan_layers=True,
            remat="none",  # none | full | save_dots
        )
    )
    c.atst_frame = ml_collections.ConfigDict(
        dict(
            mask_ratio=0.65,
            mask_span=5,
            min_spans=2,
            mixup_ratio=0.4,
            freq_scale=(0.6, 1.5),
            aug_view1=False,  # official aug_tea
            aug_view2=True,  # official aug_stu
            proj_hidden=proj_hidden,
            proj_dim=proj_dim,
            teacher_train_mode=True,
            symmetric=True,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            base_lr=base_lr,  # peak LR = base_lr × global_batch / 256
            final_lr=1e-6,
            warmup_steps=warmup,
            b1=0.9,
            b2=0.999,
            eps=1e-6,
            wd_start=0.04,
            wd_end=0.4,
            ema=ema,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=steps,
            global_batch=batch,
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
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="embedded",  # embedded | records
            records_dir="",  # for source=records: a directory of prepared ArrayRecord shards
            cache_dir="",  # embedded data cache; default ~/.cache/atst_jax/embedded
            num_clips=512,
            # The official recipe crops 10 s; tiny uses 6 s so the CPU demo and tests stay fast.
            crop_seconds=6.0 if variant == "tiny" else 10.0,
            sample_rate=16000,
            hop_length=160,
            worker_count=0,  # Grain worker processes (0 = in the main process)
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
        # Activations: examples over (data, fsdp); heads and MLP units over tensor; features unsharded.
        ["act_batch", ["data", "fsdp"]],
        ["act_length", None],
        ["act_embed", None],
        ["act_heads", "tensor"],
        ["act_mlp", "tensor"],
    ]
    return c
