"""Inference conventions shared by the JAX embedder (``atst_jax.eval.embed``) and the PyTorch side
(``atst_jax.export``): the block-wise front end, the chunk grid, timestamps, the Clip scene embedding, and
building an encoder (config and parameters) for inference.

It sits below both so that neither imports the other; it needs only ``atst_jax.audio``, ``atst_jax.models``,
NumPy and JAX (no torch), plus ``atst_jax.methods.get_class`` inside :func:`_run_crop`, for the one question
only a run's method can answer (its crops) when its checkpoint predates the metadata entry that records them.

Conventions (tests/test_export.py checks the JAX and PyTorch paths against each other):

* Front end on the **whole** clip (the top-80 dB floor is per clip, not per chunk), in float64, cast to
  float32 — block by block over frames, so minutes of audio never materialise an ``[T, 1024]`` array.
* Chunks of ``chunk_frames`` frames from frame 0, a multiple of the 4-frame patch, so token j of the clip is
  token ``j mod (chunk_frames/4)`` of chunk ``j // (chunk_frames/4)`` and the 40 ms grid is global (the
  official code's 1001-frame chunks drift by 10 ms per chunk). A trailing partial patch (< 4 frames) is
  dropped, as in training: a clip gives ``frames // 4`` tokens.
* Chunk length: the longest crop the encoder was pretrained on, cut to whole patches, because the
  positional slots past the trained crop never received a gradient (a 10 s chunk of a 6 s model would use
  100 untrained positions). That is how each official downstream code chunks: ATST-Frame pretrains on 10 s
  and chunks at ``CHUNK_FRAMES`` = 1000; ATST-Clip chunks at its ``train_len`` (6 s → 600 frames). Without a
  run's config (an official file): 10 s for ATST-Frame, 6 s for ATST-Clip. Capped at ``CHUNK_FRAMES`` (the
  251 positional slots hold 250 tokens and the CLS) and at what the encoder's own positional table holds.
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
* 2-D patch ViTs (``stem="patch2d"``, ASiT): Kaldi fbank at 32 kHz, one time step per 16-frame column of
  patches (the mean of its frequency patches), chunks of the positions' length (592 frames), scene
  ``[CLS ‖ mean of patch tokens]`` — see the section "Front ends, time steps and chunks" below.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax import audio
from atst_jax.models import stems
from atst_jax.models.encoder import EncoderConfig, FrameAST
from atst_jax.models.stems import make_stem

# The chunk rules are the stems' own (``Stem.chunk_frames``); these names are their inference-side spellings.
CHUNK_FRAMES = stems.FRAME_CHUNK_FRAMES
CLIP_TRAIN_SECONDS = stems.CLIP_TRAIN_SECONDS
VIT_CHUNK_FRAMES = stems.VIT_CHUNK_FRAMES
default_chunk_frames = stems.frame_chunk_frames  # for a FrameAST file that records no config
vit_chunk_frames = stems.patch2d_chunk_frames
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
    return audio.num_frames(int(round(seconds * audio.SAMPLE_RATE)))


def run_chunk_frames(config, use_cls: bool, patch_w: int = 4, num_pos: int | None = None, inputs=None) -> int:
    """:func:`default_chunk_frames` for a run's saved config (a plain dict, or None).

    The trained length is the longest crop the run's method asks for (``Method.inputs()``, the contract), so
    nothing here knows a method by name: the crops the checkpoint records (``inputs``, its metadata's entry),
    else those of the method rebuilt from ``config`` (checkpoints written before the entry existed). A config
    the method can no longer read falls back to the kind's default: this only picks a chunk length, it should
    not stop an export or an embedding.
    """
    crop = _run_crop(config, inputs)
    return default_chunk_frames(use_cls, crop[0] if crop else None, patch_w, num_pos)


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
        qkv_bias=enc_params["blocks"]["attn"]["qkv"].get("bias") is not None,
        norm_style="post" if "embed_norm" in enc_params else "pre",  # EAT's layout has an embedding norm
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


# ----------------------------------------------------------------------------------------------------------
# Front ends, time steps and chunks for any stem (ATST frame tokens and 2-D patch ViTs)
# ----------------------------------------------------------------------------------------------------------
#
# A 2-D patch ViT (``stem="patch2d"``: ASiT) sees a Kaldi fbank (32 kHz, 128 bins, 25 ms windows every
# 10 ms) cut into 16 × 16 patches, tokens time-major. Its conventions, shared by ``atst_jax.eval.embed`` and
# ``atst_jax.export.torch_vit``:
#
# * Front end on the whole clip: the feature set ``kaldi_fbank128`` (``atst_jax.features``: the wave's mean
#   removed, Kaldi fbank ``atst_jax.fbank.fbank_np``), normalised ``(x + 4.2677393) / (2 · 4.5689974)``, or
#   the ``kaldi_fbank128_16k`` (EAT's, AaSP's default) that the run's crops record.
# * A time step is a column of patches: ``p_t`` = 16 frames (160 ms) × all ``n_mels / p_f`` = 8 frequency
#   patches. Its timestamp embedding is the **mean over the column's 8 patch tokens** of each block's
#   final-normed output (the last n blocks concatenated: ``n·D``), reported at the column's centre, the mean
#   of its 16 frame centres: ``160·c + 87.5`` ms (Kaldi frame k covers [10k, 10k + 25) ms, centre 10k + 12.5).
# * Chunks of ``chunk_frames`` = the learned positions' length (``(num_pos − 1) / 8 · 16`` = 592 frames for
#   297 slots, the 5.92 s pretraining crop), on a global grid from frame 0; frames past the last whole column
#   are dropped. A shorter last chunk is zero-padded to whole columns and its padding **masked** (−10000 on
#   padded keys) — the official ViT cannot do that: it accepts exactly 592 frames (its ``pos_embed`` is
#   added whole), and ASiT's data code zero-pads the *un-normalised* fbank to 592 frames (model input
#   4.2677393 / 9.1379948 ≈ 0.467 there) and attends to the padding. For a full 592-frame chunk both agree.
# * Scene embedding: ``[CLS ‖ mean of patch tokens]`` per block (``2·n·D``, CLS part first, as ATST-Clip),
#   across chunks the CLS weighted by each chunk's columns (:func:`scene_from_chunks`).


@dataclasses.dataclass(frozen=True)
class FrontEnd:
    """A feature set (``atst_jax.features``) as inference computes it from a whole clip:
    ``__call__(wave) -> float32 [F, frames]`` (the normalised model input) and when its frames are centred,
    ``first_centre_ms + hop_ms · k`` (ATST: the STFT centre, ``center=True``; Kaldi: the 25 ms window's
    midpoint)."""

    features: str
    hop_ms: float
    first_centre_ms: float

    @property
    def feature_set(self):
        from atst_jax import features

        return features.get(self.features)

    @property
    def sample_rate(self) -> int:
        return self.feature_set.sample_rate

    def num_frames(self, samples: int) -> int:
        return self.feature_set.num_frames(samples)

    def __call__(self, wave) -> np.ndarray:
        if self.features == "atst_logmel64":
            return log_mel(wave)  # block-wise float64 (the PyTorch LogMel's twin)
        fs = self.feature_set
        return np.asarray(fs.normalize(fs.compute(wave)), np.float32)

    def timestamps_ms(self, steps: int, patch_t: int) -> np.ndarray:
        """Centres of time steps of ``patch_t`` frames: the mean of their frame centres."""
        first = self.first_centre_ms + self.hop_ms * (patch_t - 1) / 2
        return first + self.hop_ms * patch_t * np.arange(steps, dtype=np.float64)


FRONT_ENDS = {
    "atst_logmel64": FrontEnd("atst_logmel64", 10.0, 0.0),
    "kaldi_fbank128": FrontEnd("kaldi_fbank128", 10.0, 12.5),
    "kaldi_fbank128_16k": FrontEnd("kaldi_fbank128_16k", 10.0, 12.5),
}


def front_end(features: str) -> FrontEnd:
    if features not in FRONT_ENDS:
        raise ValueError(f"no inference front end for feature set {features!r}; known: {sorted(FRONT_ENDS)}")
    return FRONT_ENDS[features]


def default_features(cfg: EncoderConfig) -> str:
    """The feature set an encoder is assumed to take when nothing records it, its stem's: ATST's log-mel for
    the frame stem, the Kaldi fbank for 2-D patches (what the official ViT layout's models were trained on)."""
    return make_stem(cfg).default_features


def time_patch(cfg: EncoderConfig) -> int:
    """Frames per time step of tokens, the stem's: ``patch_w`` (frame stem) or ``patch_size[0]`` (2-D patches)."""
    return make_stem(cfg).time_patch


def _run_crop(config, inputs=None):
    """``(frames, features)`` of the longest crop the run's method trained on (``Method.inputs()``, the
    contract), or None when nothing tells.

    ``inputs``: the crops the run's checkpoint records (its metadata's ``inputs`` entry,
    ``checkpoint.trained_inputs``: ``[{"name", "frames", "features"}]``), read as they are: no method is built.
    Without them — a checkpoint written before the entry existed — the run's method is rebuilt from its saved
    ``config`` to ask it; a config no method in the registry can build gives None.
    """
    if inputs:
        try:
            crop = max(inputs, key=lambda c: int(c["frames"]))  # the first of the longest, as max() below
            return int(crop["frames"]), str(crop["features"])
        except (TypeError, KeyError, ValueError):
            pass  # an entry that does not parse: as if none were recorded
    if not config or not config.get("method"):
        return None
    import ml_collections

    from atst_jax.methods import get_class

    try:
        method = get_class(config["method"])(ml_collections.ConfigDict(config))
        crop = max(method.inputs(), key=lambda c: c.frames)
    except (ValueError, KeyError, TypeError, AttributeError):  # ConfigError is a ValueError
        return None
    return crop.frames, crop.features


def run_features(config, cfg: EncoderConfig, inputs=None) -> str:
    """The feature set a run's encoder is evaluated with: the one its method's crops are evaluated with (the
    contract; ``FeatureSet.inference_name``: e.g. ATST-Clip trained on crops floored each at its own maximum is
    evaluated on clips floored the same way), else :func:`default_features`. ``inputs``: the crops the
    checkpoint records (see :func:`_run_crop`); without them, the method rebuilt from ``config``."""
    from atst_jax import features

    crop = _run_crop(config, inputs)
    return features.get(crop[1]).inference_name if crop else default_features(cfg)


def encoder_chunk_frames(cfg: EncoderConfig, config=None, inputs=None) -> int:
    """The chunk length of an encoder (``config``: the run's saved config, if any; ``inputs``: the crops its
    checkpoint records, if any — see :func:`_run_crop`): its stem's rule (``Stem.chunk_frames``) on the longest
    crop the run's method trained on."""
    crop = _run_crop(config, inputs)
    return make_stem(cfg).chunk_frames(crop[0] if crop else None)


def trained_chunk_frames(cfg: EncoderConfig, trained_frames: int | None) -> int:
    """The chunk length of an encoder known to have been trained (or fine-tuned) on ``trained_frames``."""
    return make_stem(cfg).chunk_frames(trained_frames)


def timestep_features(encoder: FrameAST, spec, length, n: int):
    """:func:`block_features` with the tokens of each time step averaged: ``[B, prefix + T_steps, n·D]``
    (prefix = the CLS row, kept). The frame stem has one token per step (unchanged); a 2-D patch encoder
    averages the ``n_mels / p_f`` frequency patches of each column (time-major tokens)."""
    feats = block_features(encoder, spec, length, n)
    stem = encoder.stem
    if stem.freq_patches == 1:  # one token per step: the tokens are the steps
        return feats
    prefix = encoder.n_prefix
    return jnp.concatenate([feats[:, :prefix], stem.time_steps(feats[:, prefix:])], axis=1)
