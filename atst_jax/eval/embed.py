"""Frame- and clip-level embeddings of audio files from a trained (or imported) FrameAST, in JAX.

    python -m atst_jax.embed --workdir RUN --audio FILE_OR_DIR --out OUT_DIR \
        [--step N] [--layers N] [--level frame|clip] [--encoder teacher|student]

writes, per audio file, ``OUT_DIR/<relative path>.npy``: frame level ``float32 [T, n·D]`` plus
``<name>.timestamps.npy`` (``float64 [T]``, ms), or clip level ``float32 [n·D]`` (ATST-Frame: the mean over
the clip's tokens) / ``float32 [2·n·D]`` (ATST-Clip: ``[CLS ‖ mean]``). A 2-D patch encoder (ASiT's ViT; run
or official-layout file) reads audio at 32 kHz through the Kaldi fbank and gives one frame per 16-frame column
of patches (160 ms; the mean of its frequency patches) and ``[CLS ‖ mean of patch tokens]`` clips.
``--layers n`` concatenates the last n blocks (each through the final norm; default: all blocks, 12 for
small/base). ``--weights FILE`` embeds with any export/official checkpoint instead of a run.

The conventions (whole-file block-wise log-mel, chunk grid, timestamps at token centres, the Clip scene
embedding) are defined in ``atst_jax.inference`` and shared with the PyTorch export
(``atst_jax.export.torch_encoder``); the test suite checks that both give the same numbers. The encoder runs
in float32 whatever compute dtype the run trained with.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax import audio, inference
from atst_jax.inference import (
    chunk_bounds,
    encoder_from_params,
    run_encoder_config,
    scene_from_chunks,
)
from atst_jax.models.encoder import FrameAST

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff", ".au"}


def read_run_encoder(workdir, step: int | None = None, encoder: str = "teacher"):
    """``(FrameAST, step, config_dict)`` for the teacher's or the student's encoder of a run's checkpoint.

    The encoder config is the run's (``EncoderConfig.from_config(config["model"])``; the parameter shapes
    when the run saved no config), in float32 (a bfloat16 compute dtype of the run is replaced), drop-path
    off. :func:`run_inference_inputs` gives its chunk length and feature set.
    """
    from atst_jax.checkpoint import read_checkpoint

    if encoder not in ("teacher", "student"):
        raise ValueError(f"encoder must be teacher or student, got {encoder!r}")
    step, config, state = read_checkpoint(workdir, step)
    params = state["teacher" if encoder == "teacher" else "params"]["encoder"]
    return encoder_from_params(params, run_encoder_config(config, params)), step, config


def run_inference_inputs(workdir, step: int, cfg, config) -> tuple[int, str]:
    """``(chunk_frames, features)`` of a run's encoder (``cfg``) at ``step``: from the crops its checkpoint's
    metadata records (``inputs``, ``checkpoint.recorded_inputs``), without building the method; for a
    checkpoint written before that entry existed, from the method rebuilt from the saved ``config``."""
    from atst_jax.checkpoint import recorded_inputs

    inputs = recorded_inputs(workdir, step)
    return (
        inference.encoder_chunk_frames(cfg, config, inputs),
        inference.run_features(config, cfg, inputs),
    )


def read_weights_file(path, encoder: str = "teacher", flag: str = "--weights"):
    """``(FrameAST, EncoderFile)`` of an exported / official weights file (``atst_jax.export.load``), every
    way it can be unreadable a one-line ``EvalError`` naming ``flag`` and the file: missing, empty, a
    truncated or damaged safetensors file, a torch file that is not one of weights, weights of no known
    layout. Shared by ``embed``, ``evaluate`` and ``finetune`` (``--weights``)."""
    from atst_jax.eval.data import EvalError
    from atst_jax.export.load import read_encoder_file

    where = f"{flag} {path}"
    try:  # the loader says what is wrong with a file (missing, empty, a cut safetensors file, pickled code)
        weights = read_encoder_file(path, encoder=encoder)
        return weights.jax_encoder(), weights
    except ImportError as e:
        raise EvalError(f"{where}: {e}") from None
    except KeyError as e:  # KeyError's str() quotes its message
        raise EvalError(f"{where}: {e.args[0] if e.args else e}") from None
    except (OSError, ValueError) as e:  # the loader's messages start with the path, already in ``where``
        raise EvalError(f"{where}: {' '.join(str(e).split()).removeprefix(f'{path}: ')}") from None


# ----------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------


class Embedder:
    """Chunked frame/clip embeddings of one clip at a time with a JAX ``FrameAST`` (ATST-Frame or -Clip).

    ``n_blocks``: the last n blocks are concatenated (default: all). ``chunk_frames``: the chunk length
    (default: the encoder kind's, ``atst_jax.inference.default_chunk_frames``; a run's is
    ``run_chunk_frames``). Up to ``max_chunks`` chunks go through the encoder per call; chunk lengths are
    padded up to a multiple of ``pad_frames`` (at most the chunk length) and chunk counts up to a power of
    two, so a whole collection of files compiles only a handful of shapes. Padding is masked (−10000 on
    padded keys) and never reaches the valid tokens.

    ``precision``: matmul precision of the encoder. "highest" (true float32) by default: GPUs and TPUs
    otherwise round matmul inputs to TF32/bfloat16, and embeddings would then differ from the PyTorch
    export (fp32) by far more than float32 rounding. Pass "default" for speed.

    ``embedding_size`` (= ``timestamp_embedding_size``) is ``n·D``; ``scene_embedding_size`` is ``n·D`` for
    ATST-Frame and ``2·n·D`` for ATST-Clip (``[CLS ‖ mean]``).

    A 2-D patch encoder (``stem="patch2d"``, ASiT's ViT) works the same way on its own grid
    (``atst_jax.inference``): ``features`` (default ``kaldi_fbank128``; ``sample_rate`` 32 kHz) is the front
    end, a time step is a column of 16 frames whose embedding is the mean of its frequency patches, chunks
    are the positions' length (592 frames) and the scene embedding is ``[CLS ‖ mean of patch tokens]``.
    """

    def __init__(
        self,
        encoder: FrameAST,
        n_blocks: int | None = None,
        max_chunks: int = 8,
        pad_frames: int | None = None,
        precision: str = "highest",
        chunk_frames: int | None = None,
        features: str | None = None,
    ):
        cfg = encoder.cfg
        depth = cfg.depth
        self.n_blocks = depth if n_blocks is None else int(n_blocks)
        if not 1 <= self.n_blocks <= depth:
            raise ValueError(f"layers={self.n_blocks} must be between 1 and the encoder depth {depth}")
        # Frames per time step: 4 for the frame stem, a column of 16 × 16 patches for a 2-D patch encoder.
        self.patch_w = inference.time_patch(cfg)
        pad_frames = 25 * self.patch_w if pad_frames is None else int(pad_frames)
        if pad_frames % self.patch_w:
            raise ValueError(f"pad_frames={pad_frames} must be a multiple of the patch width {self.patch_w}")
        self.use_cls = cfg.use_cls
        self.front = inference.front_end(features or inference.default_features(cfg))
        self.features, self.sample_rate = self.front.features, self.front.sample_rate
        self.chunk_frames = inference.encoder_chunk_frames(cfg) if chunk_frames is None else int(chunk_frames)
        slots = cfg.num_pos if cfg.pos_embed == "learned" else float("inf")
        if self.chunk_frames % self.patch_w or not 0 < encoder.num_tokens(self.chunk_frames) < slots:
            raise ValueError(
                f"chunk_frames={self.chunk_frames} must be a positive multiple of the patch width "
                f"{self.patch_w} giving fewer tokens than the {cfg.num_pos} positional slots"
            )
        self.embedding_size = self.timestamp_embedding_size = self.n_blocks * cfg.width
        self.scene_embedding_size = self.embedding_size * (2 if cfg.use_cls else 1)
        self.max_chunks, self.pad_frames, self.precision = max_chunks, pad_frames, precision
        graphdef, state = nnx.split(encoder)
        n = self.n_blocks

        @jax.jit
        def features(state, spec, length):
            return inference.timestep_features(nnx.merge(graphdef, state), spec, length, n)

        self._state = state
        self._features = features
        self.max_frames_seen = 0  # the largest chunk the encoder was given (tests check the bound)

    def _encode(self, spec):
        """``(tokens float32 [frames // 4, n·D], per-chunk CLS [C, n·D] or None, tokens per chunk [C])``."""
        return self.chunk_outputs([spec])[0]

    def chunk_outputs(self, specs):
        """:meth:`_encode` of several clips (the per-chunk outputs, for callers that pool chunks their own way,
        e.g. ``evaluate``'s official protocol): their chunks, in order, share the encoder calls (``max_chunks`` per
        call), so a collection of short clips (one chunk each) runs in batches. One clip alone gives exactly
        the calls (shapes included) it always did."""
        specs = [np.asarray(spec, np.float32) for spec in specs]
        pw = self.patch_w
        prefix = 1 if self.use_cls else 0
        results, jobs = [], []  # jobs: (clip, chunk index, start, stop)
        for i, spec in enumerate(specs):
            frames = spec.shape[-1]
            bounds = chunk_bounds(frames, self.chunk_frames, pw)
            out = np.zeros((frames // pw, self.embedding_size), np.float32)
            cls = np.zeros((len(bounds), self.embedding_size), np.float32) if self.use_cls else None
            results.append((out, cls, np.array([(e - s) // pw for s, e in bounds])))
            jobs += [(i, c, s, e) for c, (s, e) in enumerate(bounds)]
        for j in range(0, len(jobs), self.max_chunks):
            group = jobs[j : j + self.max_chunks]
            longest = -(-max(e - s for _, _, s, e in group) // self.pad_frames) * self.pad_frames
            longest = min(longest, self.chunk_frames)
            count = 1 << (len(group) - 1).bit_length()  # next power of two (zero-length rows are padding)
            x = np.zeros((count, specs[group[0][0]].shape[0], longest), np.float32)
            length = np.zeros((count,), np.int32)
            for k, (i, _, s, e) in enumerate(group):
                x[k, :, : e - s] = specs[i][:, s:e]
                length[k] = e - s
            self.max_frames_seen = max(self.max_frames_seen, longest)
            with jax.default_matmul_precision(self.precision):  # part of the jit cache key
                feats = np.asarray(self._features(self._state, jnp.asarray(x), jnp.asarray(length)))
            for k, (i, c, s, e) in enumerate(group):
                out, cls, _ = results[i]
                n = (e - s) // pw
                out[s // pw : s // pw + n] = feats[k, prefix : prefix + n]
                if cls is not None:
                    cls[c] = feats[k, 0]
        return results

    def spec_features(self, specs) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several clips at once (chunks batched across clips): per normalised ``spec [F, frames]``, its
        ``(timestamp embeddings float32 [frames // patch, n·D], scene embedding [scene_embedding_size])``;
        what ``atst_jax.evaluate`` extracts from prepared datasets. A clip shorter than one time step has no
        timestamps and a NaN scene embedding."""
        out = []
        for tokens, cls, counts in self.chunk_outputs(specs):
            if not len(tokens):
                out.append((tokens, np.full((self.scene_embedding_size,), np.nan, np.float32)))
            else:
                out.append((tokens, scene_from_chunks(tokens, cls, counts)))
        return out

    def spec_embeddings(self, spec) -> np.ndarray:
        """``spec [F, frames]`` (normalised log-mel of a whole clip) → ``float32 [frames // 4, n·D]``."""
        return self._encode(spec)[0]

    def _log_mel(self, wave):
        wave = np.asarray(wave)
        if self.front.num_frames(wave.shape[-1]) // self.patch_w == 0:
            ms = self.patch_w * self.front.hop_ms
            raise ValueError(f"audio of {wave.shape[-1]} samples is shorter than one {ms:g} ms token")
        return self.front(wave)

    def frame_embeddings(self, wave) -> tuple[np.ndarray, np.ndarray]:
        """Mono ``[samples]`` at ``sample_rate`` (16 kHz; 32 kHz for ``kaldi_fbank128``) →
        ``(float32 [T, n·D], timestamps_ms float64 [T])`` (CLS excluded; T time steps)."""
        emb = self.spec_embeddings(self._log_mel(wave))
        return emb, self.front.timestamps_ms(emb.shape[0], self.patch_w)

    def clip_embedding(self, wave) -> np.ndarray:
        """``float32 [scene_embedding_size]``: the mean of the frame embeddings over the clip's tokens, and for
        ATST-Clip ``[CLS ‖ mean]`` (per-chunk CLS weighted by the chunk's tokens; ``atst_jax.inference``)."""
        return scene_from_chunks(*self._encode(self._log_mel(wave)))


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def list_audio(path: Path, keep_extension: bool = False) -> list[tuple[Path, Path]]:
    """``[(file, output stem relative to OUT)]``: a file as given, or a directory's audio files recursively.
    The stem is the relative path without its extension, or with it (``keep_extension``)."""
    if path.is_file():
        return [(path, Path(path.name if keep_extension else path.stem))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        rel = [p.relative_to(path) for p in files]
        return [(p, r if keep_extension else r.with_suffix("")) for p, r in zip(files, rel, strict=True)]
    raise FileNotFoundError(f"--audio {path}: no such file or directory")


def output_files(stem: Path, level: str) -> list[Path]:
    """The files one input writes under OUT."""
    names = [stem.name + ".npy"] + ([stem.name + ".timestamps.npy"] if level == "frame" else [])
    return [stem.with_name(n) for n in names]


def check_unique_outputs(files: list[tuple[Path, Path]], level: str) -> None:
    """Refuses (before anything is written) inputs whose outputs would overwrite each other's: ``x.wav`` and
    ``x.flac`` in one folder, or ``x.timestamps.wav`` next to ``x.wav`` at frame level."""
    owner: dict[Path, Path] = {}
    for path, stem in files:
        for out in output_files(stem, level):
            if out in owner:
                raise ValueError(
                    f"{owner[out]} and {path} would both write {out}: pass --keep_extension to name the "
                    "outputs by the whole file name (x.wav.npy), or embed them separately"
                )
            owner[out] = path


def _parser() -> argparse.ArgumentParser:
    from atst_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m atst_jax.embed", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run directory (its checkpoints/)")
    src.add_argument("--weights", help="an exported/official checkpoint (.safetensors, .ckpt, .pt) instead")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--audio", required=True, help="an audio file or a directory (searched recursively)")
    p.add_argument("--out", required=True, help="output directory for the .npy files")
    p.add_argument("--layers", type=int, default=None, help="concatenate the last N blocks (default: all)")
    p.add_argument("--level", default="frame", help="frame (default) or clip")
    p.add_argument("--encoder", default="teacher", help="teacher (default) or student")
    p.add_argument(
        "--keep_extension",
        action="store_true",
        help="name outputs by the whole file name (x.wav.npy), so x.wav and x.flac do not collide",
    )
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
        files = list_audio(Path(args.audio), args.keep_extension)
        if not files:
            raise FileNotFoundError(
                f"--audio {args.audio}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})"
            )
        check_unique_outputs(files, args.level)
        _check_out_dir(Path(args.out))
        if args.workdir is not None:
            encoder, step, config = read_run_encoder(args.workdir, args.step, args.encoder)
            chunk_frames, features = run_inference_inputs(args.workdir, step, encoder.cfg, config)
            source = f"{args.workdir} step {step} ({args.encoder})"
        else:
            encoder, weights = read_weights_file(args.weights, args.encoder)  # ATST or official ViT layout
            chunk_frames, features = weights.chunk_frames, weights.features
            source = f"{args.weights} ({args.encoder})"
        embedder = Embedder(encoder, args.layers, chunk_frames=chunk_frames, features=features)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    out_dir = Path(args.out)
    failed = 0
    for path, stem in files:
        try:
            wave = audio.load_audio(path, embedder.sample_rate)
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
        f"last {embedder.n_blocks} block(s), "
        f"{embedder.embedding_size if args.level == 'frame' else embedder.scene_embedding_size} dims",
        flush=True,
    )
    return 1 if failed else 0


def _check_out_dir(out: Path) -> None:
    """``--out`` must be a directory this process can create and write (one line, before any work)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"--out {out} is not writable ({e.strerror or e})") from None
