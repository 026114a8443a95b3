"""Frame- and clip-level embeddings of audio files from a trained (or imported) FrameAST, in JAX.

    python -m atst_jax.embed --workdir RUN --audio FILE_OR_DIR --out OUT_DIR \
        [--step N] [--layers N] [--level frame|clip] [--encoder teacher|student]

writes, per audio file, ``OUT_DIR/<relative path>.npy``: frame level ``float32 [T, n·D]`` plus
``<name>.timestamps.npy`` (``float64 [T]``, ms), or clip level ``float32 [n·D]``. ``--layers n`` concatenates
the last n blocks (each through the final norm; default: all blocks, 12 for small/base); clip level is the
mean over the clip's tokens. ``--weights FILE`` embeds with any export/official checkpoint instead of a run.

The conventions are those of the PyTorch export (``atst_jax.export.torch_encoder``), and the test suite
checks that both give the same numbers:

* The log-mel of the whole file (one top-80 dB floor per file), computed block-wise in float64 so that hours
  of audio stay within bounded memory, then cut into chunks of ``CHUNK_FRAMES`` = 1000 frames from frame 0:
  ≤ 10 s per encoder call and a global 40 ms grid (1000 is a multiple of the 4-frame patch).
* ``frames // 4`` tokens per file (a trailing partial patch is dropped); token j's timestamp is its centre,
  ``40·j + 15`` ms (the mean of its four STFT frame centres at 0/10/20/30 ms past ``40·j``).
* The encoder runs in float32 whatever compute dtype the run trained with.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax import audio
from atst_jax.models.encoder import EncoderConfig, FrameAST

CHUNK_FRAMES = 1000
TOKEN_MS = 40.0
TIMESTAMP_OFFSET_MS = 15.0
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff", ".au"}


# ----------------------------------------------------------------------------------------------------------
# Shared conventions (also used by the PyTorch side)
# ----------------------------------------------------------------------------------------------------------


def chunk_bounds(frames: int, chunk_frames: int = CHUNK_FRAMES, patch_w: int = 4) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` frame ranges of the chunks, keeping only those with at least one whole patch."""
    if chunk_frames % patch_w:
        raise ValueError(f"chunk_frames={chunk_frames} must be a multiple of the patch width {patch_w}")
    bounds = [(s, min(s + chunk_frames, frames)) for s in range(0, frames, chunk_frames)]
    return [(s, e) for s, e in bounds if e - s >= patch_w]


def timestamps_ms(num_tokens: int) -> np.ndarray:
    """Token centres in milliseconds: ``40·j + 15``."""
    return np.arange(num_tokens, dtype=np.float64) * TOKEN_MS + TIMESTAMP_OFFSET_MS


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
        seg = padded[start * audio.HOP_LENGTH : (stop - 1) * audio.HOP_LENGTH + audio.N_FFT]
        win = np.lib.stride_tricks.sliding_window_view(seg, audio.N_FFT)[:: audio.HOP_LENGTH]
        spec = np.fft.rfft(win * window, axis=-1)
        mel[start:stop] = (spec.real**2 + spec.imag**2) @ fb
    db = 10.0 * np.log10(np.maximum(mel.T, audio.AMIN))
    db = np.maximum(db, db.max() - audio.TOP_DB).astype(np.float32)
    return audio.normalize_db(db)


# ----------------------------------------------------------------------------------------------------------
# Building an encoder from parameters
# ----------------------------------------------------------------------------------------------------------


def config_from_params(enc_params, heads: int | None = None, **overrides) -> EncoderConfig:
    """An ``EncoderConfig`` matching the shapes of encoder params (heads default to ``width // 64``)."""
    from atst_jax.export.convert import infer_heads

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
        drop_path=0.0,
        use_cls=enc_params.get("cls_token") is not None,
        dtype="float32",
    )
    fields.update(overrides)
    return EncoderConfig(**fields)


def encoder_from_params(enc_params, cfg: EncoderConfig | None = None) -> FrameAST:
    """A ``FrameAST`` holding ``enc_params`` (nested dict in the checkpoint layout; NumPy or jax arrays).

    Built abstractly first, so no random initialisation is computed and thrown away.
    """
    cfg = cfg if cfg is not None else config_from_params(enc_params)
    abstract = nnx.eval_shape(lambda: FrameAST(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), enc_params))
    return nnx.merge(graphdef, state)


def read_run_encoder(workdir, step: int | None = None, encoder: str = "teacher"):
    """``(FrameAST, step, config_dict)`` for the teacher's or the student's encoder of a run's checkpoint.

    The encoder runs in float32 (a bfloat16 compute dtype of the run is replaced) and drop-path is off.
    """
    import ml_collections

    from atst_jax.checkpoint import read_checkpoint
    from atst_jax.train import encoder_config

    if encoder not in ("teacher", "student"):
        raise ValueError(f"encoder must be teacher or student, got {encoder!r}")
    step, config, state = read_checkpoint(workdir, step)
    params = state["teacher" if encoder == "teacher" else "params"]["encoder"]
    if config:
        cfg = encoder_config(ml_collections.ConfigDict(config))
        cfg = dataclasses.replace(cfg, dtype="float32", drop_path=0.0)
    else:  # a bare state save without the run's config: the shapes say everything inference needs
        cfg = config_from_params(params)
    return encoder_from_params(params, cfg), step, config


# ----------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------


class Embedder:
    """Chunked frame/clip embeddings of one clip at a time with a JAX ``FrameAST``.

    ``n_blocks``: the last n blocks are concatenated (default: all). Up to ``max_chunks`` chunks of
    ≤ 1000 frames go through the encoder per call; chunk lengths are padded up to a multiple of
    ``pad_frames`` and chunk counts up to a power of two, so a whole collection of files compiles only a
    handful of shapes. Padding is masked (−10000 on padded keys) and never reaches the valid tokens.

    ``precision``: matmul precision of the encoder. "highest" (true float32) by default: GPUs and TPUs
    otherwise round matmul inputs to TF32/bfloat16, and embeddings would then differ from the PyTorch
    export (fp32) by far more than float32 rounding. Pass "default" for speed.
    """

    def __init__(
        self,
        encoder: FrameAST,
        n_blocks: int | None = None,
        max_chunks: int = 8,
        pad_frames: int = 100,
        precision: str = "highest",
    ):
        depth = encoder.cfg.depth
        self.n_blocks = depth if n_blocks is None else int(n_blocks)
        if not 1 <= self.n_blocks <= depth:
            raise ValueError(f"layers={self.n_blocks} must be between 1 and the encoder depth {depth}")
        if pad_frames % encoder.cfg.patch_w or CHUNK_FRAMES % pad_frames:
            raise ValueError(
                f"pad_frames={pad_frames} must divide {CHUNK_FRAMES} and be a multiple of the patch"
            )
        self.patch_w = encoder.cfg.patch_w
        self.embedding_size = self.n_blocks * encoder.cfg.width
        self.max_chunks, self.pad_frames, self.precision = max_chunks, pad_frames, precision
        graphdef, state = nnx.split(encoder)
        n = self.n_blocks

        @jax.jit
        def features(state, spec, length):
            return nnx.merge(graphdef, state).intermediate_features(spec, length, n)

        self._state = state
        self._features = features
        self.max_frames_seen = 0  # the largest chunk the encoder was given (tests check the ≤ 1000 bound)

    def spec_embeddings(self, spec) -> np.ndarray:
        """``spec [F, frames]`` (normalised log-mel of a whole clip) → ``float32 [frames // 4, n·D]``."""
        spec = np.asarray(spec, np.float32)
        frames = spec.shape[-1]
        pw = self.patch_w
        out = np.zeros((frames // pw, self.embedding_size), np.float32)
        bounds = chunk_bounds(frames, CHUNK_FRAMES, pw)
        for j in range(0, len(bounds), self.max_chunks):
            group = bounds[j : j + self.max_chunks]
            longest = -(-max(e - s for s, e in group) // self.pad_frames) * self.pad_frames
            count = 1 << (len(group) - 1).bit_length()  # next power of two (zero-length rows are padding)
            x = np.zeros((count, spec.shape[0], longest), np.float32)
            length = np.zeros((count,), np.int32)
            for k, (s, e) in enumerate(group):
                x[k, :, : e - s] = spec[:, s:e]
                length[k] = e - s
            self.max_frames_seen = max(self.max_frames_seen, longest)
            with jax.default_matmul_precision(self.precision):  # part of the jit cache key
                feats = np.asarray(self._features(self._state, jnp.asarray(x), jnp.asarray(length)))
            for k, (s, e) in enumerate(group):
                n = (e - s) // pw
                out[s // pw : s // pw + n] = feats[k, :n]
        return out

    def frame_embeddings(self, wave) -> tuple[np.ndarray, np.ndarray]:
        """Mono 16 kHz ``[samples]`` → ``(float32 [T, n·D], timestamps_ms float64 [T])``."""
        wave = np.asarray(wave)
        if audio.num_frames(wave.shape[-1]) // self.patch_w == 0:
            raise ValueError(f"audio of {wave.shape[-1]} samples is shorter than one 40 ms token")
        emb = self.spec_embeddings(log_mel(wave))
        return emb, timestamps_ms(emb.shape[0])

    def clip_embedding(self, wave) -> np.ndarray:
        """Mean of the frame embeddings over the clip's tokens: ``float32 [n·D]``."""
        emb, _ = self.frame_embeddings(wave)
        return emb.mean(axis=0)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def list_audio(path: Path) -> list[tuple[Path, Path]]:
    """``[(file, output stem relative to OUT)]``: a file as given, or a directory's audio files recursively."""
    if path.is_file():
        return [(path, Path(path.stem))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        return [(p, p.relative_to(path).with_suffix("")) for p in files]
    raise FileNotFoundError(f"--audio {path}: no such file or directory")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atst_jax.embed", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run directory (its checkpoints/)")
    src.add_argument("--weights", help="an exported/official checkpoint (.safetensors, .ckpt, .pt) instead")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--audio", required=True, help="an audio file or a directory (searched recursively)")
    p.add_argument("--out", required=True, help="output directory for the .npy files")
    p.add_argument("--layers", type=int, default=None, help="concatenate the last N blocks (default: all)")
    p.add_argument("--level", default="frame", help="frame (default) or clip")
    p.add_argument("--encoder", default="teacher", help="teacher (default) or student")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Orbax logs several absl warnings on every read-only open (read_only options, items not restored):
    # noise for a command-line user.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        if args.level not in ("frame", "clip"):
            raise ValueError(f"--level {args.level!r}: choose frame or clip")
        if args.encoder not in ("teacher", "student"):
            raise ValueError(f"--encoder {args.encoder!r}: choose teacher or student")
        files = list_audio(Path(args.audio))
        if not files:
            raise FileNotFoundError(
                f"--audio {args.audio}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})"
            )
        if args.workdir is not None:
            encoder, step, _ = read_run_encoder(args.workdir, args.step, args.encoder)
            source = f"{args.workdir} step {step} ({args.encoder})"
        else:
            from atst_jax.export.load import load_encoder_params

            encoder = encoder_from_params(load_encoder_params(args.weights, encoder=args.encoder))
            source = f"{args.weights} ({args.encoder})"
        embedder = Embedder(encoder, args.layers)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out_dir = Path(args.out)
    failed = 0
    for path, stem in files:
        try:
            wave = audio.load_audio(path)
            target = out_dir / stem
            target.parent.mkdir(parents=True, exist_ok=True)
            if args.level == "frame":
                emb, ts = embedder.frame_embeddings(wave)
                np.save(target.with_name(target.name + ".npy"), emb)
                np.save(target.with_name(target.name + ".timestamps.npy"), ts)
            else:
                emb = embedder.clip_embedding(wave)
                np.save(target.with_name(target.name + ".npy"), emb)
        except (audio.AudioError, ValueError) as e:  # one bad file does not stop a collection
            print(f"skipped {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path} -> {target}.npy {list(emb.shape)}", flush=True)
    print(
        f"{len(files) - failed}/{len(files)} files embedded with {source}: {args.level} level, "
        f"last {embedder.n_blocks} block(s), {embedder.embedding_size} dims",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
