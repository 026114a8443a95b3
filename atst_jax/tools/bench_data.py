"""Data benchmarks: the host input pipeline and dataset preparation, per CPU core.

    python -m atst_jax.bench data [--clips 512] [--batch 64] [--crops spec:1001] \\
        [--prep_files 48] [--audio_format wav|flac] [--audio_sr 16000] [--repeats 3]

(a) pipeline: clips/s of `make_dataset` (decode record → random crops → normalise → batch) over 10 s 64-mel
    records, read batch by batch with random access on one thread (`ds[k]`), so the figure is per core.
    `--crops` names the crops per clip as a method asks for them: `spec:1001` is ATST-Frame's one 10 s
    crop, `anchor:901,positive:601` ATST-Clip's two.
    Views and masks are computed on device in this project (atst_jax/data/views.py), so this is the whole
    host-side cost. Goal: >= 2,000 clips/s per core.
(b) preparation: clips/s of `atst_jax.data.prepare` in-process (decode + resample + log-mel + encode + write
    shards + metadata) next to a plain `librosa.load` + `librosa.feature.melspectrogram` loop over the same
    files (same mel parameters; the librosa loop neither converts to dB nor writes anything), both on one BLAS
    thread, alternated `--repeats` times in this run; medians and their ratio. Goal: ratio >= 1.5.

The audio for (b) is the embedded synthetic data (10 s clips), written as 16-bit WAV at 16 kHz by default;
`--audio_format flac --audio_sr 44100` measures a resampling, compressed-input case instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def parse_crops(text: str) -> list[tuple[str, int]]:
    """`"anchor:901,positive:601"` → `[("anchor", 901), ("positive", 601)]`."""
    crops = []
    for part in text.split(","):
        name, sep, frames = part.strip().partition(":")
        if not sep or not name or not frames.isdigit():
            raise argparse.ArgumentTypeError(f"--crops wants NAME:FRAMES[,NAME:FRAMES...], got {text!r}")
        crops.append((name, int(frames)))
    return crops


def bench_pipeline(workdir: str, clips: int, batch: int, crops: list[tuple[str, int]], repeats: int) -> dict:
    from atst_jax.data.pipeline import make_dataset
    from atst_jax.data.records import write_records

    rng = np.random.default_rng(0)
    # dB-like values with a floor, stored as float16 like prepared data; one full 10 s clip per record (or
    # the longest crop, if longer), so every crop is a random window, not padding.
    record_frames = max(1001, *(frames for _, frames in crops))
    base = rng.normal(-30.0, 15.0, (64, record_frames)).astype(np.float16)
    examples = (
        {
            "mel": np.roll(base, i, axis=1),
            "length": record_frames,
            "id": f"clip{i:05d}",
            "labels": np.array([i % 7], np.int32),
        }
        for i in range(clips)
    )
    out = os.path.join(workdir, "records")
    files = write_records(out, examples, num_shards=4)
    ds = make_dataset(files, seed=0, crops=crops, per_host_batch=batch)
    batches = max(1, clips // batch)
    ds[0]  # warm-up: opens the files, pages them into the cache

    rates, cpu_rates = [], []
    for r in range(repeats):
        offset = 1 + r * batches

        def run(offset=offset):
            for k in range(offset, offset + batches):
                ds[k]

        wall, cpu = _time(run)
        rates.append(batches * batch / wall)
        cpu_rates.append(batches * batch / cpu)
    result = {
        "pipeline_clips_per_s": statistics.median(rates),
        "pipeline_clips_per_cpu_s": statistics.median(cpu_rates),
        "batch": batch,
        "crops": dict(crops),
    }
    shapes = " + ".join(f"{name} {frames}" for name, frames in crops)
    print(
        f"(a) pipeline, batch {batch} x 64 mels x ({shapes}) frames, 1 thread: "
        f"{result['pipeline_clips_per_s']:.0f} clips/s wall, {result['pipeline_clips_per_cpu_s']:.0f} clips per "
        f"CPU-second (median of {repeats}; goal >= 2000 per core)",
        flush=True,
    )
    return result


def _write_audio(audio_dir: str, files: int, audio_format: str, sample_rate: int) -> list[str]:
    import soundfile as sf

    from atst_jax.data import synthetic

    if sample_rate < synthetic.DEFAULT_SAMPLE_RATE:
        raise ValueError("--audio_sr must be >= 16000 (the synthetic classes reach ~7 kHz)")
    os.makedirs(audio_dir, exist_ok=True)
    paths = []
    for i in range(files):
        wave, _ = synthetic.generate_clip(i, seed=0, sample_rate=sample_rate)
        path = os.path.join(audio_dir, f"clip_{i:05d}.{audio_format}")
        sf.write(path, wave, sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def bench_prepare(workdir: str, files: int, audio_format: str, sample_rate: int, repeats: int) -> dict:
    import librosa
    from threadpoolctl import threadpool_limits

    from atst_jax import audio
    from atst_jax.data import prepare

    audio_dir = os.path.join(workdir, "audio")
    paths = _write_audio(audio_dir, files, audio_format, sample_rate)

    def librosa_loop():
        for p in paths:
            y, sr = librosa.load(p, sr=audio.SAMPLE_RATE)
            librosa.feature.melspectrogram(
                y=y,
                sr=sr,
                n_fft=audio.N_FFT,
                hop_length=audio.HOP_LENGTH,
                n_mels=audio.N_MELS,
                fmin=audio.F_MIN,
                fmax=audio.F_MAX,
                htk=True,
                norm=None,
            )

    runs = [0]

    def prepare_run():
        runs[0] += 1
        out = os.path.join(workdir, f"prepared{runs[0]}")  # a fresh directory: nothing to reuse
        plan = prepare.plan_folder(audio_dir)
        result = prepare.build(plan, out, workers=0, progress=False)
        assert result["written"] == files and not result["skipped"], result

    prep, ref = [], []
    with threadpool_limits(1):
        prepare_run()  # warm-up: imports (tensorflow-datasets for the metadata), caches
        librosa_loop()  # warm-up: librosa's lazy imports and numba caches
        for _ in range(repeats):
            prep.append(files / _time(prepare_run)[0])
            ref.append(files / _time(librosa_loop)[0])
    result = {
        "prepare_clips_per_s": statistics.median(prep),
        "librosa_clips_per_s": statistics.median(ref),
        "audio": f"{files} x 10 s {audio_format} at {sample_rate} Hz",
    }
    result["ratio"] = result["prepare_clips_per_s"] / result["librosa_clips_per_s"]
    print(
        f"(b) preparation, {result['audio']}, 1 core: prepare {result['prepare_clips_per_s']:.1f} clips/s, "
        f"librosa.load + melspectrogram {result['librosa_clips_per_s']:.1f} clips/s, "
        f"ratio {result['ratio']:.2f}x (median of {repeats}; goal >= 1.5x)",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    from atst_jax.cli import ArgumentParser, fail

    p = ArgumentParser(prog="python -m atst_jax.bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=("all", "pipeline", "prepare"), default="all")
    p.add_argument("--clips", type=int, default=2048, help="(a) records in the benchmark dataset")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--crops",
        type=parse_crops,
        default=[("spec", 1001)],
        help="(a) NAME:FRAMES per clip, comma-separated",
    )
    p.add_argument("--prep_files", type=int, default=48, help="(b) audio files")
    p.add_argument("--audio_format", choices=("wav", "flac"), default="wav")
    p.add_argument("--audio_sr", type=int, default=16000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", help="scratch directory (default: a temporary one, removed afterwards)")
    args = p.parse_args(argv)
    if min(args.clips, args.batch, args.prep_files, args.repeats, args.audio_sr) < 1:
        return fail("--clips, --batch, --prep_files, --repeats and --audio_sr must be positive")
    if args.workdir is not None and not os.path.isdir(args.workdir):
        return fail(f"--workdir {args.workdir}: no such directory")
    if args.workdir is not None and not os.access(args.workdir, os.W_OK):
        return fail(f"--workdir {args.workdir} is not writable")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.what in ("all", "pipeline"):
            bench_pipeline(tmp, args.clips, args.batch, args.crops, args.repeats)
        if args.what in ("all", "prepare"):
            bench_prepare(tmp, args.prep_files, args.audio_format, args.audio_sr, args.repeats)
    return 0


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
