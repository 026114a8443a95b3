"""The embedded default dataset: deterministic synthetic sound scenes with strong (onset/offset) labels.

Each clip (10 s at 16 kHz by default) holds 1-4 events drawn from :data:`CLASSES`, at random onsets with
random durations (0.3-4 s, overlaps allowed), with short raised-cosine ramps, over coloured background noise
(white to brown) at a random SNR, and is peak-normalised. The ten classes are everyday sounds made of a few
shared units — four notes (beeping, doorbell, melody up, melody down, siren), a thud (knocking, footsteps),
voiced bursts (speech, dog bark) and a low buzz (engine) — and they differ in how those units are arranged
over 0.1-1 s: order, rhythm, grouping, glide. One 40 ms step of a tonal event is "a note sounding" whatever
the class; a few steps of context name it. That is the structure a frame-level encoder's context can learn
and per-step log-mel statistics cannot see, so probes on this data show what pretraining adds (BENCHMARKS.md,
"The `tiny` recipe on the earlier embedded classes": an earlier set of classes told apart mostly by
modulations faster than a 40 ms token, which the log-mel baseline's within-step standard deviation sees for free, left every encoder behind
that baseline).

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


# ----------------------------------------------------------------------------------------------------------
# Event classes. Each takes (rng, num_samples, sample_rate) and returns a float64 wave of that length at any
# level (the caller normalises it). Parameter ranges are the class's "typical" ranges.
#
# The classes are built from a few shared sound units, and what tells them apart is how the units are laid
# out over 0.1-1 s, several 40 ms tokens: the tonal classes all play the same four notes (NOTES, a fourth
# apart, one detune of +-3 % per event), knocking and footsteps are the same thud, speech and the dog's bark
# are both voiced bursts. A single time step of a tonal class is "note k sounding", whichever class it
# belongs to; the order (melody up / down, the doorbell's falling pair), the rhythm (beeps, knocks in groups,
# steady steps) or the glide (siren) is what names it, as for many real sounds.
# ----------------------------------------------------------------------------------------------------------

NOTES = 600.0 * (4.0 / 3.0) ** np.arange(4)  # 600, 800, 1067, 1422 Hz
RAMP_S = 0.005  # raised-cosine ramps of every unit, so no unit clicks


def _notes(rng: np.random.Generator) -> np.ndarray:
    """The four shared notes with one detune for the whole event (another device, another instrument)."""
    return NOTES * (1.0 + rng.uniform(-0.03, 0.03))


def _ramped(wave: np.ndarray, sr: int) -> np.ndarray:
    r = min(int(RAMP_S * sr), len(wave) // 4)
    if r > 0:
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
        wave[:r] *= fade
        wave[len(wave) - r :] *= fade[::-1]
    return wave


def _tone(rng, freq: float, n: int, sr: int, decay_s: float | None = None) -> np.ndarray:
    """A note: the fundamental plus a weak octave, optionally decaying exponentially (struck)."""
    t = np.arange(n) / sr
    phase = 2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)
    wave = np.sin(phase) + 0.25 * np.sin(2 * phase)
    if decay_s is not None:
        wave *= np.exp(-t / decay_s)
    return _ramped(wave, sr)


def _add(out: np.ndarray, start: int, unit: np.ndarray) -> None:
    """Add ``unit`` into ``out`` from sample ``start``, cut at the end of ``out``."""
    if start < len(out):
        m = min(len(unit), len(out) - start)
        out[start : start + m] += unit[:m]


def _beeping(rng, n, sr):
    """An alarm: one note, on for 70-110 ms, off about as long, from the onset to the end."""
    freq = _notes(rng)[rng.integers(0, 4)]
    on = int(rng.uniform(0.07, 0.11) * sr)
    period = on + int(on * rng.uniform(0.8, 1.2))
    out = np.zeros(n)
    beep = _tone(rng, freq, on, sr)
    for start in range(0, n, period):
        _add(out, start, beep)
    return out


def _doorbell(rng, n, sr):
    """Ding-dong: a struck note, then the note below, 350-500 ms each; the pair again after 0.3-0.6 s."""
    notes = _notes(rng)
    k = int(rng.integers(1, 4))
    dur = int(rng.uniform(0.35, 0.5) * sr)
    pause = int(rng.uniform(0.3, 0.6) * sr)
    tau = rng.uniform(0.15, 0.3)
    ding, dong = _tone(rng, notes[k], dur, sr, tau), _tone(rng, notes[k - 1], dur, sr, tau)
    out = np.zeros(n)
    for start in range(0, n, 2 * dur + pause):
        _add(out, start, ding)
        _add(out, start + dur, dong)
    return out


def _melody(rng, n, sr, upward: bool):
    """An arpeggio over the four notes (110-200 ms each, 0-40 ms apart), repeated, from a random note."""
    notes = _notes(rng) if upward else _notes(rng)[::-1]
    dur = int(rng.uniform(0.11, 0.2) * sr)
    step = dur + int(rng.uniform(0.0, 0.04) * sr)
    first = int(rng.integers(0, 4))
    out = np.zeros(n)
    for i, start in enumerate(range(0, n, step)):
        _add(out, start, _tone(rng, notes[(first + i) % 4], dur, sr))
    return out


def _melody_up(rng, n, sr):
    return _melody(rng, n, sr, upward=True)


def _melody_down(rng, n, sr):
    return _melody(rng, n, sr, upward=False)


def _siren(rng, n, sr):
    """A wail gliding smoothly between the lowest and the highest note and back, 0.4-0.8 times a second."""
    notes = _notes(rng)
    t = np.arange(n) / sr
    lo, hi = np.log(notes[0]), np.log(notes[-1])
    sweep = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(0.4, 0.8) * t + rng.uniform(0, 2 * np.pi))
    phase = _phase(np.exp(lo + (hi - lo) * sweep), sr) + rng.uniform(0, 2 * np.pi)
    return np.sin(phase) + 0.25 * np.sin(2 * phase)


def _thud(rng, sr):
    """A knock or a step: 40 ms of noise around 500 Hz (one octave wide) decaying in 12 ms."""
    m = int(0.04 * sr)
    return _band_noise(rng, m, sr, 500.0, 1.0) * np.exp(-np.arange(m) / (0.012 * sr))


def _knocking(rng, n, sr):
    """Knocks in groups of 2-4, 110-160 ms apart; a group every 0.6-1.0 s."""
    gap = rng.uniform(0.11, 0.16)
    out = np.zeros(n)
    start = 0
    while start < n:
        for j in range(int(rng.integers(2, 5))):
            _add(out, start + int(j * gap * sr), rng.uniform(0.7, 1.0) * _thud(rng, sr))
        start += int(rng.uniform(0.6, 1.0) * sr)
    return out


def _footsteps(rng, n, sr):
    """Single steps (the knock's thud) at a steady 1.6-2.4 per second, each interval within +-5 %."""
    period = 1.0 / rng.uniform(1.6, 2.4)
    out = np.zeros(n)
    t = 0.0
    while t * sr < n:
        _add(out, int(t * sr), rng.uniform(0.7, 1.0) * _thud(rng, sr))
        t += period * rng.uniform(0.95, 1.05)
    return out


# Vowels as two formant frequencies (Hz): /a/, /i/, /u/, /e/.
_VOWELS = np.array([(700.0, 1200.0), (300.0, 2200.0), (350.0, 800.0), (500.0, 1800.0)])


def _voiced(f0: float, formants, n: int, sr: int, glide: float = -0.1) -> np.ndarray:
    """A voiced burst: harmonics of ``f0`` (gliding by ``glide`` over the burst) shaped by two formants
    (Gaussian, 120 Hz wide) over a weak flat floor."""
    t = np.arange(n) / sr
    f0_t = f0 * (1.0 + glide * t / max(t[-1], 1e-3))
    phase = _phase(f0_t, sr)
    k = np.arange(1, int(0.45 * sr / f0) + 1)
    amp = 0.05 + sum(np.exp(-0.5 * ((k * f0 - f) / 120.0) ** 2) for f in formants)
    return amp @ np.sin(k[:, None] * phase[None, :])


def _speech(rng, n, sr):
    """Syllables of 120-280 ms, each a vowel on a falling pitch (f0 100-200 Hz per talker), 30-150 ms apart."""
    f0 = rng.uniform(100.0, 200.0)
    out = np.zeros(n)
    start = 0
    while start < n:
        m = int(rng.uniform(0.12, 0.28) * sr)
        syllable = _voiced(f0 * rng.uniform(0.9, 1.1), _VOWELS[rng.integers(0, 4)], m, sr)
        _add(out, start, syllable * np.sin(np.pi * np.arange(m) / m) ** 0.5)
        start += m + int(rng.uniform(0.03, 0.15) * sr)
    return out


def _dog_bark(rng, n, sr):
    """Barks: 120-200 ms voiced + noisy bursts (f0 400-600 Hz, falling), 1-3 per group 80-150 ms apart;
    a group every 0.4-0.9 s after the last bark."""
    f0 = rng.uniform(400.0, 600.0)
    out = np.zeros(n)
    start = 0
    while start < n:
        for _ in range(int(rng.integers(1, 4))):
            m = int(rng.uniform(0.12, 0.2) * sr)
            voiced = _voiced(f0, (900.0, 2200.0), m, sr)
            bark = voiced / (np.abs(voiced).max() + 1e-9) + 0.3 * rng.standard_normal(m)
            j = np.arange(m)
            envelope = np.exp(-j / (0.06 * sr)) * (1.0 - np.exp(-j / (0.005 * sr)))
            _add(out, start, bark * envelope)
            start += m + int(rng.uniform(0.08, 0.15) * sr)
        start += int(rng.uniform(0.4, 0.9) * sr)
    return out


def _engine(rng, n, sr):
    """An idling engine: a low buzz (f0 30-60 Hz, 39 harmonics falling as k^-0.7) pulsing at f0 / 2."""
    f0 = rng.uniform(30.0, 60.0)
    k = np.arange(1, 40)
    weights = k**-0.7 * np.exp(1j * rng.uniform(0, 2 * np.pi, len(k)))
    buzz = _oscillator_bank(weights, 2j * np.pi * f0 * k / sr, n).imag
    return buzz * (1.0 + 0.6 * np.sin(np.pi * f0 * np.arange(n) / sr))


_GENERATORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "beeping": _beeping,
    "doorbell": _doorbell,
    "melody_up": _melody_up,
    "melody_down": _melody_down,
    "siren": _siren,
    "knocking": _knocking,
    "footsteps": _footsteps,
    "speech": _speech,
    "dog_bark": _dog_bark,
    "engine": _engine,
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
