"""The embedded default dataset: deterministic synthetic sound scenes with strong (onset/offset) labels.

Each clip (10 s at 16 kHz by default) holds 1-4 events drawn from :data:`CLASSES`, at random onsets with
random durations (0.3-4 s, overlaps allowed), with short raised-cosine ramps, over coloured background noise
(white to brown) at a random SNR, and is peak-normalised. The classes differ in spectro-temporal shape
(steady / gliding / modulated pitch, harmonic vs inharmonic vs noisy spectra, impulsive vs sustained), so a
model that learns structure from log-mels can tell them apart, which makes loss curves and probes meaningful
without downloading anything.

Everything about clip ``index`` comes from ``np.random.default_rng([seed, index])``: clips can be generated in
any order, in parallel, by any process, and are always the same.

:func:`write_dataset` writes the clips as 16-bit WAVs plus a DCASE strong-label TSV
(``filename\\tonset\\toffset\\tevent_label``); :func:`read_strong_tsv` parses such a file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from threadpoolctl import ThreadpoolController

DEFAULT_DURATION = 10.0
DEFAULT_SAMPLE_RATE = 16000

MIN_EVENTS, MAX_EVENTS = 1, 4
MIN_EVENT_S, MAX_EVENT_S = 0.3, 4.0
# Event gains (dB, per event) and background level (dB below a 0 dB event, i.e. the SNR).
EVENT_GAIN_DB = (-6.0, 0.0)
SNR_DB = (0.0, 20.0)
# Peak level the finished clip is scaled to (random, so clips differ in loudness as real recordings do).
PEAK = (0.3, 0.9)

TSV_HEADER = ("filename", "onset", "offset", "event_label")

Event = tuple[float, float, str]


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _phase(freq_hz: np.ndarray, sr: int) -> np.ndarray:
    """Instantaneous phase (radians) of a signal whose frequency follows ``freq_hz`` sample by sample."""
    return 2.0 * np.pi * np.cumsum(freq_hz) / sr


def _oscillator_bank(weights: np.ndarray, rates: np.ndarray, n: int, block: int = 256) -> np.ndarray:
    """``sum_k weights[k] * exp(rates[k] * m)`` for samples m = 0..n-1, complex ``[n]``.

    Constant-frequency partials (damped when ``Re(rate) < 0``) without K * n transcendental calls: write
    ``m = b * block + j``, so ``exp(r m) = exp(r b block) * exp(r j)`` and the weighted sum over k becomes one
    small ``[blocks, K] @ [K, block]`` matrix product. ~2 K sqrt(n) exps instead of K n.
    """
    blocks = -(-n // block)
    coarse = weights[None, :] * np.exp(np.outer(block * np.arange(blocks), rates))  # [blocks, K]
    fine = np.exp(np.outer(rates, np.arange(block)))  # [K, block]
    # OpenBLAS multi-threads even this tiny product; with the cores busy (other data workers, a training
    # process) its spinning threads make it ~100x slower (measured 16 ms vs 0.16 ms), so pin it to one.
    with _blas_controller().limit(limits=1, user_api="blas"):
        return (coarse @ fine).reshape(-1)[:n]


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _band_noise(rng: np.random.Generator, n: int, sr: int, center_hz: float, octaves: float) -> np.ndarray:
    """White noise shaped by a Gaussian band in log-frequency (``octaves`` = full width at half power)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    dist = np.log2(np.maximum(freqs, 1.0) / center_hz)  # distance in octaves
    sigma = octaves / 2.355  # FWHM -> standard deviation (of the power response)
    return np.fft.irfft(spectrum * np.exp(-0.25 * (dist / sigma) ** 2), n)


def _place(n: int, times_s: np.ndarray, amps: np.ndarray, kernel: np.ndarray, sr: int) -> np.ndarray:
    """Sum copies of ``kernel`` starting at ``times_s`` (scaled by ``amps``), cut to ``n`` samples."""
    out = np.zeros(n + len(kernel))
    starts = np.round(times_s * sr).astype(np.int64)
    keep = starts < n
    # Each start gets a full kernel; adding an index grid avoids a Python loop over hits.
    idx = starts[keep, None] + np.arange(len(kernel))[None, :]
    np.add.at(out, idx, amps[keep, None] * kernel[None, :])
    return out[:n]


# ----------------------------------------------------------------------------------------------------------
# Event classes. Each takes (rng, num_samples, sample_rate) and returns a float64 wave of that length at any
# level (the caller normalises it). Parameter ranges are the class's "typical" ranges.
# ----------------------------------------------------------------------------------------------------------


def _vibrato_tone(rng, n, sr):
    """Tone whose pitch wobbles periodically by +-5-10 % at 4-8 Hz (singing, whistling, warbling)."""
    t = np.arange(n) / sr
    f0 = _log_uniform(rng, 500.0, 2500.0)
    # Depth (fraction of f0, peak) wide enough to move across 64 mel bins (~6 % apart near 1 kHz).
    rate, depth = rng.uniform(4.0, 8.0), rng.uniform(0.05, 0.1)
    phase = _phase(f0 * (1.0 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))), sr)
    return np.sin(phase) + rng.uniform(0.1, 0.4) * np.sin(2 * phase + rng.uniform(0, 2 * np.pi))


def _chirp(rng, n, sr, upward: bool):
    """Exponential glide over the whole event, 1-3 octaves."""
    low = _log_uniform(rng, 150.0, 1000.0)
    high = min(low * 2.0 ** rng.uniform(1.0, 3.0), 0.45 * sr)
    ramp = np.linspace(0.0, 1.0, n)
    freq = low * (high / low) ** (ramp if upward else 1.0 - ramp)
    return np.sin(_phase(freq, sr) + rng.uniform(0, 2 * np.pi))


def _chirp_up(rng, n, sr):
    return _chirp(rng, n, sr, upward=True)


def _chirp_down(rng, n, sr):
    return _chirp(rng, n, sr, upward=False)


def _harmonic_stack(rng, n, sr):
    """Low steady fundamental with many harmonics (buzz, engine, bowed string)."""
    f0 = _log_uniform(rng, 90.0, 350.0)
    count = int(min(rng.integers(6, 17), (0.45 * sr) // f0))
    k = np.arange(1, count + 1)
    weights = k ** -rng.uniform(0.5, 1.5) * np.exp(1j * rng.uniform(0, 2 * np.pi, count))
    return _oscillator_bank(weights, 2j * np.pi * f0 * k / sr, n).imag


def _noise_burst(rng, n, sr):
    """Band-limited noise (steam, wind, rain-like hiss)."""
    return _band_noise(rng, n, sr, _log_uniform(rng, 400.0, 5000.0), rng.uniform(0.5, 2.0))


def _click_train(rng, n, sr):
    """Regular broadband clicks (ticking clock, Geiger counter, woodpecker)."""
    rate = rng.uniform(4.0, 25.0)
    times = np.arange(0.0, n / sr, 1.0 / rate) + rng.uniform(0, 1.0 / rate)
    times += rng.normal(0.0, 0.03 / rate, len(times))  # slight timing jitter
    times = np.clip(times, 0.0, None)
    length = int(0.004 * sr)
    click = rng.standard_normal(length) * np.exp(-np.arange(length) / (0.0008 * sr))
    return _place(n, times, rng.uniform(0.6, 1.0, len(times)), click, sr)


def _am_tone(rng, n, sr):
    """Pure tone with deep, fast amplitude modulation (tremolo, alarm beeping)."""
    t = np.arange(n) / sr
    carrier = _log_uniform(rng, 400.0, 4000.0)
    rate, depth = rng.uniform(3.0, 15.0), rng.uniform(0.8, 1.0)
    envelope = 1.0 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    return envelope * np.sin(2 * np.pi * carrier * t + rng.uniform(0, 2 * np.pi))


def _siren(rng, n, sr):
    """Tone sweeping slowly (0.5-2 Hz) and widely (+-0.3-0.8 octave) up and down: a siren."""
    t = np.arange(n) / sr
    center = _log_uniform(rng, 500.0, 2000.0)
    rate, octaves = rng.uniform(0.5, 2.0), rng.uniform(0.3, 0.8)
    phase = _phase(center * 2.0 ** (octaves * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))), sr)
    return np.sin(phase) + rng.uniform(0.1, 0.3) * np.sin(2 * phase + rng.uniform(0, 2 * np.pi))


def _dripping(rng, n, sr):
    """Irregular short drops, each a fast-decaying upward pitch blip (dripping water)."""
    gaps = rng.uniform(0.12, 0.5, size=int(n / sr / 0.12) + 1)
    times = np.cumsum(gaps) - gaps[0] + rng.uniform(0.0, 0.05)
    length = int(0.06 * sr)
    tk = np.arange(length) / sr
    f_start = rng.uniform(700.0, 2000.0)
    freq = f_start * 2.0 ** (rng.uniform(0.6, 1.3) * tk / tk[-1])
    drop = np.sin(_phase(freq, sr)) * np.exp(-tk / rng.uniform(0.008, 0.02))
    return _place(n, times, rng.uniform(0.4, 1.0, len(times)), drop, sr)


# Ratios of a free-free bar's modes: a struck, inharmonic "metallic" spectrum.
_BELL_RATIOS = np.array([1.0, 2.756, 5.404, 8.933])


def _bell(rng, n, sr):
    """One strike with inharmonic partials and exponential decay, upper partials dying faster."""
    f0 = _log_uniform(rng, 250.0, 1200.0)
    ratios = _BELL_RATIOS[_BELL_RATIOS * f0 < 0.45 * sr]
    tau = (n / sr) * rng.uniform(0.2, 0.5) / ratios**0.5
    amps = rng.uniform(0.3, 1.0, len(ratios))
    phases = rng.uniform(0, 2 * np.pi, len(ratios))
    # Partial k is Im(a_k e^{i phi_k} exp(rate_k m)) at sample m, with rate_k = (-1/tau_k + i 2 pi f_k) / sr.
    return _oscillator_bank(amps * np.exp(1j * phases), (-1.0 / tau + 2j * np.pi * f0 * ratios) / sr, n).imag


_GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "vibrato_tone": _vibrato_tone,
    "chirp_up": _chirp_up,
    "chirp_down": _chirp_down,
    "harmonic_stack": _harmonic_stack,
    "noise_burst": _noise_burst,
    "click_train": _click_train,
    "am_tone": _am_tone,
    "siren": _siren,
    "dripping": _dripping,
    "bell": _bell,
}
CLASSES: tuple[str, ...] = tuple(_GENERATORS)


def synthesize_event(
    label: str, num_samples: int, rng: np.random.Generator, sample_rate: int = DEFAULT_SAMPLE_RATE
) -> np.ndarray:
    """One isolated event of class ``label``: float32, unit RMS, raised-cosine ramps of 5-50 ms each end."""
    if label not in _GENERATORS:
        raise ValueError(f"unknown event class {label!r}; known: {', '.join(CLASSES)}")
    wave = _GENERATORS[label](rng, num_samples, sample_rate)
    ramp = min(int(rng.uniform(0.005, 0.05) * sample_rate), num_samples // 4)
    if ramp > 0:
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        wave[:ramp] *= fade
        wave[num_samples - ramp :] *= fade[::-1]
    rms = np.sqrt(np.mean(wave**2))
    return (wave / max(rms, 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _log_freqs(n: int, sr: int) -> np.ndarray:
    """log(max(f, 50 Hz)) of the rfft bins, float32, read-only (cached: every clip of a dataset shares it)."""
    # Flattening below 50 Hz keeps brown noise from pouring its energy into DC and sub-audio rumble.
    out = np.log(np.maximum(np.fft.rfftfreq(n, 1.0 / sr), 50.0)).astype(np.float32)
    out.setflags(write=False)
    return out


def _background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Unit-RMS float32 noise with power spectrum ~ f^-alpha, alpha in [0, 2] (white ... pink ... brown).

    The single most expensive part of a clip, hence float32 and no forward FFT: Gaussian white noise has
    i.i.d. complex Gaussian Fourier coefficients, so those are drawn directly (interleaved re/im pairs viewed
    as complex64; irfft ignores the imaginary parts of the DC and Nyquist bins).
    """
    alpha = rng.uniform(0.0, 2.0)
    spectrum = rng.standard_normal(2 * (n // 2 + 1), dtype=np.float32).view(np.complex64)
    spectrum *= np.exp(np.float32(-alpha / 2.0) * _log_freqs(n, sr))
    wave = np.fft.irfft(spectrum, n)
    return wave / np.sqrt(np.mean(wave**2, dtype=np.float64)).astype(np.float32)


def _draw_events(rng: np.random.Generator, duration: float) -> list[Event]:
    """The clip's event list, sorted by onset; times are whole milliseconds, so a 3-decimal TSV is exact."""
    total_ms = int(round(duration * 1000))
    min_ms = int(MIN_EVENT_S * 1000)
    if total_ms < min_ms:
        raise ValueError(f"clip duration {duration} s is shorter than the shortest event ({MIN_EVENT_S} s)")
    count = int(rng.integers(MIN_EVENTS, MAX_EVENTS + 1))
    labels = rng.integers(0, len(CLASSES), size=count)
    lengths_ms = rng.integers(min_ms, min(int(MAX_EVENT_S * 1000), total_ms) + 1, size=count)
    onsets_ms = rng.integers(0, total_ms - lengths_ms + 1)
    events = [
        (on / 1000, (on + length) / 1000, CLASSES[lab])
        for on, length, lab in zip(onsets_ms.tolist(), lengths_ms.tolist(), labels.tolist(), strict=True)
    ]
    return sorted(events)


def clip_events(index: int, seed: int = 0, duration: float = DEFAULT_DURATION) -> list[Event]:
    """The labels of clip ``index`` without rendering its audio (the list :func:`generate_clip` returns)."""
    return _draw_events(np.random.default_rng([seed, index]), duration)


def generate_clip(
    index: int, seed: int = 0, duration: float = DEFAULT_DURATION, sample_rate: int = DEFAULT_SAMPLE_RATE
) -> tuple[np.ndarray, list[Event]]:
    """Clip ``index`` of the dataset with ``seed``: ``(float32 [samples] wave, [(onset, offset, label)])``.

    Deterministic in (seed, index) alone. ``samples = round(duration * sample_rate)``; peak in [0.3, 0.9].
    Class parameter ranges reach ~7 kHz, so sample rates below 16 kHz (which would alias) are refused.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    if sample_rate < DEFAULT_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be >= {DEFAULT_SAMPLE_RATE} Hz (upper partials reach ~7 kHz)")
    rng = np.random.default_rng([seed, index])
    events = _draw_events(rng, duration)  # first, so clip_events() can replay it cheaply
    n = int(round(duration * sample_rate))
    mix = _background(rng, n, sample_rate) * np.float32(10.0 ** (-rng.uniform(*SNR_DB) / 20.0))
    for onset, offset, label in events:
        start, stop = int(round(onset * sample_rate)), min(int(round(offset * sample_rate)), n)
        gain = 10.0 ** (rng.uniform(*EVENT_GAIN_DB) / 20.0)
        mix[start:stop] += gain * synthesize_event(label, stop - start, rng, sample_rate)
    mix *= np.float32(rng.uniform(*PEAK) / np.max(np.abs(mix)))
    return mix, events


# ----------------------------------------------------------------------------------------------------------
# Files: WAVs + DCASE strong-label TSV
# ----------------------------------------------------------------------------------------------------------


def clip_filename(index: int) -> str:
    return f"clip_{index:05d}.wav"


def write_dataset(
    out_dir,
    num_clips: int,
    seed: int = 0,
    duration: float = DEFAULT_DURATION,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
) -> Path:
    """Write ``num_clips`` clips to ``out_dir/audio/clip_XXXXX.wav`` (16-bit PCM) and their strong labels to
    ``out_dir/strong_labels.tsv``; returns the TSV's path.

    Idempotent: a second call with the same arguments rewrites identical files. Files are written to a
    temporary name and renamed, so an interrupted run never leaves a half-written WAV or TSV behind. WAVs
    from an earlier, larger call are left alone but are not listed in the new TSV.
    """
    out_dir = Path(out_dir)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = ["\t".join(TSV_HEADER)]
    for index in range(num_clips):
        wave, events = generate_clip(index, seed=seed, duration=duration, sample_rate=sample_rate)
        name = clip_filename(index)
        tmp = audio_dir / f".{name}.tmp"
        sf.write(tmp, wave, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, audio_dir / name)
        rows += [f"{name}\t{onset:.3f}\t{offset:.3f}\t{label}" for onset, offset, label in events]
    tsv = out_dir / "strong_labels.tsv"
    tmp = out_dir / ".strong_labels.tsv.tmp"
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, tsv)
    return tsv


def read_strong_tsv(path) -> dict[str, list[Event]]:
    """Parse a DCASE strong-label TSV into ``{filename: [(onset, offset, label), ...]}`` (file order kept).

    The header must name ``filename``, ``onset``, ``offset`` and ``event_label`` (any order; other columns are
    ignored). A row whose onset, offset and label are all empty lists a clip without events. Raises
    ``ValueError`` naming the file and line for anything malformed.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty file, expected a header {' / '.join(TSV_HEADER)}")
    header = [h.strip() for h in lines[0].split("\t")]
    missing = [h for h in TSV_HEADER if h not in header]
    if missing:
        raise ValueError(f"{path}:1: header lacks column(s) {missing}; got {header}")
    cols = [header.index(h) for h in TSV_HEADER]

    out: dict[str, list[Event]] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(
                f"{path}:{lineno}: expected {len(header)} tab-separated fields, got {len(fields)}"
            )
        filename, onset_s, offset_s, label = (fields[c].strip() for c in cols)
        if not filename:
            raise ValueError(f"{path}:{lineno}: empty filename")
        events = out.setdefault(filename, [])
        if not (onset_s or offset_s or label):
            continue  # a clip listed with no events
        try:
            onset, offset = float(onset_s), float(offset_s)
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: onset/offset {onset_s!r}/{offset_s!r} are not numbers"
            ) from None
        if not (np.isfinite(onset) and np.isfinite(offset) and 0.0 <= onset <= offset):
            raise ValueError(f"{path}:{lineno}: need 0 <= onset <= offset, got {onset} / {offset}")
        if not label:
            raise ValueError(f"{path}:{lineno}: empty event_label")
        events.append((onset, offset, label))
    return out
