"""HEAR API (https://hearbenchmark.com) for an exported ATST-Frame encoder, in PyTorch.

    from atst_jax.export import hear
    model = hear.load_model("encoder.safetensors")          # python -m atst_jax.export --format safetensors
    emb, ts = hear.get_timestamp_embeddings(audio, model)     # audio: float [n, samples] at 16 kHz, in [-1, 1]
    scene = hear.get_scene_embeddings(audio, model)

Choices (see ``atst_jax.export.torch_encoder`` for the shared conventions):

* Features: the outputs of **all** blocks (12 for small/base), each through the final norm, concatenated —
  what the official ATST-Frame HEAR wrapper uses: ``timestamp_embedding_size = depth·D`` (9216 for base).
  ``load_model(..., n_blocks=1)`` gives the last block only (D channels).
* Timestamps: one embedding per 40 ms token, reported at the token's **centre**, ``40·j + 15`` ms, as HEAR
  asks for centred timestamps. A clip of ``s`` samples has ``(s // 160 + 1) // 4`` tokens.
* Scene embedding: the mean of the timestamp embeddings over time (``scene_embedding_size`` =
  ``timestamp_embedding_size``). The official wrapper instead averages per-chunk means (which weights a
  short last chunk like a full one); a plain mean over tokens does not depend on where chunks fall.
* Long audio: the log-mel is computed over the whole clip (block-wise STFT), the encoder then sees chunks
  of ≤ 1000 frames (10 s), at most ``max_chunks`` at a time, so memory stays bounded for minutes of audio.
"""

from __future__ import annotations

from atst_jax.export.torch_encoder import ATSTFrameEmbedder, FrameAST

SAMPLE_RATE = 16000


def load_model(model_file_path: str = "", n_blocks: int | None = None, max_chunks: int = 8, heads=None):
    """An ``ATSTFrameEmbedder`` in eval mode from a safetensors encoder export (or any file
    ``atst_jax.export.load`` reads: ATST-SED or Lightning checkpoints — the teacher's encoder).

    Attributes: ``sample_rate`` (16000), ``scene_embedding_size``, ``timestamp_embedding_size``.
    """
    if not model_file_path:
        raise ValueError("load_model needs the path of an exported encoder (python -m atst_jax.export)")
    sd, heads = _encoder_state_dict(model_file_path, heads)
    encoder = FrameAST.from_state_dict(sd, heads=heads, strict=True)
    model = ATSTFrameEmbedder(encoder, n_blocks=n_blocks, max_chunks=max_chunks).eval()
    model.sample_rate = SAMPLE_RATE
    model.timestamp_embedding_size = model.embedding_size
    model.scene_embedding_size = model.embedding_size
    model.requires_grad_(False)
    return model


def _encoder_state_dict(path, heads):
    """Bare-key encoder state_dict (NumPy) and the heads recorded in the file's metadata, if any."""
    from atst_jax.export import convert
    from atst_jax.export.load import encoder_prefix, read_file

    sd, extras = read_file(path)
    if heads is None and "heads" in extras.get("metadata", {}):
        heads = int(extras["metadata"]["heads"])
    return convert.sub_dict(sd, encoder_prefix(sd, "teacher")), heads


def _check(audio, model):
    if audio.dim() != 2:
        raise ValueError(f"audio must be [n_sounds, samples], got shape {tuple(audio.shape)}")
    device = next(model.encoder.parameters()).device
    return audio.to(device=device).float()


def get_timestamp_embeddings(audio, model):
    """``audio [n, samples]`` → ``(embeddings [n, T, timestamp_embedding_size], timestamps_ms [n, T])``."""
    return model.timestamp_embeddings(_check(audio, model))


def get_scene_embeddings(audio, model):
    """``audio [n, samples]`` → ``[n, scene_embedding_size]``: the mean of the timestamp embeddings."""
    return model.scene_embeddings(_check(audio, model))
