"""Patch stems: how a log-mel ``[B, n_mels, T]`` becomes embedded tokens ``[B, N(+1), D]``.

A stem owns the token rule (how many tokens a crop gives, how many are valid), patchify/unpatchify, the
patch projection, the positions, the mask token and the optional CLS token — and the geometry code outside
``models/`` asks of it instead of branching on its name: frames per time step (``time_patch``), tokens per
step (``freq_patches``), the default feature set, the chunk length inference runs it in
(``chunk_frames``) and the PyTorch layout it exports to (``export_layout``).

Stems are stateless rule objects (a frozen dataclass over the encoder config): their parameters live as
attributes of the encoder module that ``init_params`` is given (``patch_embed``, ``mask_embed``,
``pos_embed``, ``cls_token``). That keeps ATST's flat checkpoint layout — the one the PyTorch export and
existing checkpoints use — instead of nesting the stem's parameters under a sub-module.

- ``FrameStem`` (ATST FrameAST): a token is all mel bins × ``patch_w`` frames, flattened mel-major
  (``mel * patch_w + frame_offset``, the official PatchEmbed_v2), ``Linear(n_mels·patch_w → D)``.
- ``PatchStem2D`` (ASiT / EAT / AaSP): non-overlapping ``p_t × p_f`` patches over (time, mel), tokens in
  time-major order (token ``t_patch · n_freq_patches + f_patch``), each patch flattened time-major
  (``dt · p_f + df``). The projection is a matmul on the reshaped patches — a convolution with kernel =
  stride is exactly that, and the matmul runs on the GEMM path without a conv lowering.

Positions: ``learned`` = ``pos_embed [1, num_pos, D]``, patch tokens take slots 1..N and the CLS token slot
0 (unused without CLS, kept for ATST checkpoint parity); ``sincos2d`` (2-D stem only) = fixed 2-D sin-cos
over the (time, freq) patch grid, computed on the fly (not a parameter: nothing to train, decay or
checkpoint), with no position on the CLS token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax import audio
from atst_jax.data.views import take_tokens
from atst_jax.models.layers import Linear, trunc_normal

# Chunk lengths for inference (``atst_jax.inference`` explains the rules): an encoder runs long audio in chunks
# of the crop it was pretrained on, because positional slots past that crop never received a gradient.
FRAME_CHUNK_FRAMES = 1000  # ATST-Frame: 10 s (the 251-slot table holds 250 tokens and the CLS)
# The official ATST-Clip downstream code assumes train_len = 6 s when a checkpoint does not record it.
CLIP_TRAIN_SECONDS = 6.0
VIT_CHUNK_FRAMES = 592  # a 2-D patch encoder with fixed sin-cos positions: the ASiT crop


def frame_chunk_frames(
    use_cls: bool, trained_frames: int | None = None, patch_w: int = 4, num_pos: int | None = None
) -> int:
    """The frame stem's chunk: the crop it was pretrained on, ``trained_frames`` (unknown: 10 s for ATST-Frame,
    6 s for ATST-Clip), at most ``FRAME_CHUNK_FRAMES`` and at most what the ``num_pos − 1`` positional slots
    hold (when given), cut to whole patches."""
    if trained_frames:
        frames = trained_frames
    elif use_cls:
        frames = audio.num_frames(int(round(CLIP_TRAIN_SECONDS * audio.SAMPLE_RATE)))  # 601
    else:
        frames = FRAME_CHUNK_FRAMES
    frames = min(frames, FRAME_CHUNK_FRAMES)
    if num_pos is not None:
        frames = min(frames, (int(num_pos) - 1) * patch_w)
    return max(patch_w, frames // patch_w * patch_w)


def patch2d_chunk_frames(cfg, trained_frames: int | None = None) -> int:
    """The 2-D patch stem's chunk: learned positions → their length in frames
    (``(num_pos − 1) // n_freq_patches · p_t``), at most ``trained_frames`` when given; fixed positions →
    ``trained_frames`` (default :data:`VIT_CHUNK_FRAMES`). Whole time patches."""
    p_t, p_f = cfg.patch_size
    if cfg.pos_embed == "learned":
        n_f = cfg.n_mels // p_f
        frames = (cfg.num_pos - 1) // n_f * p_t  # slot 0: the CLS (or unused)
        if trained_frames:
            frames = min(frames, trained_frames)
    else:
        frames = trained_frames or VIT_CHUNK_FRAMES
    frames = frames // p_t * p_t
    if frames < p_t:
        raise ValueError(f"chunks of {frames} frames hold no whole {p_t}-frame patch")
    return frames


def sincos_2d(n_time: int, n_freq: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions ``[n_time · n_freq, dim]`` for a time-major token grid (float32).

    The MAE/EAT form: the first ``dim/2`` channels encode the freq-patch index (the fast index of the
    token order), the last ``dim/2`` the time-patch index; each half is ``[sin(p·ω_i), cos(p·ω_i)]`` with
    ``ω_i = 10000^(−i/(dim/4))``, ``i = 0..dim/4−1``.
    """
    if dim % 4:
        raise ValueError(f"sincos2d positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def one_axis(pos):
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    t, f = np.meshgrid(np.arange(n_time), np.arange(n_freq), indexing="ij")
    emb = np.concatenate([one_axis(f.reshape(-1)), one_axis(t.reshape(-1))], axis=1)
    return emb.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Stem:
    cfg: object  # EncoderConfig (not imported: encoder.py imports this module)

    @property
    def n_prefix(self) -> int:
        """Tokens before the patch tokens (the CLS token)."""
        return 1 if self.cfg.use_cls else 0

    # Subclasses define: patch_dim, grid(frames), patchify(spec), unpatchify(patches), _patch_kernel_init,
    # default_features, export_layout, time_patch, freq_patches, chunk_frames(trained_frames).
    def time_steps(self, tokens):
        """Patch tokens ``[B, n_t · n_f, D]`` (time-major) → one vector per time step ``[B, n_t, D]``: the
        mean over each step's ``freq_patches`` tokens."""
        n_f = self.freq_patches
        b, n, d = tokens.shape
        return tokens.reshape(b, n // n_f, n_f, d).mean(axis=2)

    def num_tokens(self, frames: int) -> int:
        """Patch tokens of a crop of ``frames`` frames (CLS not counted)."""
        n_t, n_f = self.grid(frames)
        return n_t * n_f

    def init_params(self, enc: nnx.Module, rngs: nnx.Rngs) -> None:
        """Creates the stem's parameters as attributes of ``enc``, in this order of ``rngs.params()`` draws:
        patch kernel, mask token, learned positions, CLS token (the ATST order; checkpoints depend on it)."""
        d = self.cfg.width
        enc.patch_embed = Linear(
            self.patch_dim, d, axes=("patch", "embed"), init=self._patch_kernel_init, rngs=rngs
        )
        enc.mask_embed = nnx.Param(trunc_normal(rngs.params(), (1, 1, d)), axes=(None, None, "embed"))
        if self.cfg.pos_embed == "learned":
            enc.pos_embed = nnx.Param(
                trunc_normal(rngs.params(), (1, self.cfg.num_pos, d)), axes=(None, None, "embed")
            )
        else:
            enc.pos_embed = None
        if self.cfg.use_cls:
            enc.cls_token = nnx.Param(trunc_normal(rngs.params(), (1, 1, d)), axes=(None, None, "embed"))
        else:
            enc.cls_token = None

    def token_positions(self, enc: nnx.Module, n: int, dtype=jnp.float32):
        """Positional embeddings ``[1, n, D]`` of patch tokens ``0..n-1`` (no CLS), in ``dtype``."""
        if self.cfg.pos_embed == "learned":
            if n + 1 > self.cfg.num_pos:
                raise ValueError(
                    f"{n} tokens exceed the {self.cfg.num_pos - 1} positional slots of this encoder"
                )
            return enc.pos_embed[...].astype(dtype)[:, 1 : n + 1]
        n_f = self.grid(0)[1]
        if n % n_f:
            raise ValueError(f"{n} tokens do not fill whole time steps of {n_f} frequency patches")
        return jnp.asarray(sincos_2d(n // n_f, n_f, self.cfg.width), dtype)[None]

    def cls_embedding(self, enc: nnx.Module, dtype=jnp.float32):
        """The CLS token with its position, ``[1, 1, D]`` (learned: slot 0; sincos: none)."""
        if self.cfg.pos_embed == "learned":
            return (enc.cls_token[...] + enc.pos_embed[:, :1]).astype(dtype)
        return enc.cls_token[...].astype(dtype)

    def embed(self, enc: nnx.Module, spec, mask=None, length=None):
        """Patch projection, mask-token substitution, positions, CLS: ``[B, F, T] → [B, N(+1), D]``.

        ``mask [B, N]`` (bool) replaces those tokens by ``mask_embed`` after the projection and before the
        positions, so a masked token still knows where it is. An AaPE branch sees only the visible tokens'
        frames (not masked, within ``length [B]`` valid frames), so nothing under the mask reaches the others.
        """
        dtype = jnp.dtype(self.cfg.dtype)
        x = enc.patch_embed(self.patchify(spec.astype(dtype)))
        aape = getattr(enc, "aape", None)
        if aape is not None:  # AaPE adds its alias-band features to the patch projection (models/aape.py)
            x = x + aape(spec, length, mask).astype(dtype)
        pos = self.token_positions(enc, x.shape[1], dtype)
        if mask is not None:
            x = jnp.where(mask[..., None], enc.mask_embed[...].astype(dtype), x)
        x = x + pos
        if enc.cls_token is not None:
            cls = self.cls_embedding(enc, dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])), x], axis=1)
        return x

    def embed_visible(self, enc: nnx.Module, spec, length, vis):
        """The kept tokens of M copies of each clip, for methods that drop the masked tokens instead of
        replacing them: ``vis [B, M, V]`` (each copy's visible patch-token indices) → ``[B·M, n_prefix + V, D]``,
        rows clip-major, the CLS token (with its position) in front of every copy.

        The patch projection runs once per clip and each copy gathers its tokens from it (a one-hot matmul,
        ``views.take_tokens``). An AaPE branch instead runs once per copy, with every token that copy does not
        keep hidden from it (``embed``'s mask rule), and is fused on the kept tokens only: its filter and
        whole-clip statistics would otherwise carry the dropped tokens' content into the kept ones. Without
        AaPE this is ``embed`` once per clip, gathered per copy.
        """
        dtype = jnp.dtype(self.cfg.dtype)
        b, m, v = vis.shape
        p = self.n_prefix
        aape = getattr(enc, "aape", None)
        if aape is None:
            x = self.embed(enc, spec, length=length)[:, p:]
            kept = take_tokens(x, vis.reshape(b, m * v)).reshape(b * m, v, -1)
        else:
            x = enc.patch_embed(self.patchify(spec.astype(dtype)))  # [B, N, D], once per clip
            n = x.shape[1]
            rows = vis.reshape(b * m, v)
            hidden = ~jnp.any(rows[:, :, None] == jnp.arange(n, dtype=rows.dtype), axis=1)  # [B·M, N]
            kept = take_tokens(x, vis.reshape(b, m * v)).reshape(b * m, v, -1)
            kept = kept + aape(spec, length, hidden, keep=rows).astype(dtype)
            kept = kept + jnp.take(self.token_positions(enc, n, dtype)[0], rows, axis=0)
        if p:
            cls = self.cls_embedding(enc, dtype)
            kept = jnp.concatenate([jnp.broadcast_to(cls, (b * m, 1, kept.shape[2])), kept], axis=1)
        return kept


@dataclasses.dataclass(frozen=True)
class FrameStem(_Stem):
    """ATST frame patches: all ``n_mels`` bins × ``patch_w`` frames per token (one token per 40 ms)."""

    _patch_kernel_init = "trunc_normal"
    default_features = "atst_logmel64"  # the feature set assumed when nothing records one: ATST's log-mel
    export_layout = "frameast"  # the official FrameAST layouts (atst_jax.export)

    def chunk_frames(self, trained_frames: int | None = None) -> int:
        """Inference's chunk (:func:`frame_chunk_frames`; the positions are always a learned table)."""
        return frame_chunk_frames(self.cfg.use_cls, trained_frames, self.cfg.patch_w, self.cfg.num_pos)

    @property
    def time_patch(self) -> int:
        """Frames per time step of tokens."""
        return self.cfg.patch_w

    @property
    def freq_patches(self) -> int:
        """Tokens per time step."""
        return 1

    def time_steps(self, tokens):
        """One token per time step: the tokens themselves."""
        return tokens

    @property
    def patch_dim(self) -> int:
        return self.cfg.n_mels * self.cfg.patch_w

    def grid(self, frames: int) -> tuple[int, int]:
        """``(time patches, freq patches)`` of a crop; frames are cut to a multiple of ``patch_w``."""
        return frames // self.cfg.patch_w, 1

    def token_lengths(self, length):
        """Valid tokens per example from valid frames (partial patches at the end are dropped)."""
        return (length - length % self.cfg.patch_w) // self.cfg.patch_w

    def patchify(self, spec):
        """``[B, F, T] -> [B, N, F * patch_w]`` with the mel-major flattening of the official PatchEmbed_v2."""
        b, f, t = spec.shape
        pw = self.cfg.patch_w
        n = t // pw
        x = spec[:, :, : n * pw].reshape(b, f, n, pw)
        return x.transpose(0, 2, 1, 3).reshape(b, n, f * pw)

    def unpatchify(self, patches):
        """Inverse of ``patchify``: ``[B, N, F * patch_w] -> [B, F, N * patch_w]``."""
        b, n, _ = patches.shape
        f, pw = self.cfg.n_mels, self.cfg.patch_w
        return patches.reshape(b, n, f, pw).transpose(0, 2, 1, 3).reshape(b, f, n * pw)


@dataclasses.dataclass(frozen=True)
class PatchStem2D(_Stem):
    """Non-overlapping ``patch_size = (p_t, p_f)`` patches over (time, mel), tokens time-major.

    The patch kernel starts from PyTorch's default conv init, U(±1/√(p_t·p_f)), with a zero bias: ASiT's
    ViT re-initialises only its Linear layers (trunc-normal 0.02) and leaves the patch conv at that default.
    """

    _patch_kernel_init = "torch_default"
    default_features = "kaldi_fbank128"  # what the official ViT layout's models were trained on
    export_layout = "vit"  # the official ViT layout (ASiT's vision_transformer.py; transformers' ViTModel)

    def chunk_frames(self, trained_frames: int | None = None) -> int:
        """Inference's chunk (:func:`patch2d_chunk_frames`)."""
        return patch2d_chunk_frames(self.cfg, trained_frames)

    @property
    def time_patch(self) -> int:
        """Frames per time step of tokens (a column of patches)."""
        return self.cfg.patch_size[0]

    @property
    def freq_patches(self) -> int:
        """Tokens per time step: the column's frequency patches."""
        return self.cfg.n_mels // self.cfg.patch_size[1]

    @property
    def patch_dim(self) -> int:
        p_t, p_f = self.cfg.patch_size
        return p_t * p_f

    def grid(self, frames: int) -> tuple[int, int]:
        """``(time patches, freq patches)``; frames are cut to a multiple of ``p_t`` (ASiT: 592 × 128 → 37 × 8)."""
        p_t, p_f = self.cfg.patch_size
        return frames // p_t, self.cfg.n_mels // p_f

    def token_lengths(self, length):
        """Valid tokens from valid frames: whole time patches only (the AST/ASiT convention) × freq patches."""
        p_t, p_f = self.cfg.patch_size
        return (length // p_t) * (self.cfg.n_mels // p_f)

    def patchify(self, spec):
        """``[B, F, T] -> [B, n_t · n_f, p_t · p_f]``: token ``t · n_f + f`` holds
        ``spec[:, f·p_f + df, t·p_t + dt]`` at feature ``dt · p_f + df``."""
        b, f, t = spec.shape
        p_t, p_f = self.cfg.patch_size
        n_t, n_f = t // p_t, f // p_f
        x = spec[:, :, : n_t * p_t].reshape(b, n_f, p_f, n_t, p_t)
        return x.transpose(0, 3, 1, 4, 2).reshape(b, n_t * n_f, p_t * p_f)

    def unpatchify(self, patches):
        """Inverse of ``patchify``: ``[B, n_t · n_f, p_t · p_f] -> [B, n_mels, n_t · p_t]``."""
        b, n, _ = patches.shape
        p_t, p_f = self.cfg.patch_size
        n_f = self.cfg.n_mels // p_f
        n_t = n // n_f
        x = patches.reshape(b, n_t, n_f, p_t, p_f)
        return x.transpose(0, 2, 4, 1, 3).reshape(b, n_f * p_f, n_t * p_t)


STEMS = {"frame": FrameStem, "patch2d": PatchStem2D}
POS_EMBEDS = ("learned", "sincos2d")


def make_stem(cfg) -> _Stem:
    return STEMS[cfg.stem](cfg)


def export_layout(model_config) -> str:
    """The PyTorch layout of the encoder a run's ``config["model"]`` (a plain dict, or None: ATST's frame stem)
    describes: ``"frameast"`` or ``"vit"``."""
    name = (model_config or {}).get("stem", "frame")
    if name not in STEMS:
        raise ValueError(f"model.stem={name!r}: not a stem ({', '.join(STEMS)})")
    return STEMS[name].export_layout
