"""Feature sets: which front end made a prepared dataset, and how its stored values are normalised.

A prepared dataset records the name of its feature set (``atst_jax.data.prepare`` writes it into the TFDS
``metadata.json``); the pipeline takes the normalisation from the named set instead of module constants, and
the trainer refuses, before compiling, a method or encoder that expects another feature set.

- ``atst_logmel64``: the ATST front end (spec/methods.md §0): 16 kHz, STFT 1024 / hop 160, 64 HTK mels
  60–7800 Hz, dB with an 80 dB floor per clip; stored as dB, normalised with the fixed AudioSet MinMax
  ``(x + 79.6482) / (50.6842 + 79.6482) · 2 − 1``.
"""

from __future__ import annotations

import dataclasses

from atst_jax import audio


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    name: str
    n_mels: int
    sample_rate: int
    hop_length: int
    # Stored value x (dB) → model input ``x · scale + offset``.
    scale: float
    offset: float
    description: str = ""


FEATURE_SETS = {
    "atst_logmel64": FeatureSet(
        name="atst_logmel64",
        n_mels=audio.N_MELS,
        sample_rate=audio.SAMPLE_RATE,
        hop_length=audio.HOP_LENGTH,
        scale=2.0 / (audio.NORM_MAX - audio.NORM_MIN),
        offset=-1.0 - 2.0 * audio.NORM_MIN / (audio.NORM_MAX - audio.NORM_MIN),
        description="ATST log-mel: 16 kHz, n_fft 1024, hop 160, 64 HTK mels 60-7800 Hz, dB, 80 dB floor",
    ),
}

DEFAULT_FEATURES = "atst_logmel64"


def get(name: str) -> FeatureSet:
    if name not in FEATURE_SETS:
        raise KeyError(f"unknown feature set {name!r}; known: {sorted(FEATURE_SETS)}")
    return FEATURE_SETS[name]
