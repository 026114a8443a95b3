"""Feature sets: which front end made a prepared dataset, how to compute it, and how its stored values are
normalised.

A prepared dataset records the name of its feature set (``atst_jax.data.prepare`` writes it into the TFDS
``metadata.json``); the pipeline takes the normalisation and the padding value from the named set instead of
module constants, and the trainer refuses, before compiling, a method or encoder that expects another feature
set. Preparation, the embedded dataset and inference compute the stored values with
``get(name).compute(wave, sample_rate)``: float32 ``[n_mels, frames]``, the layout of the records.

- ``atst_logmel64``: the ATST front end (spec/methods.md §0; ``atst_jax.audio``): 16 kHz, STFT 1024 / hop 160
  centred, 64 HTK mels 60–7800 Hz, dB with an 80 dB floor per clip; ``frames = samples // 160 + 1``. Stored as
  dB, normalised with the fixed AudioSet MinMax ``(x + 79.6482) / (50.6842 + 79.6482) · 2 − 1``. Short crops are
  padded with the clip's own minimum (its floor: the clip's silence level), empty clips with ``audio.NORM_MIN``.
- ``atst_logmel64_unfloored``: the same front end and normalisation without the 80 dB floor: dB down to
  ``10 · log10(amin) = −100`` (``audio.SILENCE_DB``). For methods that floor each *crop* at its own maximum − 80
  dB, as the official ATST-Clip does on the log-mel of each cropped waveform (``atst_clip.crop_floor_db``).
  Padding (short crops and empty clips alike) is −100 dB, what a zero waveform gives before any floor (the
  official code zero-pads a short waveform, whose padding the crop's floor then lifts). An encoder trained on it
  is evaluated on ``atst_logmel64`` (``FeatureSet.inference_name``): the official evaluation floors each input
  it is given at that input's maximum − 80 dB, which on a whole clip is the per-clip floor.
- ``kaldi_fbank128``: the ASiT / AST front end (``atst_jax.fbank``): 32 kHz, the whole wave's mean removed,
  Kaldi fbank of 25 ms frames every 10 ms (snip edges: ``frames = 1 + (samples − 800) // 320``; a wave shorter
  than one frame is zero-padded to one), 128 Kaldi mel bins 20 Hz–16 kHz, natural log floored at float32 eps.
  Stored as the raw log fbank, normalised ``(x + 4.2677393) / (2 · 4.5689974)``. Padding (short crops and empty
  clips alike) is ``ln(eps) ≈ −15.94``, what a zero waveform gives.
- ``kaldi_fbank128_16k``: EAT's front end: the same fbank at 16 kHz (25 ms / 10 ms = 400 / 160 samples, FFT
  512, ``frames = 1 + (samples − 400) // 160``, so 100 frames a second as at 32 kHz), 128 bins 20 Hz–8 kHz,
  the whole wave's mean removed; normalised with EAT's constants ``(x + 4.268) / (2 · 4.569)``. Padding
  ``ln(eps)`` (EAT itself zero-pads the raw log fbank to its 1024-frame target, a model input of ≈ 0.467
  there; AaSP does the same inside the method, ``aasp.pad_value="zero"``, and counts the padding,
  ``aasp.pad_is_signal``).

Fields every method may read: ``clip_floor_db`` (the per-clip top-db floor preparation baked into the stored
values, 0 = none) and ``db_per_unit`` (dB per stored unit: 1 for the dB log-mels, ``10 / ln 10`` for the
natural-log fbanks), so ``db_span(d)`` is ``d`` dB in model-input units.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from atst_jax import audio, fbank


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    name: str
    n_mels: int
    sample_rate: int
    hop_length: int
    # Stored value x → model input ``x · scale + offset``.
    scale: float
    offset: float
    description: str = ""
    # The front end that computes the stored values: a key of ``_EXTRACTORS`` (see ``compute``).
    kind: str = "atst_logmel"
    # Frame rule: 0 = centred frames, ``samples // hop + 1``; > 0 = Kaldi snip-edges frames of this window,
    # ``1 + (samples − window_length) // hop`` (at least 1: shorter waves are padded to one window).
    window_length: int = 0
    # Stored-domain value of silence used for padding: empty clips always, short crops too unless
    # ``pad_with_clip_min`` (then a short crop is padded with its clip's own minimum over its valid frames).
    silence: float = audio.NORM_MIN
    pad_with_clip_min: bool = True
    # The top-db floor below each clip's maximum that the stored values already have (0: none).
    clip_floor_db: float = 0.0
    # Decibels per stored unit: 1 for dB values, 10 / ln 10 for a natural log of power.
    db_per_unit: float = 1.0
    # The set an encoder trained on this one is evaluated with (inference, embedding, probes, export), when
    # training crops get a treatment inference does not repeat; "" = this set itself.
    evaluated_with: str = ""

    @property
    def inference_name(self) -> str:
        """The feature set inference computes for an encoder trained on this set (see ``evaluated_with``)."""
        return self.evaluated_with or self.name

    def num_frames(self, num_samples: int) -> int:
        """Frames of the stored features of a wave of ``num_samples`` samples at ``sample_rate``."""
        if num_samples < 1:
            raise ValueError("cannot compute features of an empty wave (0 samples)")
        if self.window_length:
            return 1 + max(0, num_samples - self.window_length) // self.hop_length
        return num_samples // self.hop_length + 1

    def compute(self, wave, sample_rate: int | None = None) -> np.ndarray:
        """Stored values of a mono ``[samples]`` wave: float32 ``[n_mels, num_frames(samples)]``.

        ``sample_rate``: the wave's rate; a different rate than the set's is resampled first (soxr HQ, as
        ``audio.load_audio`` does). None: the wave is already at ``self.sample_rate``."""
        wave = np.asarray(wave, np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a mono [samples] wave, got shape {wave.shape}")
        if sample_rate is not None and sample_rate != self.sample_rate:
            wave = audio.resample(wave, sample_rate, self.sample_rate)
        if wave.shape[0] < 1:
            raise ValueError("cannot compute features of an empty wave (0 samples)")
        return _EXTRACTORS[self.kind](wave, self)

    def normalize(self, x):
        """Model input from stored values, ``x · scale + offset`` (numpy or jax, dtype kept)."""
        return x * self.scale + self.offset

    def db_span(self, db: float) -> float:
        """A difference of ``db`` decibels in model-input units (the normalisation is affine: its offset
        cancels in a difference), e.g. the depth of a floor ``db`` below a crop's maximum."""
        return float(db) / self.db_per_unit * self.scale


def _atst_logmel(wave: np.ndarray, fs: FeatureSet) -> np.ndarray:
    # The float32 scipy path preparation has always used (records stay byte-identical).
    return audio.log_mel_db_fast(wave)


def _atst_logmel_unfloored(wave: np.ndarray, fs: FeatureSet) -> np.ndarray:
    return audio.log_mel_db_fast(wave, top_db=None)


def _kaldi_fbank(wave: np.ndarray, fs: FeatureSet) -> np.ndarray:
    # The whole wave's mean first (ASiT's preprocessing), then zero padding of a wave shorter than one
    # window (Kaldi would give no frame, and a record cannot be empty).
    wave = fbank.remove_waveform_mean(wave.astype(np.float64))
    if wave.shape[0] < fs.window_length:
        wave = np.pad(wave, (0, fs.window_length - wave.shape[0]))
    x = fbank.fbank_np(wave, fs.sample_rate, fs.n_mels)  # [frames, n_mels]
    return np.ascontiguousarray(x.T)


_EXTRACTORS = {
    "atst_logmel": _atst_logmel,
    "atst_logmel_unfloored": _atst_logmel_unfloored,
    "kaldi_fbank": _kaldi_fbank,
}


def _atst_set(name: str, **kw) -> FeatureSet:
    return FeatureSet(
        name=name,
        n_mels=audio.N_MELS,
        sample_rate=audio.SAMPLE_RATE,
        hop_length=audio.HOP_LENGTH,
        scale=2.0 / (audio.NORM_MAX - audio.NORM_MIN),
        offset=-1.0 - 2.0 * audio.NORM_MIN / (audio.NORM_MAX - audio.NORM_MIN),
        **kw,
    )


def _kaldi_set(
    name: str,
    sample_rate: int,
    n_mels: int,
    description: str,
    mean: float = fbank.NORM_MEAN,
    std: float = fbank.NORM_STD,
) -> FeatureSet:
    window, hop, _ = fbank.frame_geometry(sample_rate)
    return FeatureSet(
        name=name,
        n_mels=n_mels,
        sample_rate=sample_rate,
        hop_length=hop,
        scale=1.0 / (2.0 * std),
        offset=-mean / (2.0 * std),
        description=description,
        kind="kaldi_fbank",
        window_length=window,
        silence=fbank.LOG_EPSILON,
        pad_with_clip_min=False,
        db_per_unit=10.0 / math.log(10.0),
    )


FEATURE_SETS = {
    "atst_logmel64": _atst_set(
        "atst_logmel64",
        description="ATST log-mel: 16 kHz, n_fft 1024, hop 160, 64 HTK mels 60-7800 Hz, dB, 80 dB floor",
        clip_floor_db=audio.TOP_DB,
    ),
    "atst_logmel64_unfloored": _atst_set(
        "atst_logmel64_unfloored",
        description="ATST log-mel without the per-clip 80 dB floor: 16 kHz, n_fft 1024, hop 160, 64 HTK mels "
        "60-7800 Hz, dB down to -100 (amin 1e-10); floor each crop at its own max - 80 dB",
        kind="atst_logmel_unfloored",
        silence=audio.SILENCE_DB,
        pad_with_clip_min=False,
        # Trained crops are floored each at its own maximum − 80 dB; the official evaluation floors each input
        # it is given (the whole clip, or its centre crop) the same way: that is ``atst_logmel64``.
        evaluated_with="atst_logmel64",
    ),
    "kaldi_fbank128": _kaldi_set(
        "kaldi_fbank128",
        fbank.SAMPLE_RATE,
        fbank.N_MELS,
        "Kaldi fbank (ASiT/AST): 32 kHz, wave mean removed, 25 ms / 10 ms frames, 128 mel bins 20 Hz-16 kHz, "
        "natural log, (x + 4.2677393) / (2 * 4.5689974)",
    ),
    "kaldi_fbank128_16k": _kaldi_set(
        "kaldi_fbank128_16k",
        16000,
        fbank.N_MELS,
        "Kaldi fbank (EAT): 16 kHz, wave mean removed, 25 ms / 10 ms frames, 128 mel bins 20 Hz-8 kHz, "
        "natural log, (x + 4.268) / (2 * 4.569)",
        mean=fbank.EAT_NORM_MEAN,
        std=fbank.EAT_NORM_STD,
    ),
}

DEFAULT_FEATURES = "atst_logmel64"


def get(name: str) -> FeatureSet:
    if name not in FEATURE_SETS:
        raise KeyError(f"unknown feature set {name!r}; known: {sorted(FEATURE_SETS)}")
    return FEATURE_SETS[name]
