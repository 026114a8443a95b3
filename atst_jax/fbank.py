"""Kaldi-compatible log mel filterbank: the AST / ASiT / EAT front end, in numpy and jax.numpy.

What is computed is what ``torchaudio.compliance.kaldi.fbank(wave, htk_compat=True, sample_frequency=sr,
use_energy=False, window_type="hanning", num_mel_bins=n_mels, dither=0.0, frame_shift=10)`` returns
(spec/methods.md §0, "ASiT instead"):

* Frames of 25 ms every 10 ms, Kaldi's integer rounding (``int(sr · ms · 0.001)``: 800 / 320 samples at
  32 kHz, 400 / 160 at 16 kHz). ``snip_edges``: only frames that fit entirely, so a wave of ``N`` samples
  gives ``1 + (N − window) // hop`` frames, and none when ``N < window``. No dither.
* Per frame: subtract the frame's own mean (DC offset), pre-emphasis ``y[j] = x[j] − 0.97 · x[j − 1]`` with
  ``x[−1] = x[0]``, a *symmetric* Hann window (``0.5 − 0.5 cos(2πj / (window − 1))``, what Kaldi calls
  "hanning"), zero padding to the next power of two (1024 at 32 kHz, 512 at 16 kHz), power spectrum.
* Kaldi mel triangles: mel = 1127 · ln(1 + f / 700), ``n_mels + 2`` equally spaced corners from 20 Hz to the
  Nyquist frequency, evaluated on the mel value of FFT bins ``0 .. n_fft/2 − 1`` (bin width ``sr / n_fft``);
  the Nyquist bin gets weight 0. No area normalisation.
* Natural log with the floor ``max(E, float32 eps = 1.1920929e-07)``: digital silence is ``ln(eps) ≈ −15.94``.

Output is time-major ``[..., frames, n_mels]`` (torchaudio's layout); prepared records and model inputs use
``[n_mels, frames]``. Two implementations of the same maths: :func:`fbank_np` (float64 inside, float32 out,
frame blocks bound the memory of long recordings; preparation and reference) and :func:`fbank_jnp`
(jit-able with static shapes, float32; on-device front end).

Recipe steps around the fbank proper:

* ASiT (like AST) subtracts the mean of the **whole waveform** before the fbank
  (:func:`remove_waveform_mean`, or ``subtract_waveform_mean=True``). Kept for fidelity to the recipe, though
  the per-frame DC removal, which comes before pre-emphasis, already cancels any constant offset: the step
  changes only round-off.
* The model sees ``(x − NORM_MEAN) / (2 · NORM_STD)`` = ``(x + 4.2677393) / (2 · 4.5689974)``
  (:func:`normalize`), AudioSet statistics of this front end at 128 bins as AST / ASiT publish them (ASiT
  applies them at 32 kHz). EAT computes the fbank at 16 kHz and normalises with the same statistics rounded
  to three decimals, ``(x + 4.268) / (2 · 4.569)`` (``EAT_NORM_MEAN`` / ``EAT_NORM_STD``; the feature set
  ``kaldi_fbank128_16k``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 32000
N_MELS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
# The log floor: C++ ``std::numeric_limits<float>::epsilon()``, as Kaldi and torchaudio use it.
EPSILON = float(np.finfo(np.float32).eps)  # 1.1920928955078125e-07
# Stored value of digital silence (a zero waveform): every mel energy is 0, floored to EPSILON.
LOG_EPSILON = math.log(EPSILON)  # -15.942385...
# AudioSet statistics of the 32 kHz / 128-bin fbank (AST, ASiT): model input = (x - mean) / (2 * std).
NORM_MEAN = -4.2677393
NORM_STD = 4.5689974
# EAT's: the same AudioSet statistics rounded to three decimals, with its fbank at 16 kHz (EAT's data code and
# its inference / feature-extraction scripts: model input = (x + 4.268) / (2 * 4.569)).
EAT_NORM_MEAN = -4.268
EAT_NORM_STD = 4.569

_MS = 0.001  # Kaldi's millisecond factor: window = int(sample_rate * ms * 0.001), truncated like Kaldi's cast


# ----------------------------------------------------------------------------------------------------------
# Geometry, window, mel banks
# ----------------------------------------------------------------------------------------------------------


def frame_geometry(sample_rate: int = SAMPLE_RATE) -> tuple[int, int, int]:
    """``(window, hop, n_fft)`` in samples: 25 ms, 10 ms (truncated to integers, as Kaldi does) and the next
    power of two >= window. ``(800, 320, 1024)`` at 32 kHz, ``(400, 160, 512)`` at 16 kHz."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    window = int(sample_rate * FRAME_LENGTH_MS * _MS)
    hop = int(sample_rate * FRAME_SHIFT_MS * _MS)
    if window < 2 or hop < 1:
        raise ValueError(f"sample_rate {sample_rate} Hz is too low for 25 ms / 10 ms frames")
    n_fft = 1 << (window - 1).bit_length()
    return window, hop, n_fft


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames of a wave of ``num_samples`` samples (snip_edges): ``1 + (N − window) // hop``, 0 if N < window."""
    window, hop, _ = frame_geometry(sample_rate)
    return 0 if num_samples < window else 1 + (num_samples - window) // hop


def hann_window_symmetric(length: int) -> np.ndarray:
    """Symmetric Hann window, float64 ``[length]``: ``0.5 − 0.5 cos(2πj / (length − 1))``, zero at both ends
    (``torch.hann_window(length, periodic=False)``; Kaldi's "hanning")."""
    j = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * j / (length - 1))


def mel_scale(f):
    """Kaldi's mel scale (natural-log form of HTK's): ``1127 · ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_banks(
    sample_rate: int = SAMPLE_RATE, n_mels: int = N_MELS, low_freq: float = LOW_FREQ, high_freq: float = 0.0
) -> np.ndarray:
    """Kaldi mel triangles as a read-only float64 ``[n_fft // 2 + 1, n_mels]`` matrix (power spectrum @ it).

    ``high_freq <= 0`` counts down from the Nyquist frequency (0: Nyquist itself), as in Kaldi. Triangle ``m``
    rises linearly *in mel* from corner ``m`` to 1 at corner ``m + 1`` and falls to 0 at corner ``m + 2``
    (corners ``mel_low + i · Δ``, ``Δ = (mel_high − mel_low) / (n_mels + 1)``); it is evaluated at the mel value
    of bins ``k = 0 .. n_fft/2 − 1`` (frequency ``k · sr / n_fft``). The last row, the Nyquist bin, is zero:
    Kaldi's banks have only ``n_fft / 2`` columns.

    The weights are computed in float32 arithmetic, step by step as Kaldi (``BaseFloat``) and torchaudio do
    (with a correctly rounded log), which reproduces torchaudio's banks bit for bit (up to an ulp of a mel
    value where torch's vectorised float32 log is not correctly rounded). It matters: near a triangle's ends
    a weight is a small difference of float32 mel values, and an exact (float64) computation
    differs from the reference there by up to 0.4 % of the weight, enough to move a log fbank value by ~1e-3
    when that FFT bin dominates the band.
    """
    if n_mels < 4:
        raise ValueError(f"Kaldi mel banks need at least 4 bins, got {n_mels}")
    _, _, n_fft = frame_geometry(sample_rate)
    nyquist = 0.5 * sample_rate
    high = high_freq + nyquist if high_freq <= 0.0 else high_freq
    if not (0.0 <= low_freq < nyquist and 0.0 < high <= nyquist and low_freq < high):
        raise ValueError(f"mel range {low_freq}-{high} Hz does not fit below the Nyquist {nyquist} Hz")
    f32 = np.float32
    mel_low, mel_high = float(mel_scale(low_freq)), float(mel_scale(high))  # double, like Kaldi's scalars
    delta = f32((mel_high - mel_low) / (n_mels + 1))
    i = np.arange(n_mels, dtype=f32)[None, :]
    left = f32(mel_low) + i * delta
    centre = f32(mel_low) + (i + f32(1.0)) * delta
    right = f32(mel_low) + (i + f32(2.0)) * delta
    freq = f32(sample_rate / n_fft) * np.arange(n_fft // 2, dtype=f32)
    ratio = f32(1.0) + freq / f32(700.0)
    bin_mel = (f32(1127.0) * np.log(ratio.astype(np.float64)).astype(f32))[:, None]  # [n_fft / 2, 1]
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    banks = np.zeros((n_fft // 2 + 1, n_mels), np.float64)
    banks[:-1] = np.maximum(f32(0.0), np.minimum(rising, falling))
    banks.setflags(write=False)
    return banks


@functools.lru_cache(maxsize=16)
def _window(length: int) -> np.ndarray:
    w = hann_window_symmetric(length)
    w.setflags(write=False)
    return w


def remove_waveform_mean(wave):
    """ASiT's (and AST's) preprocessing before the fbank: subtract the mean of the whole waveform (last axis).
    numpy or jax arrays alike."""
    return wave - wave.mean(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------
# numpy (float64 inside)
# ----------------------------------------------------------------------------------------------------------


def fbank_np(
    wave,
    sample_rate: int = SAMPLE_RATE,
    n_mels: int = N_MELS,
    *,
    subtract_waveform_mean: bool = False,
    block_frames: int = 2048,
) -> np.ndarray:
    """Kaldi log mel fbank of ``[..., samples]`` → ``float32 [..., frames, n_mels]`` (see the module docstring).

    Computed in float64, ``block_frames`` frames at a time (memory ~ 30 kB per frame in flight, whatever the
    wave's length). ``subtract_waveform_mean``: first remove the whole wave's mean (ASiT's preprocessing).
    Waves shorter than one window give ``[..., 0, n_mels]`` (torchaudio refuses them).
    """
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim == 0:
        raise ValueError("expected a wave of shape [..., samples], got a scalar")
    if wave.ndim > 1:
        out = np.empty((*wave.shape[:-1], num_frames(wave.shape[-1], sample_rate), n_mels), np.float32)
        for idx in np.ndindex(wave.shape[:-1]):
            out[idx] = fbank_np(
                wave[idx],
                sample_rate,
                n_mels,
                subtract_waveform_mean=subtract_waveform_mean,
                block_frames=block_frames,
            )
        return out
    if subtract_waveform_mean and wave.size:
        wave = remove_waveform_mean(wave)
    window, hop, n_fft = frame_geometry(sample_rate)
    banks = mel_banks(sample_rate, n_mels)
    hann = _window(window)
    frames_total = num_frames(wave.shape[0], sample_rate)
    out = np.empty((frames_total, n_mels), np.float32)
    if frames_total == 0:
        return out
    frames_view = np.lib.stride_tricks.sliding_window_view(wave, window)[::hop]  # a view: no copy
    for start in range(0, frames_total, max(1, block_frames)):
        frames = frames_view[start : start + block_frames]
        frames = frames - frames.mean(axis=1, keepdims=True)  # DC offset (a new array)
        emphasized = np.empty_like(frames)
        emphasized[:, 1:] = frames[:, 1:] - PREEMPHASIS * frames[:, :-1]
        emphasized[:, 0] = frames[:, 0] - PREEMPHASIS * frames[:, 0]
        emphasized *= hann
        spec = np.fft.rfft(emphasized, n=n_fft, axis=1)  # zero-padded to n_fft
        power = np.square(spec.real) + np.square(spec.imag)
        out[start : start + len(frames)] = np.log(np.maximum(power @ banks, EPSILON))
    return out


# ----------------------------------------------------------------------------------------------------------
# jax.numpy (float32, jit-able)
# ----------------------------------------------------------------------------------------------------------


def fbank_jnp(
    wave, sample_rate: int = SAMPLE_RATE, n_mels: int = N_MELS, *, subtract_waveform_mean: bool = False
) -> jax.Array:
    """jax.numpy twin of :func:`fbank_np`: ``[..., samples]`` → ``[..., frames, n_mels]``; jit- and vmap-able
    (``sample_rate``, ``n_mels`` and the flag are static: mark them so under ``jax.jit``).

    float32 for float32/int input (float64 only under jax x64). fp32 round-off is relative to a frame's loudest
    bin, so the difference to the float64 numpy path grows in bins far below it: under 1e-3 everywhere on
    audio with a noise floor, and within 70 dB of the frame peak on pure tones and chirps, whose bins ~90 dB
    down carry ~1e-2 of round-off (as float32 torchaudio's do). The tests check both.
    """
    wave = jnp.asarray(wave)
    if not jnp.issubdtype(wave.dtype, jnp.floating):
        wave = wave.astype(jnp.float32)
    if wave.ndim == 0:
        raise ValueError("expected a wave of shape [..., samples], got a scalar")
    window, hop, n_fft = frame_geometry(sample_rate)
    frames_total = num_frames(wave.shape[-1], sample_rate)
    if frames_total == 0:
        return jnp.zeros((*wave.shape[:-1], 0, n_mels), wave.dtype)
    if subtract_waveform_mean:
        wave = remove_waveform_mean(wave)
    # A static [frames, window] gather (window is not a multiple of hop, so no reshape trick): 2.5x the wave.
    index = np.arange(frames_total)[:, None] * hop + np.arange(window)[None, :]
    frames = wave[..., index]
    frames = frames - frames.mean(axis=-1, keepdims=True)
    previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = (frames - PREEMPHASIS * previous) * jnp.asarray(_window(window), dtype=wave.dtype)
    spec = jnp.fft.rfft(frames, n=n_fft, axis=-1)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    # HIGHEST: a true fp32 matmul; the TPU/GPU default would round the power spectrum to bf16/TF32.
    mel = jnp.matmul(
        power,
        jnp.asarray(mel_banks(sample_rate, n_mels), dtype=power.dtype),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.log(jnp.maximum(mel, EPSILON))


# ----------------------------------------------------------------------------------------------------------
# Normalisation (numpy or jax)
# ----------------------------------------------------------------------------------------------------------


def normalize(x):
    """Model input of ASiT / AST: ``(x − NORM_MEAN) / (2 · NORM_STD)``; keeps numpy/jax dtype."""
    return (x - NORM_MEAN) / (2.0 * NORM_STD)


def denormalize(x):
    """Inverse of :func:`normalize`."""
    return x * (2.0 * NORM_STD) + NORM_MEAN
