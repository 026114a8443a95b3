"""A PyTorch FrameAST written from spec/torch_export.md, plus the ATST front end and long-audio chunking.

The module tree is named so that its ``state_dict`` keys are exactly the official ones (138 for ATST-Frame,
139 for ATST-Clip): a safetensors export of this repository loads with ``load_state_dict(strict=True)``, and
so do weights taken out of official checkpoints. The computation is plain PyTorch; the filterbank, window and
constants of ``atst_jax.audio`` and the chunk grid, timestamps and scene-embedding rule of
``atst_jax.inference`` are reused, so both sides use the very same numbers (importing this module therefore
imports the atst_jax package, JAX included). The conventions themselves are documented in
``atst_jax.inference``; in short: whole-clip front end, chunks of ``chunk_frames`` on a global 40 ms grid
(1000 frames for ATST-Frame, the pretraining crop for ATST-Clip), the last n blocks through the final norm
concatenated, tokens at their centres ``40·j + 15`` ms; scene = mean of tokens (Frame) or
``[CLS ‖ mean]`` with the per-chunk CLS weighted by the chunk's tokens (Clip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atst_jax import audio

# The chunking, timestamp and scene conventions are defined once, for the JAX and the PyTorch side.
from atst_jax.inference import chunk_bounds, default_chunk_frames, timestamps_ms

LN_EPS = 1e-6
PAD_LOGIT = -10000.0


# ----------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """``patch_embed.patch_embed``: Linear over a 64 × 4 patch flattened mel-major (index ``mel·4 + t``)."""

    def __init__(self, n_mels: int, patch_w: int, width: int):
        super().__init__()
        self.patch_w = patch_w
        self.patch_embed = nn.Linear(n_mels * patch_w, width)

    def forward(self, spec):  # [B, F, T] -> [B, T // patch_w, D]
        b, f, t = spec.shape
        n = t // self.patch_w
        x = spec[:, :, : n * self.patch_w].reshape(b, f, n, self.patch_w)
        return self.patch_embed(x.permute(0, 2, 1, 3).reshape(b, n, f * self.patch_w))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x, key_bias):
        b, n, d = x.shape
        # Rows of qkv.weight are [q; k; v], each head-major: split to [3, B, H, N, hd].
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q * self.scale) @ k.transpose(-2, -1) + key_bias[:, None, None, :]
        out = logits.softmax(dim=-1) @ v  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact erf GELU (approximate="none"), as the official code
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; drop-path is an identity at inference and therefore left out."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x, key_bias):
        x = x + self.attn(self.norm1(x), key_bias)
        return x + self.mlp(self.norm2(x))


class FrameAST(nn.Module):
    """The ATST-Frame encoder (``use_cls=True``: the ATST-Clip variant with ``cls_token`` and ``norm``).

    Input: normalised log-mel ``[B, n_mels, T]`` (or ``[B, 1, n_mels, T]``) and the valid frames ``[B]``.
    """

    def __init__(
        self,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        n_mels: int = 64,
        patch_w: int = 4,
        num_pos: int = 251,
        use_cls: bool = False,
    ):
        super().__init__()
        self.width, self.depth, self.heads, self.patch_w = width, depth, heads, patch_w
        self.use_cls = use_cls
        if use_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, width))
        self.patch_embed = PatchEmbed(n_mels, patch_w, width)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        if use_cls:
            self.norm = nn.LayerNorm(width, eps=LN_EPS)
        else:
            self.norm_frame = nn.LayerNorm(width, eps=LN_EPS)
        for p in (self.mask_embed, self.pos_embed) + ((self.cls_token,) if use_cls else ()):
            nn.init.trunc_normal_(p, std=0.02)

    @classmethod
    def from_state_dict(cls, sd, heads: int | None = None, strict: bool = True) -> FrameAST:
        """An encoder shaped after ``sd`` (bare keys), loaded with ``load_state_dict(strict=...)``.

        Heads default to ``width // 64`` (the official head dim); the weights themselves do not tell.
        """
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        width = sd["mask_embed"].shape[-1]
        heads = heads if heads is not None else width // 64
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
        n_mels_x_w = sd["patch_embed.patch_embed.weight"].shape[1]
        model = cls(
            width=width,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            n_mels=n_mels_x_w // 4,
            num_pos=sd["pos_embed"].shape[1],
            use_cls="cls_token" in sd,
        )
        model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=strict)
        return model

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.norm if self.use_cls else self.norm_frame

    def _tokens(self, spec, length):
        if spec.dim() == 4:  # [B, 1, F, T] as the official transforms produce
            spec = spec.squeeze(1)
        x = self.patch_embed(spec)
        if getattr(self, "aape", None) is not None:  # AaPE exports (torch_aape.AaPEFrameAST)
            x = x + self.aape_tokens(spec, length)
        n = x.shape[1]
        if n + 1 > self.pos_embed.shape[1]:
            raise ValueError(f"{n} tokens exceed the {self.pos_embed.shape[1] - 1} positional slots")
        x = x + self.pos_embed[:, 1 : n + 1]  # ATST-Frame: slots 1..N, slot 0 unused
        valid = torch.div(length, self.patch_w, rounding_mode="floor")
        if self.use_cls:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
            valid = valid + 1
        pos = torch.arange(x.shape[1], device=x.device)
        key_bias = torch.where(pos[None, :] < valid[:, None], 0.0, PAD_LOGIT).to(x.dtype)
        return x, key_bias

    def forward(self, spec, length):
        """Final-normed tokens ``[B, N(+1), D]``."""
        x, key_bias = self._tokens(spec, length)
        for blk in self.blocks:
            x = blk(x, key_bias)
        return self.final_norm(x)

    def block_outputs(self, spec, length, n: int = 1):
        """The last ``n`` blocks, each through the final norm, concatenated on channels: ``[B, N(+1), n·D]``,
        the CLS row first for ATST-Clip (``[CLS of block L−n+1, …, CLS of block L]`` on channels)."""
        if not 1 <= n <= self.depth:
            raise ValueError(f"n={n} must be between 1 and the depth {self.depth}")
        x, key_bias = self._tokens(spec, length)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, key_bias)
            if i >= self.depth - n:
                feats.append(self.final_norm(x))
        return torch.cat(feats, dim=-1)

    def get_intermediate_layers(self, spec, length, n: int = 1, scene: bool = True):
        """Frame level (``scene=False``): :meth:`block_outputs` without the CLS row, ``[B, N, n·D]``.
        Scene level (``scene=True``), for one chunk: the mean over the valid tokens ``[B, n·D]``, and for
        ATST-Clip ``[CLS ‖ mean]`` ``[B, 2·n·D]`` (the official ``get_intermediate_layers_chunks`` order)."""
        out = self.block_outputs(spec, length, n)
        cls, out = (out[:, 0], out[:, 1:]) if self.use_cls else (None, out)
        if not scene:
            return out
        valid = torch.div(length, self.patch_w, rounding_mode="floor")
        w = (torch.arange(out.shape[1], device=out.device)[None, :] < valid[:, None]).to(out.dtype)
        mean = (out * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        return mean if cls is None else torch.cat([cls, mean], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Front end (the same maths as atst_jax.audio.log_mel_np)
# ----------------------------------------------------------------------------------------------------------


class LogMel(nn.Module):
    """Normalised ATST log-mel of ``[B, samples]`` → ``float32 [B, 64, samples // 160 + 1]``.

    Computed in float64 (as the NumPy reference) so the JAX and PyTorch paths see the same input to within
    float32 rounding; the STFT runs over blocks of ``block_frames`` frames, which bounds its memory on long
    audio. Waves shorter than 513 samples are zero-padded before the reflect padding, as in ``atst_jax.audio``.
    """

    def __init__(self, block_frames: int = 2000, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.block_frames = block_frames
        self.dtype = dtype
        # Buffers (not parameters) and non-persistent: they are not part of any exported state_dict.
        self.register_buffer("window", torch.from_numpy(audio.hann_window()).to(dtype), persistent=False)
        self.register_buffer(
            "mel_fb", torch.from_numpy(audio.mel_filterbank()).to(dtype), persistent=False
        )  # [513, 64]

    def mel_power(self, wave):
        """``[B, T, 64]`` mel power, block by block over frames."""
        wave = wave.to(self.dtype)
        length = wave.shape[-1]
        if length < 1:
            raise ValueError("cannot compute a spectrogram of an empty wave (0 samples)")
        frames = audio.num_frames(length)
        min_len = audio.N_FFT // 2 + 1
        if length < min_len:
            wave = F.pad(wave, (0, min_len - length))
        pad = audio.N_FFT // 2
        padded = F.pad(wave[:, None], (pad, pad), mode="reflect")[:, 0]
        out = []
        for start in range(0, frames, self.block_frames):
            stop = min(start + self.block_frames, frames)
            # Frame k covers padded[k·hop : k·hop + n_fft]; center=False on the slice reproduces center=True.
            seg = padded[:, start * audio.HOP_LENGTH : (stop - 1) * audio.HOP_LENGTH + audio.N_FFT]
            spec = torch.stft(
                seg,
                audio.N_FFT,
                hop_length=audio.HOP_LENGTH,
                win_length=audio.WIN_LENGTH,
                window=self.window,
                center=False,
                return_complex=True,
            )  # [B, 513, frames]
            power = spec.real.square() + spec.imag.square()
            out.append(power.transpose(1, 2) @ self.mel_fb)
        return torch.cat(out, dim=1)

    def forward(self, wave):
        mel = self.mel_power(wave).transpose(1, 2)  # [B, 64, T]
        db = 10.0 * torch.log10(mel.clamp_min(audio.AMIN))
        peak = db.amax(dim=(-2, -1), keepdim=True)
        db = torch.maximum(db, peak - audio.TOP_DB).to(torch.float32)  # float32 before normalising, as NumPy
        return audio.normalize_db(db)


# ----------------------------------------------------------------------------------------------------------
# Chunked embeddings of whole clips
# ----------------------------------------------------------------------------------------------------------


class ATSTEmbedder(nn.Module):
    """Front end + encoder + chunking: timestamp and scene embeddings of whole clips of any length, for
    ATST-Frame and ATST-Clip encoders.

    ``n_blocks``: how many of the last blocks are concatenated (default: all of them, as the official HEAR
    wrapper does, giving ``depth·D`` channels). ``chunk_frames``: the encoder's chunk length (default: the
    kind's, see ``atst_jax.inference.default_chunk_frames``). ``max_chunks`` bounds how many chunks go
    through the encoder in one call, so peak memory does not grow with the clip length.
    ``timestamp_embedding_size`` is ``n·D``; ``scene_embedding_size`` is ``n·D`` (Frame) or ``2·n·D`` (Clip).
    """

    def __init__(
        self,
        encoder: FrameAST,
        n_blocks: int | None = None,
        max_chunks: int = 8,
        chunk_frames: int | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.frontend = LogMel()
        self.n_blocks = encoder.depth if n_blocks is None else n_blocks
        if not 1 <= self.n_blocks <= encoder.depth:
            raise ValueError(f"n_blocks={self.n_blocks} must be between 1 and the depth {encoder.depth}")
        self.max_chunks = max_chunks
        self.chunk_frames = (
            default_chunk_frames(encoder.use_cls, patch_w=encoder.patch_w, num_pos=encoder.pos_embed.shape[1])
            if chunk_frames is None
            else chunk_frames
        )
        self.timestamp_embedding_size = self.n_blocks * encoder.width
        self.scene_embedding_size = self.timestamp_embedding_size * (2 if encoder.use_cls else 1)

    @torch.no_grad()
    def _encode(self, spec):
        """``(tokens [B, frames // 4, n·D], clip CLS [B, n·D] or None)`` of full-length spectrograms
        ``[B, F, frames]``; the clip CLS is the token-weighted mean of the per-chunk CLS features."""
        b, _, frames = spec.shape
        pw = self.encoder.patch_w
        bounds = chunk_bounds(frames, self.chunk_frames, pw)
        jobs = [(i, s, e) for i in range(b) for s, e in bounds]
        width = self.timestamp_embedding_size
        out = spec.new_zeros(b, frames // pw, width)
        cls = spec.new_zeros(b, width) if self.encoder.use_cls else None
        for j in range(0, len(jobs), self.max_chunks):
            group = jobs[j : j + self.max_chunks]
            longest = max(e - s for _, s, e in group)
            x = spec.new_zeros(len(group), spec.shape[1], longest)
            for k, (i, s, e) in enumerate(group):
                x[k, :, : e - s] = spec[i, :, s:e]
            length = torch.tensor([e - s for _, s, e in group], device=spec.device)
            feats = self.encoder.block_outputs(x, length, self.n_blocks)
            prefix = 1 if cls is not None else 0
            for k, (i, s, e) in enumerate(group):
                n = (e - s) // pw
                out[i, s // pw : s // pw + n] = feats[k, prefix : prefix + n]
                if cls is not None:
                    cls[i] += n * feats[k, 0]
        if cls is not None:
            cls /= frames // pw
        return out, cls

    @torch.no_grad()
    def spec_embeddings(self, spec):
        """Timestamp embeddings ``[B, frames // 4, n·D]`` of full-length spectrograms ``[B, F, frames]``."""
        return self._encode(spec)[0]

    def _check_length(self, wave):
        if audio.num_frames(wave.shape[-1]) // self.encoder.patch_w == 0:
            raise ValueError(f"audio of {wave.shape[-1]} samples is shorter than one 40 ms token")

    @torch.no_grad()
    def timestamp_embeddings(self, wave):
        """``wave [B, samples]`` → ``(emb [B, T, n·D], timestamps_ms [B, T])`` with ``T = (samples//160+1)//4``."""
        self._check_length(wave)
        emb = self.spec_embeddings(self.frontend(wave))
        ts = torch.from_numpy(timestamps_ms(emb.shape[1])).to(device=emb.device, dtype=torch.float32)
        return emb, ts[None].expand(emb.shape[0], -1)

    @torch.no_grad()
    def scene_embeddings(self, wave):
        """``[B, scene_embedding_size]``: the mean of the timestamp embeddings over all tokens of each clip,
        preceded for ATST-Clip by the clip CLS (``[CLS ‖ mean]``, see ``atst_jax.inference``)."""
        self._check_length(wave)
        tokens, cls = self._encode(self.frontend(wave))
        mean = tokens.mean(dim=1)
        return mean if cls is None else torch.cat([cls, mean], dim=-1)
