"""Inference conventions shared by the JAX embedder (``atst_jax.embed``) and the PyTorch side
(``atst_jax.export``): the block-wise front end, the chunk grid, timestamps, the Clip scene embedding, and
building an encoder (config and parameters) for inference.

It sits below both so that neither imports the other; it needs only ``atst_jax.audio``, ``atst_jax.models``,
NumPy and JAX (no torch), plus ``atst_jax.methods.get_class`` inside :func:`run_chunk_frames`, the one
question only a run's method can answer.

Conventions (tests/test_export.py checks the JAX and PyTorch paths against each other):

* Front end on the **whole** clip (the top-80 dB floor is per clip, not per chunk), in float64, cast to
  float32 — block by block over frames, so minutes of audio never materialise an ``[T, 1024]`` array.
* Chunks of ``chunk_frames`` frames from frame 0, a multiple of the 4-frame patch, so token j of the clip is
  token ``j mod (chunk_frames/4)`` of chunk ``j // (chunk_frames/4)`` and the 40 ms grid is global (the
  official code's 1001-frame chunks drift by 10 ms per chunk). A trailing partial patch (< 4 frames) is
  dropped, as in training: a clip gives ``frames // 4`` tokens.
* Chunk length, per encoder kind, as each official downstream code chunks:
  ATST-Frame: ``CHUNK_FRAMES`` = 1000 (10 s, the length it pretrains on).
  ATST-Clip: the longest crop it was pretrained on, cut to whole patches (6 s → 600 frames) — the official
  ATST-Clip downstream code chunks at the pretraining ``train_len`` — because the positional slots past
  the trained crop never received a gradient: a 10 s chunk of a 6 s model would use 100 untrained
  positions. Capped at ``CHUNK_FRAMES`` (the 251 positional slots hold 250 tokens and the CLS).
* Features: the last ``n`` blocks, each through the final norm, concatenated on channels (``[T, n·D]``,
  CLS removed) — the timestamp embeddings of both kinds.
* Timestamps: token j at its **centre**, ``40·j + 15`` ms (the mean of its four STFT frame centres).
* Scene embedding — ATST-Frame: the mean of the timestamp embeddings over all tokens of the clip (``n·D``).
  ATST-Clip: ``[CLS ‖ mean]`` (``2·n·D``), in the official order (``torch.cat(cls_out + avg_out)`` of
  ``get_intermediate_layers_chunks``): first the final-normed CLS output of each of the last n blocks
  (oldest block first), then the mean over valid tokens of each of those blocks. Across chunks, the
  mean part is the mean over all tokens of the clip (as ATST-Frame's), and the CLS part is the mean of the
  per-chunk CLS outputs **weighted by each chunk's token count**: each 40 ms of audio is represented by the
  CLS of the chunk that saw it, so a short last chunk counts for its duration instead of as much as a full
  one. (The official code averages per-chunk values unweighted and drops a trailing chunk of at most half
  a chunk; both give the same result for audio of one chunk — the common case of ≤ 6 s clips — and for
  audio made of full chunks.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax import audio
from atst_jax.models.encoder import EncoderConfig, FrameAST

CHUNK_FRAMES = 1000
# The official ATST-Clip downstream code assumes train_len = 6 s when a checkpoint does not record it.
CLIP_TRAIN_SECONDS = 6.0
TOKEN_MS = 40.0
TIMESTAMP_OFFSET_MS = 15.0
HEAD_DIM = 64  # the official encoders always use 64-wide heads (width // heads)


# ----------------------------------------------------------------------------------------------------------
# Chunks, timestamps, front end
# ----------------------------------------------------------------------------------------------------------


def chunk_bounds(frames: int, chunk_frames: int = CHUNK_FRAMES, patch_w: int = 4) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` frame ranges of the chunks, keeping only those with at least one whole patch."""
    if chunk_frames % patch_w or chunk_frames < patch_w:
        raise ValueError(
            f"chunk_frames={chunk_frames} must be a positive multiple of the patch width {patch_w}"
        )
    bounds = [(s, min(s + chunk_frames, frames)) for s in range(0, frames, chunk_frames)]
    return [(s, e) for s, e in bounds if e - s >= patch_w]


def timestamps_ms(num_tokens: int) -> np.ndarray:
    """Token centres in milliseconds: ``40·j + 15``."""
    return np.arange(num_tokens, dtype=np.float64) * TOKEN_MS + TIMESTAMP_OFFSET_MS


def seconds_to_frames(seconds: float) -> int:
    """STFT frames of ``seconds`` of audio (``samples // hop + 1``: 6 s → 601), as the official transforms."""
    return int(round(seconds * audio.SAMPLE_RATE)) // audio.HOP_LENGTH + 1


def default_chunk_frames(use_cls: bool, trained_frames: int | None = None, patch_w: int = 4) -> int:
    """The chunk length of an encoder kind (see the module docstring): ATST-Frame ``CHUNK_FRAMES``;
    ATST-Clip ``trained_frames`` (default: 6 s) cut to whole patches, at most ``CHUNK_FRAMES``."""
    if not use_cls:
        return CHUNK_FRAMES
    frames = trained_frames if trained_frames else seconds_to_frames(CLIP_TRAIN_SECONDS)
    return max(patch_w, min(CHUNK_FRAMES, frames // patch_w * patch_w))


def run_chunk_frames(config, use_cls: bool, patch_w: int = 4) -> int:
    """:func:`default_chunk_frames` for a run's saved config (a plain dict, or None).

    The trained length is the longest crop the run's method asks for (``Method.inputs()``, the contract), so
    nothing here knows a method by name. A config the method can no longer read falls back to the 6 s
    default: this only picks a chunk length, it should not stop an export or an embedding.
    """
    if not use_cls:
        return CHUNK_FRAMES
    trained = None
    if config and config.get("method"):
        import ml_collections

        from atst_jax.methods import get_class

        try:
            method = get_class(config["method"])(ml_collections.ConfigDict(config))
            trained = max(crop.frames for crop in method.inputs())
        except (ValueError, KeyError, TypeError, AttributeError):  # ConfigError is a ValueError
            trained = None  # see the docstring: fall back to the documented default
    return default_chunk_frames(use_cls, trained, patch_w)


def log_mel(wave, block_frames: int = 2000) -> np.ndarray:
    """``atst_jax.audio.log_mel_np`` of a mono ``[samples]`` wave, with the STFT done ``block_frames`` frames
    at a time: the same numbers, but memory bounded by the block instead of by the clip length."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono [samples] wave, got shape {wave.shape}")
    length = wave.shape[0]
    if length < 1:
        raise ValueError("cannot compute a spectrogram of an empty wave (0 samples)")
    frames = audio.num_frames(length)
    min_len = audio.N_FFT // 2 + 1
    if length < min_len:  # same short-wave rule as atst_jax.audio
        wave = np.pad(wave, (0, min_len - length))
    pad = audio.N_FFT // 2
    padded = np.pad(wave, (pad, pad), mode="reflect")
    window = audio.hann_window()
    fb = audio.mel_filterbank().astype(np.float64)
    mel = np.empty((frames, audio.N_MELS), np.float64)
    for start in range(0, frames, block_frames):
        stop = min(start + block_frames, frames)
        # Frame k covers padded[k·hop : k·hop + n_fft]: the slice reproduces center=True framing.
        seg = padded[start * audio.HOP_LENGTH : (stop - 1) * audio.HOP_LENGTH + audio.N_FFT]
        win = np.lib.stride_tricks.sliding_window_view(seg, audio.N_FFT)[:: audio.HOP_LENGTH]
        spec = np.fft.rfft(win * window, axis=-1)
        mel[start:stop] = (spec.real**2 + spec.imag**2) @ fb
    db = 10.0 * np.log10(np.maximum(mel.T, audio.AMIN))
    db = np.maximum(db, db.max() - audio.TOP_DB).astype(np.float32)
    return audio.normalize_db(db)


def scene_from_chunks(tokens: np.ndarray, chunk_cls: np.ndarray | None, chunk_tokens) -> np.ndarray:
    """The scene embedding of one clip (NumPy; see the module docstring).

    ``tokens [T, n·D]`` are the timestamp embeddings, ``chunk_cls [C, n·D]`` the per-chunk CLS features
    (None for ATST-Frame) and ``chunk_tokens [C]`` the tokens of each chunk.
    """
    mean = tokens.mean(axis=0)
    if chunk_cls is None:
        return mean
    w = np.asarray(chunk_tokens, np.float64)
    cls = (w[:, None] * chunk_cls.astype(np.float64)).sum(axis=0) / w.sum()
    return np.concatenate([cls.astype(tokens.dtype), mean])


# ----------------------------------------------------------------------------------------------------------
# Encoders for inference
# ----------------------------------------------------------------------------------------------------------


def infer_heads(width: int, heads: int | None = None) -> int:
    """Heads of an encoder of this width: given, else ``width // 64`` (the official head dim)."""
    if heads is not None:
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads={heads}")
        return heads
    if width % HEAD_DIM:
        raise ValueError(
            f"width {width} is not a multiple of the official head dim {HEAD_DIM}: pass the number of heads"
        )
    return width // HEAD_DIM


def _has_cls(enc_params) -> bool:
    return enc_params.get("cls_token") is not None


def _for_inference(cfg: EncoderConfig) -> EncoderConfig:
    # float32 whatever the run trained in (embeddings are compared with the fp32 PyTorch export), no
    # drop-path, and no rematerialisation (there is no backward pass).
    return dataclasses.replace(cfg, dtype="float32", drop_path=0.0, remat="none")


def config_from_params(enc_params, heads: int | None = None, **overrides) -> EncoderConfig:
    """An inference ``EncoderConfig`` matching the shapes of encoder params (heads default to ``width // 64``)."""
    qkv = enc_params["blocks"]["attn"]["qkv"]["kernel"]  # [L, D, 3, H, hd]
    depth, width, _, h, _ = qkv.shape
    patch_in = enc_params["patch_embed"]["kernel"].shape[0]
    fields = dict(
        width=width,
        depth=depth,
        heads=infer_heads(width, heads if heads is not None else h),
        mlp_ratio=enc_params["blocks"]["mlp"]["fc1"]["kernel"].shape[-1] / width,
        n_mels=patch_in // 4,
        patch_w=4,
        num_pos=enc_params["pos_embed"].shape[1],
        use_cls=_has_cls(enc_params),
    )
    fields.update(overrides)
    return _for_inference(EncoderConfig(**fields))


def run_encoder_config(config, enc_params) -> EncoderConfig:
    """The inference ``EncoderConfig`` of a run: ``EncoderConfig.from_config(config["model"])`` when the run
    saved its config, else read off the parameter shapes.

    Configs saved before ``model.use_cls`` existed do not state it: the presence of ``cls_token`` in the
    parameters decides (every such run was ATST-Frame, but the parameters are the ground truth).
    """
    if not config:
        return config_from_params(enc_params)
    model = dict(config["model"])
    model.setdefault("use_cls", _has_cls(enc_params))
    cfg = EncoderConfig.from_config(model)
    if cfg.use_cls != _has_cls(enc_params):
        raise ValueError(
            f"model.use_cls={cfg.use_cls} in the run's config, but the parameters "
            f"{'have' if _has_cls(enc_params) else 'lack'} a cls_token"
        )
    return _for_inference(cfg)


def encoder_from_params(enc_params, cfg: EncoderConfig | None = None) -> FrameAST:
    """A ``FrameAST`` holding ``enc_params`` (nested dict in the checkpoint layout; NumPy or jax arrays).

    Built abstractly first, so no random initialisation is computed and thrown away.
    """
    cfg = cfg if cfg is not None else config_from_params(enc_params)
    abstract = nnx.eval_shape(lambda: FrameAST(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), enc_params))
    return nnx.merge(graphdef, state)


def block_features(encoder: FrameAST, spec, length, n: int):
    """The last ``n`` blocks' outputs, each through the final norm, concatenated on channels:
    ``[B, N(+1), n·D]`` — **with** the CLS row first for ATST-Clip (``FrameAST.intermediate_features``
    removes it; the Clip scene embedding needs it)."""
    _, layers = encoder(spec, length, collect_layers=True)
    depth = encoder.cfg.depth
    return jnp.concatenate([encoder.norm(layers[i]) for i in range(depth - n, depth)], axis=-1)
