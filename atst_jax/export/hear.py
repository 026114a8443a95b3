"""HEAR API (https://hearbenchmark.com) for an exported ATST-Frame or ATST-Clip encoder, in PyTorch.

    from atst_jax.export import hear
    model = hear.load_model("encoder.safetensors")          # python -m atst_jax.export --format safetensors
    emb, ts = hear.get_timestamp_embeddings(audio, model)     # audio: float [n, samples] at 16 kHz, in [-1, 1]
    scene = hear.get_scene_embeddings(audio, model)

Choices (the conventions are defined in ``atst_jax.inference``, shared with the JAX embedder):

* Features: the outputs of **all** blocks (12 for small/base), each through the final norm, concatenated —
  what the official ATST-Frame HEAR wrapper uses: ``timestamp_embedding_size = depth·D`` (9216 for base).
  ``load_model(..., n_blocks=1)`` gives the last block only (D channels). The CLS token of an ATST-Clip
  encoder is not a timestamp: the timestamp embeddings are the patch tokens of both kinds.
* Timestamps: one embedding per 40 ms token, reported at the token's **centre**, ``40·j + 15`` ms, as HEAR
  asks for centred timestamps. A clip of ``s`` samples has ``(s // 160 + 1) // 4`` tokens.
* Scene embedding, ATST-Frame: the mean of the timestamp embeddings over time (``scene_embedding_size`` =
  ``timestamp_embedding_size``). The official wrapper instead averages per-chunk means (which weights a
  short last chunk like a full one); a plain mean over tokens does not depend on where chunks fall.
* Scene embedding, ATST-Clip: ``[CLS ‖ mean]`` as the official ATST-Clip downstream code builds its clip
  feature — the final-normed CLS of each of the n blocks, then the token mean of each
  (``scene_embedding_size = 2·timestamp_embedding_size``). For audio longer than one chunk the CLS part is
  the per-chunk CLS averaged with weights = the chunk's tokens.
* Long audio: the log-mel is computed over the whole clip (block-wise STFT), the encoder then sees chunks
  (≤ 1000 frames for ATST-Frame; the pretraining crop, 600 frames for a 6 s model, for ATST-Clip), at most
  ``max_chunks`` at a time, so memory stays bounded for minutes of audio.
"""

from __future__ import annotations

from atst_jax.export.torch_encoder import ATSTEmbedder, FrameAST

SAMPLE_RATE = 16000


def load_model(
    model_file_path: str = "",
    n_blocks: int | None = None,
    max_chunks: int = 8,
    heads=None,
    chunk_frames: int | None = None,
):
    """An ``ATSTEmbedder`` in eval mode from a safetensors encoder export (or any file
    ``atst_jax.export.load`` reads: ATST-SED or Lightning checkpoints — the teacher's encoder).

    ``chunk_frames`` defaults to what the file records (our exports), else the encoder kind's default.
    Attributes: ``sample_rate`` (16000), ``scene_embedding_size``, ``timestamp_embedding_size``.
    """
    from atst_jax.export.load import read_encoder

    if not model_file_path:
        raise ValueError("load_model needs the path of an exported encoder (python -m atst_jax.export)")
    sd, heads, file_chunk_frames = read_encoder(model_file_path, "teacher", heads)
    encoder = FrameAST.from_state_dict(sd, heads=heads, strict=True)
    chunk_frames = file_chunk_frames if chunk_frames is None else chunk_frames
    model = ATSTEmbedder(encoder, n_blocks=n_blocks, max_chunks=max_chunks, chunk_frames=chunk_frames).eval()
    model.sample_rate = SAMPLE_RATE
    model.requires_grad_(False)
    return model


def _check(audio, model):
    if audio.dim() != 2:
        raise ValueError(f"audio must be [n_sounds, samples], got shape {tuple(audio.shape)}")
    device = next(model.encoder.parameters()).device
    return audio.to(device=device).float()


def get_timestamp_embeddings(audio, model):
    """``audio [n, samples]`` → ``(embeddings [n, T, timestamp_embedding_size], timestamps_ms [n, T])``."""
    return model.timestamp_embeddings(_check(audio, model))


def get_scene_embeddings(audio, model):
    """``audio [n, samples]`` → ``[n, scene_embedding_size]`` (mean of tokens; ``[CLS ‖ mean]`` for Clip)."""
    return model.scene_embeddings(_check(audio, model))
