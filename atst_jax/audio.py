"""The ATST front end: decode and resample audio, then log-mel spectrograms in numpy and jax.numpy.

The recipe (spec/methods.md §0) is torchaudio's ``MelSpectrogram`` as ATST configures it, followed by
``AmplitudeToDB(top_db=80)`` and a fixed min/max normalisation:

* 16 kHz mono; STFT with n_fft = win = 1024 (periodic Hann), hop 160, ``center=True`` with *reflect*
  padding of n_fft // 2 samples on each side, power 2. Hence ``T = samples // 160 + 1`` frames (10 s -> 1001).
* 64 HTK-mel triangles between 60 and 7800 Hz, no area normalisation.
* ``10 * log10(max(P, 1e-10))``, floored at (that example's maximum - 80 dB).
* ``(x - NORM_MIN) / (NORM_MAX - NORM_MIN) * 2 - 1`` with fixed AudioSet statistics.

Two implementations of the same maths: ``*_np`` (float64 internally, for offline preprocessing and as the
precise reference) and ``*_jnp`` (float32, jit-able, for spectrograms computed on device). Both take waves of
shape ``[..., samples]`` and return ``[..., n_mels, frames]``.

Short inputs: reflect padding needs at least ``n_fft // 2 + 1`` (= 513) samples, and torch refuses anything
shorter. Here such waves are first zero-padded at the end to 513 samples, the spectrogram is computed, and
the result is cut back to ``samples // 160 + 1`` frames, so the frame-count contract holds for every length
>= 1 and inputs of 513 samples or more are untouched.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import soundfile as sf
import soxr

from atst_jax.errors import UserError

SAMPLE_RATE = 16000
N_FFT = 1024
WIN_LENGTH = 1024
HOP_LENGTH = 160
N_MELS = 64
F_MIN = 60.0
F_MAX = 7800.0
TOP_DB = 80.0
AMIN = 1e-10
# dB of digital silence before any top-db floor: 10 · log10(AMIN), the lowest value an unfloored log-mel takes.
SILENCE_DB = -100.0
# Fixed dB statistics of AudioSet used by ATST to map log-mels to roughly [-1, 1].
NORM_MIN = -79.6482
NORM_MAX = 50.6842

# Shortest wave that reflect padding by N_FFT // 2 accepts.
_MIN_REFLECT_LEN = N_FFT // 2 + 1


# ----------------------------------------------------------------------------------------------------------
# Filterbank and window
# ----------------------------------------------------------------------------------------------------------


def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    f_min: float = F_MIN,
    f_max: float = F_MAX,
) -> np.ndarray:
    """HTK-mel triangular filterbank without normalisation, ``float32 [n_fft // 2 + 1, n_mels]``.

    Filter ``m`` rises linearly (in Hz) from corner ``m`` to a peak of 1 at corner ``m + 1`` and falls back to
    0 at corner ``m + 2``, where the ``n_mels + 2`` corners are equally spaced on the HTK mel scale between
    ``f_min`` and ``f_max``. It is evaluated at the FFT bin centre frequencies ``k * sample_rate / n_fft``.
    """
    bin_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    corners_hz = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2))
    widths = np.diff(corners_hz)  # [n_mels + 1]
    # offset[k, j] = corner_j - f_k: positive while bin k lies below corner j.
    offset = corners_hz[None, :] - bin_hz[:, None]
    rising = -offset[:, :-2] / widths[:-1]  # (f - left) / (centre - left)
    falling = offset[:, 2:] / widths[1:]  # (right - f) / (right - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def hann_window(length: int = WIN_LENGTH) -> np.ndarray:
    """Periodic Hann window (the DFT-even one ``torch.hann_window`` and ``scipy ... sym=False`` return)."""
    n = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)


def num_frames(num_samples: int) -> int:
    """Frames produced for a wave of ``num_samples`` samples: ``num_samples // HOP_LENGTH + 1``."""
    return num_samples // HOP_LENGTH + 1


def _check_length(num_samples: int) -> None:
    if num_samples < 1:
        raise ValueError("cannot compute a spectrogram of an empty wave (0 samples)")


# Computed once at import: both are small (513 x 64 and 1024 values).
_MEL_FB = mel_filterbank()
_WINDOW = hann_window()


# ----------------------------------------------------------------------------------------------------------
# numpy implementation (float64 inside)
# ----------------------------------------------------------------------------------------------------------


def power_spectrogram_np(wave) -> np.ndarray:
    """Power STFT ``|X|^2`` of ``[..., samples]``: ``float64 [..., frames, n_fft // 2 + 1]`` (time-major)."""
    wave = np.asarray(wave, dtype=np.float64)
    length = wave.shape[-1]
    _check_length(length)
    if length < _MIN_REFLECT_LEN:
        wave = np.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, _MIN_REFLECT_LEN - length)])
    pad = N_FFT // 2
    padded = np.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(pad, pad)], mode="reflect")
    # A strided view of overlapping windows; only the first num_frames(length) are kept (more exist only
    # when a short wave was zero-padded above).
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=-1)[..., ::HOP_LENGTH, :]
    frames = frames[..., : num_frames(length), :]
    spec = np.fft.rfft(frames * _WINDOW, axis=-1)
    return spec.real**2 + spec.imag**2


def _to_db_np(power: np.ndarray) -> np.ndarray:
    """dB with an 80 dB floor below each example's maximum (max over the last two axes)."""
    db = 10.0 * np.log10(np.maximum(power, AMIN))
    peak = db.max(axis=(-2, -1), keepdims=True)
    return np.maximum(db, peak - TOP_DB)


def log_mel_db_np(wave) -> np.ndarray:
    """Log-mel in dB (top-db 80 per example) of ``[..., samples]`` as ``float32 [..., n_mels, frames]``."""
    mel = power_spectrogram_np(wave) @ _MEL_FB.astype(np.float64)  # [..., T, n_mels]
    return _to_db_np(np.swapaxes(mel, -1, -2)).astype(np.float32)


def log_mel_np(wave) -> np.ndarray:
    """Normalised log-mel ``float32 [..., n_mels, frames]``: :func:`log_mel_db_np`, :func:`normalize_db`."""
    return normalize_db(log_mel_db_np(wave))


# ----------------------------------------------------------------------------------------------------------
# jax.numpy implementation (float32, jit-able)
# ----------------------------------------------------------------------------------------------------------


def _as_float_jnp(wave) -> jax.Array:
    """A jax array in the input's float dtype (float32 for ints). float64 survives only under jax x64, which
    the tests use to check the algorithm apart from fp32 round-off; production runs are float32."""
    wave = jnp.asarray(wave)
    if not jnp.issubdtype(wave.dtype, jnp.floating):
        wave = wave.astype(jnp.float32)
    return wave


def _power_spectrogram_jnp(wave: jax.Array) -> jax.Array:
    """``[..., frames, n_fft // 2 + 1]`` power STFT; shapes are static, so this traces once per length."""
    wave = _as_float_jnp(wave)
    length = wave.shape[-1]
    _check_length(length)
    if length < _MIN_REFLECT_LEN:
        wave = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, _MIN_REFLECT_LEN - length)])
    pad = N_FFT // 2
    padded = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(pad, pad)], mode="reflect")
    # Gather the overlapping frames with a static [T, n_fft] index (n_fft is not a multiple of hop, so a
    # reshape trick does not apply). The gathered array is ~6.4x the wave's size.
    starts = np.arange(num_frames(length)) * HOP_LENGTH
    index = starts[:, None] + np.arange(N_FFT)[None, :]
    frames = padded[..., index] * jnp.asarray(_WINDOW, dtype=wave.dtype)
    spec = jnp.fft.rfft(frames, axis=-1)
    return jnp.real(spec) ** 2 + jnp.imag(spec) ** 2


def log_mel_db_jnp(wave: jax.Array) -> jax.Array:
    """jax.numpy twin of :func:`log_mel_db_np`: float32 ``[..., n_mels, frames]``; jit- and vmap-able.

    fp32 round-off in the FFT is relative to the loudest bin, so the difference to the float64 numpy path
    grows towards the -80 dB floor: ~1e-5 dB near the peak, up to a few 1e-3 dB in bins 70-80 dB below it
    on signals with that much dynamic range (e.g. a loud tone over a faint noise floor).
    """
    power = _power_spectrogram_jnp(wave)
    # HIGHEST keeps this a true fp32 matmul. The TPU/GPU default rounds inputs to bf16/TF32 (estimated
    # 0.005-0.02 dB of error, not measured), far above the fp32 FFT's own error.
    mel = jnp.matmul(power, jnp.asarray(_MEL_FB, dtype=power.dtype), precision=jax.lax.Precision.HIGHEST)
    mel = jnp.swapaxes(mel, -1, -2)
    db = 10.0 * jnp.log10(jnp.maximum(mel, AMIN))
    # Per-example floor. (torchaudio's AmplitudeToDB on a batched [B, F, T] tensor would take one max over
    # the whole batch; ATST applies it to one clip at a time, which is what this reproduces.)
    peak = jnp.max(db, axis=(-2, -1), keepdims=True)
    return jnp.maximum(db, peak - TOP_DB)


def log_mel_jnp(wave: jax.Array) -> jax.Array:
    """Normalised log-mel ``float32 [..., n_mels, frames]`` computed with jax.numpy."""
    return normalize_db(log_mel_db_jnp(wave))


# ----------------------------------------------------------------------------------------------------------
# Normalisation (numpy or jax)
# ----------------------------------------------------------------------------------------------------------


def normalize_db(x):
    """Map dB values with ATST's fixed AudioSet min/max: NORM_MIN -> -1, NORM_MAX -> +1 (not clipped).

    Works on numpy and jax arrays alike and keeps their dtype (Python-float constants are weakly typed).
    """
    return (x - NORM_MIN) / (NORM_MAX - NORM_MIN) * 2.0 - 1.0


def denormalize_db(x):
    """Inverse of :func:`normalize_db`."""
    return (x + 1.0) / 2.0 * (NORM_MAX - NORM_MIN) + NORM_MIN


# ----------------------------------------------------------------------------------------------------------
# Decoding and resampling
# ----------------------------------------------------------------------------------------------------------


class AudioError(UserError):
    """An audio file that cannot be turned into a usable wave; the message names the file and the reason."""


def resample(wave, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited soxr ("HQ") resampling to float32; ``wave``: ``[samples]`` or ``[channels, samples]``.

    Output length is ``round(samples * target_sr / orig_sr)``. Returns the input (as float32) when the rates
    already match.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if wave.ndim not in (1, 2):
        raise ValueError(f"expected [samples] or [channels, samples], got shape {wave.shape}")
    if orig_sr == target_sr:
        return wave
    # soxr wants time on the first axis.
    out = soxr.resample(wave.T, orig_sr, target_sr, quality="HQ")
    return np.ascontiguousarray(out.T, dtype=np.float32)


def _wav_truncation(path: Path) -> str | None:
    """For a RIFF/WAVE file, say why it is truncated (data chunk shorter than its header declares), else None.

    libsndfile silently reads what is there, so a cut-off download would otherwise pass as a shorter clip.
    Size fields of 0 or 0xFFFFFFFF are placeholders left by streaming writers and are not treated as errors.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        for _ in range(64):  # real files have a handful of chunks; bound the walk on garbage
            f.seek(pos)
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"data":
                available = file_size - pos - 8
                if size not in (0, 0xFFFFFFFF) and available < size:
                    return f"truncated: WAV header declares {size} bytes of audio, only {available} present"
                return None
            pos += 8 + size + (size & 1)  # chunks are word-aligned
    return None


def _decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    """``([channels, samples] float32, sample_rate)`` via libsndfile; raises on failure or truncation."""
    with sf.SoundFile(str(path)) as f:
        sample_rate, declared = f.samplerate, f.frames
        data = f.read(dtype="float32", always_2d=True)
    # Compressed formats (mp3) report an estimated length; a big shortfall means the stream was cut off.
    if declared > 0 and len(data) < 0.99 * declared:
        raise AudioError(f"{path}: truncated: decoded {len(data)} of {declared} declared frames")
    return data.T, sample_rate


def _decode_fallback(path: Path) -> tuple[np.ndarray, int]:
    """Decoders other than libsndfile (audioread backends such as ffmpeg/gstreamer, when installed)."""
    import librosa  # imported lazily: only needed for formats libsndfile cannot read

    with warnings.catch_warnings():
        # librosa warns that it is falling back to (deprecated) audioread: that is the point here.
        warnings.simplefilter("ignore")
        data, sample_rate = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
    return np.atleast_2d(data), int(sample_rate)


def load_audio(path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file to a mono ``float32 [samples]`` wave at ``target_sr``.

    Integer PCM is scaled to [-1, 1); float files are passed through unscaled (no clipping). Channels are
    averaged. Resampling uses soxr "HQ". Raises :class:`AudioError` for a missing path, a directory, an empty,
    unreadable or truncated file, a file with no samples, or one containing NaN/Inf.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    reason = _wav_truncation(path)
    if reason is not None:
        raise AudioError(f"{path}: {reason}")

    try:
        data, sample_rate = _decode_soundfile(path)
    except AudioError:
        raise
    except Exception as sf_error:  # any libsndfile failure: try the other decoders
        try:
            data, sample_rate = _decode_fallback(path)
        except Exception as fb_error:
            raise AudioError(
                f"{path}: unreadable audio (libsndfile: {sf_error or type(sf_error).__name__}; "
                f"fallback decoder: {fb_error or type(fb_error).__name__})"
            ) from fb_error

    if data.size == 0:
        raise AudioError(f"{path}: contains no audio samples")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: contains NaN or Inf samples")
    mono = data.mean(axis=0, dtype=np.float32) if data.shape[0] > 1 else data[0]
    return np.ascontiguousarray(resample(mono, sample_rate, target_sr), dtype=np.float32)


_WINDOW32 = hann_window().astype(np.float32)
_MEL_FB32 = mel_filterbank()  # float32 [513, n_mels]


def log_mel_db_fast(wave: np.ndarray, top_db: float | None = TOP_DB) -> np.ndarray:
    """`log_mel_db_np` in float32 with scipy's FFT: float32 [n_mels, frames], same frames and floor.

    `top_db`: the floor below the wave's maximum (80 dB, ATST's); None: no floor, only the `AMIN` limit
    (values down to `SILENCE_DB` = −100 dB; the `atst_logmel64_unfloored` feature set).

    Why not the float64 reference: preparation is CPU-bound and the float64 FFT is ~3x slower, while the
    records store float16 dB (steps of 1/32 dB around ±40 dB). float32 round-off is relative to the loudest
    bin (~1e-7), i.e. ~140 dB down, far below the 80 dB floor: the two agree to ~1e-3 dB (tests check it).
    Short waves are zero-padded to the 513 samples reflect padding needs and cut back, as the reference does.
    """
    wave = np.asarray(wave, np.float32)
    n = wave.shape[-1]
    if n < 1:
        raise ValueError("cannot compute a spectrogram of an empty wave")
    frames_out = num_frames(n)
    if n < N_FFT // 2 + 1:
        wave = np.pad(wave, (0, N_FFT // 2 + 1 - n))
    padded = np.pad(wave, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:frames_out]
    # complex64 [T, 513]. (Not overwrite_x=True: scipy then takes an in-place path measured 4x slower.)
    spec = scipy.fft.rfft(frames * _WINDOW32, axis=-1)
    power = np.square(spec.real)
    power += np.square(spec.imag)
    db = np.log10(np.maximum(power @ _MEL_FB32, np.float32(AMIN)))
    db *= np.float32(10.0)
    if top_db is not None:
        np.maximum(db, db.max() - np.float32(top_db), out=db)
    return np.ascontiguousarray(db.T)
