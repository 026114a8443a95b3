"""Analytic FLOPs of one ATST-Frame train step (matmuls only; 1 multiply-add = 2 FLOPs).

Counted per step for a global batch B (2B sequences: both views go through both networks):

- encoder forward per sequence: patch embedding ``2·N·P·D`` and per block ``2·N·3D²`` (qkv) + ``4·N²·D``
  (logits and attention-weighted values) + ``2·N·D²`` (output projection) + ``4·N·D·F`` (MLP);
- masked-token gather (a one-hot matmul) ``2·K·N·D`` and the heads on the K gathered tokens;
- teacher: forward only; student: forward + backward ≈ 3 × forward;
- the frequency warp of view 2: ``2·F_mel²·T`` per clip.

Elementwise work (norms, softmax, GELU, optimizer) is left out; it is a few percent. XLA's own
``cost_analysis()`` agrees within a few percent for unrolled layers, but counts a ``lax.scan`` body once,
not once per layer, so it cannot be used directly on the scanned model.
"""

from __future__ import annotations

from atst_jax.data import views
from atst_jax.data.pipeline import crop_frames


def atst_frame_step_flops(config, global_batch: int | None = None, frames: int | None = None) -> float:
    m, a = config.model, config.atst_frame
    b = global_batch or config.train.global_batch
    t = frames or crop_frames(config)
    s = 2 * b
    n = t // m.patch_w
    d, depth = m.width, m.depth
    f = int(d * m.mlp_ratio)
    p = m.n_mels * m.patch_w
    hid, out = a.proj_hidden, a.proj_dim
    k = views.mask_capacity(n, a.mask_ratio, a.mask_span, a.min_spans)
    encoder = s * (
        2 * n * p * d + depth * (2 * n * 3 * d * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * f)
    )
    gather = s * 2 * k * n * d
    projector = s * 2 * k * (d * hid + hid * out)
    predictor = s * 2 * k * (out * hid + hid * out)
    warp = b * 2 * m.n_mels * m.n_mels * t if a.aug_view2 else 0
    teacher = encoder + gather + projector
    student = 3 * (encoder + gather + projector + predictor)
    return float(teacher + student + warp)


# Peak dense bf16 throughput (TFLOP/s) and HBM per chip, as the vendors state them. The planner and the
# training loop's MFU use these; ``--chip`` / ``train.chip`` name one.
CHIPS = {
    "v4": {"peak_tflops": 275.0, "hbm_bytes": 32 * 2**30},
    "v5e": {"peak_tflops": 197.0, "hbm_bytes": 16 * 10**9},
    "v5p": {"peak_tflops": 459.0, "hbm_bytes": 95 * 2**30},
    "v6e": {"peak_tflops": 918.0, "hbm_bytes": 32 * 10**9},
    "h100": {"peak_tflops": 989.0, "hbm_bytes": 80 * 10**9},
    "h200": {"peak_tflops": 989.0, "hbm_bytes": 141 * 10**9},
}


def chip_from_device(device) -> str | None:
    """The ``CHIPS`` key of a JAX device (``device_kind`` such as "TPU v5p", "TPU v5 lite", "NVIDIA H100
    80GB HBM3"), or None for hardware without a stated peak (CPUs)."""
    kind = getattr(device, "device_kind", "").lower()
    if "h200" in kind:
        return "h200"
    if "h100" in kind:
        return "h100"
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
        return "v5e"
    if "v6" in kind:
        return "v6e"
    for name in ("v5p", "v4"):
        if name in kind:
            return name
    if kind.startswith("tpu v5"):
        return "v5p"
    return None
