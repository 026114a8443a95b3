"""HEAR API (https://hearbenchmark.com) for exported ATST-Frame, ATST-Clip and 2-D patch ViT encoders.

    from atst_jax.export import hear
    model = hear.load_model("encoder.safetensors")          # python -m atst_jax.export --format safetensors
    emb, ts = hear.get_timestamp_embeddings(audio, model)     # audio: float [n, samples] in [-1, 1],
    scene = hear.get_scene_embeddings(audio, model)           # at model.sample_rate (16 or 32 kHz)

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
* 2-D patch ViTs (the official ASiT layout, ``atst_jax.export.torch_vit``): the Kaldi fbank front end the
  file records — ``kaldi_fbank128``, audio at **32 kHz** (ASiT's; also what an official ASiT checkpoint
  takes), or EAT's ``kaldi_fbank128_16k``, audio at 16 kHz (an AaSP export's default); ``model.sample_rate``
  says which. One timestamp embedding per 16-frame column of patches (160 ms, at ``160·c + 87.5`` ms), the mean
  of the column's 8 frequency-patch tokens of each of the last n blocks; scene = ``[CLS ‖ mean of patch
  tokens]`` (``2·n·D``); chunks of 592 frames (the positions' length), a short last chunk masked.
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
    Attributes: ``sample_rate`` (16000; for a ViT the rate of the front end the file records: 32000 for
    ``kaldi_fbank128``, 16000 for ``kaldi_fbank128_16k``), ``scene_embedding_size``, ``timestamp_embedding_size``.
    A front end the PyTorch side does not compute is refused (``ValueError``).
    A file in the official ViT layout (a 2-D patch export, or an official ASiT checkpoint) gives a
    ``torch_vit.ViTEmbedder`` instead.
    """
    from atst_jax.export.load import read_encoder_file

    if not model_file_path:
        raise ValueError("load_model needs the path of an exported encoder (python -m atst_jax.export)")
    f = read_encoder_file(model_file_path, "teacher", heads)
    return model_from_file(f, n_blocks=n_blocks, max_chunks=max_chunks, chunk_frames=chunk_frames)


def model_from_file(f, n_blocks: int | None = None, max_chunks: int = 8, chunk_frames: int | None = None):
    """:func:`load_model` for an encoder already read (``atst_jax.export.load.EncoderFile``): other adapters
    (``atst_jax.export.xares``) serve the same embedder and also need what the file records."""
    # Each layout's embedder computes the front ends listed here: the ViT's the Kaldi fbank sets (ASiT's 32 kHz,
    # EAT's 16 kHz), the ATST layouts' the ATST log-mel. An encoder trained on another would get features it
    # never saw, silently: refuse it instead.
    from atst_jax.export.torch_vit import SUPPORTED_FEATURES

    computes = SUPPORTED_FEATURES if f.vit else ("atst_logmel64",)
    if f.features not in computes:
        raise ValueError(
            f"the encoder takes {f.features} features; the PyTorch embedder of its layout computes "
            f"{' or '.join(computes)} only"
        )
    chunk_frames = f.chunk_frames if chunk_frames is None else chunk_frames
    if f.vit:  # the official ViT layout (a 2-D patch export, or an official ASiT checkpoint)
        from atst_jax.export.torch_vit import VisionTransformer, ViTEmbedder

        n_mels = int(f.metadata.get("n_mels", 128))
        if f.aape is not None:  # an AaSP export: the ViT + the AaPE branch
            from atst_jax.export.torch_aape import AaPEViT

            encoder = AaPEViT.from_state_dict(f.sd, f.aape, heads=f.heads, n_mels=n_mels, strict=True)
        else:
            encoder = VisionTransformer.from_state_dict(f.sd, heads=f.heads, n_mels=n_mels, strict=True)
        model = ViTEmbedder(
            encoder, n_blocks=n_blocks, max_chunks=max_chunks, chunk_frames=chunk_frames, features=f.features
        )
    else:
        if f.aape is not None:  # FrameAST + the AaPE branch (configs/atst_frame_aape.py)
            from atst_jax.export.torch_aape import AaPEFrameAST

            encoder = AaPEFrameAST.from_state_dict(f.sd, f.aape, heads=f.heads, strict=True)
        else:
            encoder = FrameAST.from_state_dict(f.sd, heads=f.heads, strict=True)
        model = ATSTEmbedder(encoder, n_blocks=n_blocks, max_chunks=max_chunks, chunk_frames=chunk_frames)
        model.sample_rate = SAMPLE_RATE
    model.eval()
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
