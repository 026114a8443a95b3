"""A PyTorch 2-D patch ViT under the module names of ASiT's ``vision_transformer.py``, a Kaldi fbank front end
in PyTorch, and chunked timestamp / scene embeddings of whole clips.

Written from the official file's structure (not copied): ``patch_embed.proj`` (``Conv2d(in_chans, D,
kernel = stride = patch)``), ``cls_token [1, 1, D]``, ``pos_embed [1, 1 + N, D]`` (CLS at slot 0),
``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` and ``norm``; pre-norm blocks,
LayerNorm eps 1e-6, exact (erf) GELU, qkv with bias, attention scale ``hd^-0.5``; no classifier parameters
(``head`` is an identity with ``num_classes=0``). Its ``state_dict`` is what ``python -m atst_jax.export
--format safetensors`` writes for a 2-D patch run, so the file loads ``strict=True`` here, into the official
``VisionTransformer(audio_size=[592, 128], patch_size=[16, 16], in_chans=1, qkv_bias=True, eps 1e-6)`` and into
AST-style fine-tuning code that uses those names.

Input is the official one: a normalised fbank ``[B, 1, T, n_mels]`` (time, then mel; ``[B, T, n_mels]`` is
accepted too), tokens time-major (``t_patch · n_freq_patches + f_patch``, the conv output flattened). Without
``length`` the computation is the official ViT's exactly (every token attends to every token); with
``length [B]`` (valid frames) the tokens of padded time columns are masked as keys (−10000), so a
zero-padded last chunk gives the same valid outputs as the JAX encoder. The official ViT takes exactly
``audio_size[0]`` frames (its positions are added whole); shorter inputs use the first positions here, as
the JAX encoder does.

``norm_style="post"`` is EAT's trunk (``EncoderConfig.norm_style="post"``, data2vec 2.0's
``layer_norm_first=False``): a LayerNorm ``embed_norm`` on the embedded tokens (positions added, CLS in
front), post-norm blocks (``x = norm1(x + attn(x))``, then ``norm2(x + mlp(x))``) and no final LayerNorm
(``norm`` is an ``nn.Identity``). Its ``state_dict`` is the layout above with ``embed_norm.{weight,bias}``
after ``patch_embed.proj.*`` and no ``norm.*`` (what the export writes for such an encoder; metadata
``format=asit_encoder+postnorm``); ``from_state_dict`` tells the two layouts apart by those keys. It does not
load into the official ASiT ViT, which is pre-norm.

The front end is the Kaldi fbank of the feature set the encoder was trained on (``KaldiFbank``, read from
``atst_jax.features``): ``kaldi_fbank128`` (ASiT's, 32 kHz, the default) or EAT's ``kaldi_fbank128_16k``
(16 kHz, bins up to 8 kHz, EAT's normalisation); an export records which (metadata ``features``), and
``atst_jax.export.hear`` builds the embedder with it.

The inference conventions (whole-clip front end with the wave's mean removed, chunks of the positions' length
— 592 frames — on a global grid, time step = one column of patches = 16 frames, timestamp embedding = the mean
of the column's frequency patches, ``160·c + 87.5`` ms, scene = ``[CLS ‖ mean of patch tokens]``) are
documented in ``atst_jax.inference`` and shared with the JAX embedder (``atst_jax.embed``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atst_jax import features as feature_sets
from atst_jax.inference import FRONT_ENDS, chunk_bounds, front_end

LN_EPS = 1e-6
PAD_LOGIT = -10000.0
FEATURES = "kaldi_fbank128"  # the default front end: ASiT's (what the official ViT layout's models take)
SAMPLE_RATE = front_end(FEATURES).sample_rate  # 32 kHz
# The front ends ``KaldiFbank`` computes: every Kaldi fbank feature set inference has a front end for (ASiT's
# ``kaldi_fbank128`` at 32 kHz, EAT's ``kaldi_fbank128_16k``); rate, frames and normalisation come from each
# one's ``atst_jax.features`` entry.
SUPPORTED_FEATURES = tuple(name for name in FRONT_ENDS if feature_sets.get(name).kind == "kaldi_fbank")


# ----------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """``patch_embed.proj``: a conv with kernel = stride = ``patch_size`` over ``[B, C, T, n_mels]``."""

    def __init__(self, patch_size=(16, 16), in_chans: int = 1, embed_dim: int = 768):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):  # [B, C, T, F] -> [B, (T // p_t) · (F // p_f), D], time-major
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_bias=None):
        b, n, d = x.shape
        # Rows of qkv are [q; k; v], each head-major: [3, B, H, N, hd].
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (qkv[0] @ qkv[1].transpose(-2, -1)) * self.scale
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, :]
        out = logits.softmax(dim=-1) @ qkv[2]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


NORM_STYLES = ("pre", "post")


class Block(nn.Module):
    """Pre-norm (``norm_style="pre"``) or EAT's post-norm block; drop-path is the identity at inference and
    left out (it holds no parameters)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_style: str = "pre"
    ):
        super().__init__()
        if norm_style not in NORM_STYLES:
            raise ValueError(f"norm_style must be pre or post, got {norm_style!r}")
        self.post_norm = norm_style == "post"
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, key_bias=None):
        if self.post_norm:
            x = self.norm1(x + self.attn(x, key_bias))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), key_bias)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """The 2-D patch encoder (see the module docstring); the defaults are ASiT's ViT-B at 592 × 128."""

    def __init__(
        self,
        audio_size=(592, 128),
        patch_size=(16, 16),
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_style: str = "pre",
    ):
        super().__init__()
        self.audio_size = tuple(int(a) for a in audio_size)
        self.embed_dim = self.width = embed_dim
        self.depth = depth
        self.norm_style = norm_style
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        p_t, p_f = self.patch_embed.patch_size
        self.n_freq_patches = self.audio_size[1] // p_f
        num_patches = (self.audio_size[0] // p_t) * self.n_freq_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        # Post-norm (EAT): a LayerNorm on the embedded tokens, no final norm (the identity holds no keys).
        self.embed_norm = nn.LayerNorm(embed_dim, eps=LN_EPS) if norm_style == "post" else None
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_style) for _ in range(depth)]
        )
        self.norm = nn.Identity() if norm_style == "post" else nn.LayerNorm(embed_dim, eps=LN_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def patch_t(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def n_mels(self) -> int:
        return self.audio_size[1]

    @classmethod
    def from_state_dict(
        cls, sd, heads: int | None = None, n_mels: int = 128, strict: bool = True
    ) -> VisionTransformer:
        """A ViT shaped after ``sd`` (bare official keys), loaded with ``load_state_dict(strict=...)``.

        Neither the head count nor the mel bins can be read off the weights: heads default to
        ``width // 64`` (every official ViT), ``n_mels`` to 128; the frames of ``audio_size`` follow from
        ``pos_embed``; ``embed_norm.*`` keys make it the post-norm (EAT) layout.
        """
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        width, in_chans, p_t, p_f = (int(x) for x in sd["patch_embed.proj.weight"].shape)
        heads = heads if heads is not None else width // 64
        n_f = n_mels // p_f
        num_patches = sd["pos_embed"].shape[1] - 1
        if num_patches % n_f:
            raise ValueError(
                f"pos_embed holds {num_patches} patches: not whole columns of {n_f} (n_mels={n_mels})"
            )
        model = cls(
            audio_size=(num_patches // n_f * p_t, n_mels),
            patch_size=(p_t, p_f),
            in_chans=in_chans,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            norm_style="post" if "embed_norm.weight" in sd else "pre",
        )
        model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=strict)
        return model

    def valid_tokens(self, length):
        """Patch tokens of whole time columns within ``length`` valid frames (CLS not counted)."""
        return torch.div(length, self.patch_t, rounding_mode="floor") * self.n_freq_patches

    def prepare_tokens(self, x, length=None):
        """``(tokens [B, 1 + N, D] as the first block takes them: positions added, post-norm also through
        embed_norm; key_bias [B, 1 + N] or None)``."""
        if x.dim() == 3:  # [B, T, F]
            x = x[:, None]
        if x.shape[-1] != self.n_mels:
            raise ValueError(f"input has {x.shape[-1]} mel bins; this encoder takes {self.n_mels}")
        tokens = self.patch_embed(x)
        if getattr(self, "aape", None) is not None:  # AaPE exports (torch_aape.AaPEViT)
            tokens = tokens + self.aape_tokens(x, length)
        x = tokens
        n = x.shape[1]
        if n + 1 > self.pos_embed.shape[1]:
            raise ValueError(f"{n} tokens exceed the {self.pos_embed.shape[1] - 1} positional slots")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : n + 1]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if length is None:
            return x, None
        valid = self.valid_tokens(torch.as_tensor(length, device=x.device)) + 1
        pos = torch.arange(n + 1, device=x.device)
        key_bias = torch.where(pos[None, :] < valid[:, None], 0.0, PAD_LOGIT).to(x.dtype)
        return x, key_bias

    def forward(self, x, length=None):
        """Final-normed tokens ``[B, 1 + N, D]`` (CLS first; post-norm: the last block's output); without
        ``length``, the official ViT's output."""
        x, key_bias = self.prepare_tokens(x, length)
        for blk in self.blocks:
            x = blk(x, key_bias)
        return self.norm(x)

    def block_outputs(self, x, length=None, n: int = 1):
        """The last ``n`` blocks, each through the final norm (post-norm: as they are), concatenated on
        channels: ``[B, 1 + N, n·D]``."""
        if not 1 <= n <= self.depth:
            raise ValueError(f"n={n} must be between 1 and the depth {self.depth}")
        x, key_bias = self.prepare_tokens(x, length)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, key_bias)
            if i >= self.depth - n:
                feats.append(self.norm(x))
        return torch.cat(feats, dim=-1)

    def column_outputs(self, x, length=None, n: int = 1):
        """:meth:`block_outputs` with each time column's ``n_mels / p_f`` patch tokens averaged:
        ``[B, 1 + T // p_t, n·D]``, the CLS row first (the timestamp embeddings, one per 16 frames)."""
        out = self.block_outputs(x, length, n)
        b, n_tok, c = out.shape
        cols = out[:, 1:].reshape(b, (n_tok - 1) // self.n_freq_patches, self.n_freq_patches, c).mean(dim=2)
        return torch.cat([out[:, :1], cols], dim=1)

    def scene_features(self, x, length=None, n: int = 1):
        """One chunk's ``[CLS ‖ mean over valid patch tokens]`` of the last ``n`` blocks: ``[B, 2·n·D]``
        (``[CLS of block L−n+1, …, CLS of block L, mean of block L−n+1, …]``)."""
        out = self.block_outputs(x, length, n)
        tokens = out[:, 1:]
        if length is None:
            mean = tokens.mean(dim=1)
        else:
            valid = self.valid_tokens(torch.as_tensor(length, device=out.device))
            w = (torch.arange(tokens.shape[1], device=out.device)[None, :] < valid[:, None]).to(out.dtype)
            mean = (tokens * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        return torch.cat([out[:, 0], mean], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Front end: Kaldi log mel fbank (torchaudio.compliance.kaldi.fbank's maths, the ASiT/AST and EAT settings)
# ----------------------------------------------------------------------------------------------------------


def kaldi_mel_banks(sample_rate: int, n_mels: int, n_fft: int, low_freq: float = 20.0, dtype=torch.float64):
    """Kaldi's triangles ``[n_fft // 2 + 1, n_mels]`` on the mel scale ``1127 · ln(1 + f / 700)``: ``n_mels + 2``
    corners equally spaced in mel from ``low_freq`` to Nyquist, evaluated at FFT bins ``0 … n_fft/2 − 1``; the
    Nyquist bin weighs 0.

    The weights are computed in float32 (Kaldi's ``BaseFloat``; the corners from double-precision scalars),
    as the reference implementations do: near a triangle's ends a weight is a small difference of mel
    values, and exact arithmetic there moves a log fbank value by up to ~1e-3 against them.
    """
    f32 = torch.float32
    mel_lo = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_hi = 1127.0 * math.log(1.0 + 0.5 * sample_rate / 700.0)
    delta = (mel_hi - mel_lo) / (n_mels + 1)
    i = torch.arange(n_mels, dtype=f32)[None, :]
    left, centre, right = mel_lo + i * delta, mel_lo + (i + 1.0) * delta, mel_lo + (i + 2.0) * delta
    freq = (sample_rate / n_fft) * torch.arange(n_fft // 2, dtype=f32)
    bins = (1127.0 * (1.0 + freq / 700.0).log())[:, None]
    tri = torch.minimum((bins - left) / (centre - left), (right - bins) / (right - centre)).clamp_min(0.0)
    return F.pad(tri, (0, 0, 0, 1)).to(dtype)


class KaldiFbank(nn.Module):
    """Normalised Kaldi fbank of ``wave [B, samples]`` → ``float32 [B, frames, n_mels]`` (the ViT's input).

    ``features`` names the feature set (``atst_jax.features``, one of ``SUPPORTED_FEATURES``) whose front end
    this is: its sample rate (32 kHz for ``kaldi_fbank128``, 16 kHz for EAT's ``kaldi_fbank128_16k``), mel
    bins (upper edge: that rate's Nyquist frequency), frame geometry and normalisation ``x · scale + offset``
    (``(x + 4.2677393) / (2 · 4.5689974)``; EAT's ``(x + 4.268) / (2 · 4.569)``) are read from it. ``n_mels``
    overrides the set's bin count (an encoder trained on another count; the set's normalisation stays).

    25 ms Hann windows (symmetric) every 10 ms, only frames that fit (``1 + (N − window) // hop``), per
    frame: mean removed, pre-emphasis 0.97 (first sample against itself), window, zero padding to the next
    power of two, power spectrum, Kaldi mel banks from 20 Hz to Nyquist, ``ln(max(·, float32 eps))``; no
    dither. As ASiT's and EAT's data code, the mean of the whole wave is removed first. Computed in float64
    over blocks of ``block_frames`` frames (memory bounded on long audio).
    """

    def __init__(
        self,
        features: str = FEATURES,
        n_mels: int | None = None,
        block_frames: int = 2000,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        if features not in SUPPORTED_FEATURES:
            raise ValueError(
                f"no PyTorch front end for feature set {features!r}; KaldiFbank computes "
                f"{', '.join(SUPPORTED_FEATURES)}"
            )
        fs = feature_sets.get(features)
        self.features, self.feature_set = features, fs
        self.sample_rate, self.n_mels, self.block_frames, self.dtype = (
            fs.sample_rate,
            fs.n_mels if n_mels is None else int(n_mels),
            block_frames,
            dtype,
        )
        self.window_size, self.hop = fs.window_length, fs.hop_length
        self.n_fft = 1 << (self.window_size - 1).bit_length()
        self.eps = float(torch.finfo(torch.float32).eps)
        # Non-persistent buffers: never part of an exported state_dict.
        self.register_buffer(
            "window", torch.hann_window(self.window_size, periodic=False, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "banks", kaldi_mel_banks(self.sample_rate, self.n_mels, self.n_fft, dtype=dtype), persistent=False
        )

    def num_frames(self, samples: int) -> int:
        return 0 if samples < self.window_size else 1 + (samples - self.window_size) // self.hop

    def log_fbank(self, wave):
        """Un-normalised log fbank ``float32 [B, frames, n_mels]`` (what torchaudio's kaldi.fbank returns)."""
        wave = wave.to(self.dtype)
        wave = wave - wave.mean(dim=-1, keepdim=True)
        frames = self.num_frames(wave.shape[-1])
        if frames == 0:
            raise ValueError(f"audio of {wave.shape[-1]} samples is shorter than one 25 ms window")
        view = wave.unfold(-1, self.window_size, self.hop)  # [B, frames, window], a view
        out = []
        for start in range(0, frames, self.block_frames):
            x = view[:, start : start + self.block_frames]
            x = x - x.mean(dim=-1, keepdim=True)
            x = x - 0.97 * torch.cat([x[..., :1], x[..., :-1]], dim=-1)
            spec = torch.fft.rfft(x * self.window, n=self.n_fft)
            power = spec.real.square() + spec.imag.square()
            out.append(torch.log((power @ self.banks).clamp_min(self.eps)))
        return torch.cat(out, dim=1).to(torch.float32)

    def forward(self, wave):
        return self.feature_set.normalize(self.log_fbank(wave))


# ----------------------------------------------------------------------------------------------------------
# Chunked embeddings of whole clips
# ----------------------------------------------------------------------------------------------------------


class ViTEmbedder(nn.Module):
    """Front end + ViT + chunking: timestamp and scene embeddings of whole clips of any length.

    ``n_blocks``: how many of the last blocks are concatenated (default: all). ``chunk_frames``: default the
    positions' length (``audio_size[0]``, 592). At most ``max_chunks`` chunks go through the encoder per
    call, so memory does not grow with the clip. ``timestamp_embedding_size = n·D`` (one per 16-frame
    column, the mean of its frequency patches); ``scene_embedding_size = 2·n·D`` (``[CLS ‖ mean]``, the CLS
    of each chunk weighted by its columns). ``features``: the front end the encoder was trained on (what an
    export records; one of ``SUPPORTED_FEATURES``): ``sample_rate`` is its rate, 32000 for ``kaldi_fbank128``
    (the default, ASiT's), 16000 for EAT's ``kaldi_fbank128_16k``; any other set is refused (``ValueError``).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        n_blocks: int | None = None,
        max_chunks: int = 8,
        chunk_frames: int | None = None,
        features: str = FEATURES,
    ):
        super().__init__()
        self.encoder = encoder
        self.frontend = KaldiFbank(features, n_mels=encoder.n_mels)
        self.features = features
        self.sample_rate = self.frontend.sample_rate
        self.n_blocks = encoder.depth if n_blocks is None else int(n_blocks)
        if not 1 <= self.n_blocks <= encoder.depth:
            raise ValueError(f"n_blocks={self.n_blocks} must be between 1 and the depth {encoder.depth}")
        self.max_chunks = max_chunks
        self.chunk_frames = encoder.audio_size[0] if chunk_frames is None else int(chunk_frames)
        p_t = encoder.patch_t
        if self.chunk_frames % p_t or not p_t <= self.chunk_frames <= encoder.audio_size[0]:
            raise ValueError(
                f"chunk_frames={self.chunk_frames} must be a multiple of {p_t} between {p_t} and the "
                f"{encoder.audio_size[0]} frames of the positions"
            )
        self.timestamp_embedding_size = self.n_blocks * encoder.width
        self.scene_embedding_size = 2 * self.timestamp_embedding_size

    @torch.no_grad()
    def _encode(self, spec):
        """``(columns [B, frames // p_t, n·D], clip CLS [B, n·D])`` of full-length fbanks ``[B, frames, F]``."""
        b, frames, _ = spec.shape
        p_t = self.encoder.patch_t
        bounds = chunk_bounds(frames, self.chunk_frames, p_t)
        jobs = [(i, s, e) for i in range(b) for s, e in bounds]
        width = self.timestamp_embedding_size
        out = spec.new_zeros(b, frames // p_t, width)
        cls = spec.new_zeros(b, width)
        for j in range(0, len(jobs), self.max_chunks):
            group = jobs[j : j + self.max_chunks]
            longest = max(e - s for _, s, e in group) // p_t * p_t
            x = spec.new_zeros(len(group), 1, longest, spec.shape[2])
            for k, (i, s, e) in enumerate(group):
                n = (e - s) // p_t * p_t
                x[k, 0, :n] = spec[i, s : s + n]
            length = torch.tensor([e - s for _, s, e in group], device=spec.device)
            feats = self.encoder.column_outputs(x, length, self.n_blocks)
            for k, (i, s, e) in enumerate(group):
                n = (e - s) // p_t
                out[i, s // p_t : s // p_t + n] = feats[k, 1 : 1 + n]
                cls[i] += n * feats[k, 0]
        cls /= frames // p_t
        return out, cls

    @torch.no_grad()
    def spec_embeddings(self, spec):
        """Timestamp embeddings ``[B, frames // p_t, n·D]`` of normalised fbanks ``[B, frames, n_mels]``."""
        return self._encode(spec)[0]

    def _spec(self, wave):
        spec = self.frontend(wave)
        if spec.shape[1] < self.encoder.patch_t:
            raise ValueError(
                f"audio of {wave.shape[-1]} samples gives {spec.shape[1]} frames: shorter than one "
                f"{self.encoder.patch_t}-frame column of patches"
            )
        return spec

    def timestamps_ms(self, steps: int):
        return torch.from_numpy(front_end(self.features).timestamps_ms(steps, self.encoder.patch_t))

    @torch.no_grad()
    def timestamp_embeddings(self, wave):
        """``wave [B, samples]`` (at ``sample_rate``) → ``(emb [B, C, n·D], timestamps_ms [B, C])``,
        C = frames // 16."""
        emb = self.spec_embeddings(self._spec(wave))
        ts = self.timestamps_ms(emb.shape[1]).to(device=emb.device, dtype=torch.float32)
        return emb, ts[None].expand(emb.shape[0], -1)

    @torch.no_grad()
    def scene_embeddings(self, wave):
        """``[B, 2·n·D]``: ``[clip CLS ‖ mean of the timestamp embeddings]`` (= the mean of all patch tokens)."""
        columns, cls = self._encode(self._spec(wave))
        return torch.cat([cls, columns.mean(dim=1)], dim=-1)
