"""Analytic FLOPs (matmuls only; 1 multiply-add = 2 FLOPs): shared helpers every method builds its
``step_flops`` from, and the chips' peaks for MFU.

- encoder forward per sequence of N tokens (+1 with a CLS token): patch embedding ``2·N·P·D`` and per block
  ``2·N·3D²`` (qkv) + ``4·N²·D`` (logits and attention-weighted values) + ``2·N·D²`` (output projection) +
  ``4·N·D·F`` (MLP);
- the masked-token gather (a one-hot matmul) ``2·K·N·D``; a BN-MLP head on R rows
  ``2·R·(d_in·hidden + hidden·d_out)``; the frequency warp ``2·F_mel²·T`` per clip and warped axis;
- a network that is trained costs forward + backward ≈ ``TRAIN_FACTOR`` = 3 × forward; a teacher forward only.

Elementwise work (norms, softmax, GELU, optimizer) is left out; it is a few percent. XLA's own
``cost_analysis()`` agrees within a few percent for unrolled layers, but counts a ``lax.scan`` body once,
not once per layer, so it cannot be used directly on the scanned model.
"""

from __future__ import annotations

TRAIN_FACTOR = 3  # forward + backward (two matmuls per forward matmul) of a trained network


def patch_dim(enc) -> int:
    """Input values per token of the encoder's patch stem (the stem's own answer)."""
    from atst_jax.models.stems import make_stem

    return make_stem(enc).patch_dim


def encoder_forward(enc, n_tokens: int, sequences: int, *, n_embed: int | None = None) -> float:
    """Forward FLOPs of ``sequences`` sequences through the encoder ``enc`` (an ``EncoderConfig``).

    ``n_tokens``: the patch tokens the stem embeds per sequence; ``n_embed`` (default ``n_tokens``): how many
    of them go through the blocks (fewer for methods that drop masked tokens); a CLS token adds one."""
    d, f = enc.width, int(enc.width * enc.mlp_ratio)
    n = (n_tokens if n_embed is None else n_embed) + (1 if enc.use_cls else 0)
    block = 2 * n * 3 * d * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * f
    return stem_forward(enc, n_tokens, sequences) + float(sequences * enc.depth * block)


def stem_forward(enc, n_tokens: int, sequences: int) -> float:
    """The patch stem alone on ``sequences`` crops of ``n_tokens`` patch tokens: the patch projection, plus
    the AaPE branch where the encoder has one (``models/aape.py``)."""
    out = float(sequences * 2 * n_tokens * patch_dim(enc) * enc.width)
    if getattr(enc, "aape", None) is not None:
        from atst_jax.models.aape import aape_flops

        out += aape_flops(enc, n_tokens, sequences)
    return out


def embed_visible(enc, n_tokens: int, visible: int, clips: int, copies: int) -> float:
    """``FrameAST.embed_visible``: the patch projection once per clip of ``n_tokens`` tokens, the one-hot
    gather of its ``copies × visible`` kept tokens, and the AaPE branch (where the encoder has one) once per
    copy, its fusion projection on the ``visible`` kept tokens only."""
    out = float(clips * 2 * n_tokens * patch_dim(enc) * enc.width)
    out += token_gather(clips, copies * visible, n_tokens, enc.width)
    if getattr(enc, "aape", None) is not None:
        from atst_jax.models.aape import aape_flops

        out += aape_flops(enc, n_tokens, clips * copies, fused_tokens=visible)
    return out


def trunk_forward(enc, n: int, sequences: int) -> float:
    """The blocks alone on ``sequences`` sequences of ``n`` tokens (CLS included: ``n`` is what they see)."""
    d, f = enc.width, int(enc.width * enc.mlp_ratio)
    block = 2 * n * 3 * d * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * f
    return float(sequences * enc.depth * block)


def cross_block_forward(queries: int, keys: int, dim: int, kv_dim: int, mlp_ratio: float, sequences: int):
    """A pre-norm cross-attention block (``models/attention.CrossBlock``): q projection, fused k/v projection
    from ``kv_dim``, logits and weighted values, output projection, MLP."""
    f = int(dim * mlp_ratio)
    per = 2 * queries * dim * dim + 2 * keys * kv_dim * 2 * dim + 4 * queries * keys * dim
    per += 2 * queries * dim * dim + 4 * queries * dim * f
    return float(sequences * per)


def token_gather(sequences: int, k: int, n: int, d: int) -> float:
    """The one-hot matmul that gathers ``k`` of ``n`` tokens of width ``d`` per sequence."""
    return float(sequences * 2 * k * n * d)


def token_covariance(sequences: int, n: int, d: int) -> float:
    """A ``[D, D]`` covariance of ``n`` tokens per sequence (``atst_jax.models.collapse``)."""
    return float(sequences * 2 * n * d * d)


def bnmlp_forward(rows: int, d_in: int, hidden: int, d_out: int) -> float:
    """``Linear(d_in→hidden) → BN → ReLU → Linear(hidden→d_out)`` on ``rows`` rows."""
    return float(2 * rows * (d_in * hidden + hidden * d_out))


def freq_warp(clips: int, n_mels: int, frames: int) -> float:
    """The frequency crop-and-resize as a ``[F, F]`` matrix per clip."""
    return float(clips * 2 * n_mels * n_mels * frames)


def resize_2d(clips: int, n_mels: int, frames: int, canvas_frames: int) -> float:
    """RandomResizeCrop on both axes: ``[F, F]`` rows then ``[T_canvas, T]`` columns per clip."""
    return float(clips * 2 * (n_mels * n_mels * frames + n_mels * canvas_frames * frames))


# Peak dense bf16 throughput (TFLOP/s) and HBM per chip, as the vendors state them. The planner and the
# training loop's MFU use these; ``--chip`` / ``train.chip`` name one. The vendors' "GB" of HBM are binary
# (GiB): libtpu makes 15.75 GiB of a v5e's "16 GB" available, an H100 "80GB" reports 81,559 MiB.
CHIPS = {
    "v4": {"peak_tflops": 275.0, "hbm_bytes": 32 * 2**30},
    "v5e": {"peak_tflops": 197.0, "hbm_bytes": 16 * 2**30},
    "v5p": {"peak_tflops": 459.0, "hbm_bytes": 95 * 2**30},
    "v6e": {"peak_tflops": 918.0, "hbm_bytes": 32 * 2**30},
    "h100": {"peak_tflops": 989.0, "hbm_bytes": 80 * 2**30},
    "h200": {"peak_tflops": 989.0, "hbm_bytes": 141 * 2**30},
    "a100": {"peak_tflops": 312.0, "hbm_bytes": 80 * 2**30},  # the 80 GB SXM card
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
