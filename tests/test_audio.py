"""Front end: parity with an independent librosa reference, numpy vs jax, shapes, normalisation, decoding."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import soundfile as sf

from atst_jax import audio

SR = 16000


def _signals() -> dict[str, np.ndarray]:
    """Test waves (float64, 3 s unless noted) chosen to reach every branch of the dB conversion."""
    rng = np.random.default_rng(1234)
    t = np.arange(3 * SR) / SR
    quiet = 1e-6 * np.sin(2 * np.pi * 500 * t)
    quiet[len(t) // 2 :] = 0.0  # digital silence: P = 0 hits the 1e-10 amin clamp (peak - 80 dB is lower)
    chirp = 0.4 * np.sin(2 * np.pi * (200 * t + 600 * t**2))
    return {
        "white_noise": 0.1 * rng.standard_normal(len(t)),
        # A pure tone leaves most mel bins > 80 dB below the peak: exercises the top-db floor.
        "tone_1k": 0.5 * np.sin(2 * np.pi * 1000 * t),
        # Loud chirp over a faint noise floor: ~75 dB of dynamic range, the hardest case for fp32.
        "chirp_faint_noise": chirp + 1e-4 * rng.standard_normal(len(t)),
        "quiet_then_silent": quiet,
        # A length that is not a multiple of the hop.
        "odd_length_noise": 0.3 * rng.standard_normal(2 * SR + 77),
    }


SIGNALS = _signals()


def _librosa_reference_db(wave: np.ndarray) -> np.ndarray:
    """The recipe rebuilt from librosa parts in float64: STFT, HTK mel (no norm), dB, per-example top-db."""
    # librosa's "hann" window is the periodic one (fftbins=True); center pads with np.pad(mode="reflect").
    stft = librosa.stft(
        wave.astype(np.float64), n_fft=1024, hop_length=160, window="hann", center=True, pad_mode="reflect"
    )
    fb = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=64, fmin=60.0, fmax=7800.0, htk=True, norm=None)
    mel = fb.astype(np.float64) @ (np.abs(stft) ** 2)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    return np.maximum(db, db.max() - 80.0)


_jit_db = jax.jit(audio.log_mel_db_jnp)


def test_constants():
    stft_params = (audio.SAMPLE_RATE, audio.N_FFT, audio.WIN_LENGTH, audio.HOP_LENGTH, audio.N_MELS)
    assert stft_params == (16000, 1024, 1024, 160, 64)
    assert (audio.F_MIN, audio.F_MAX, audio.TOP_DB, audio.AMIN) == (60.0, 7800.0, 80.0, 1e-10)
    assert (audio.NORM_MIN, audio.NORM_MAX) == (-79.6482, 50.6842)


def test_frames_and_shape_for_ten_seconds():
    wave = np.random.default_rng(0).standard_normal(10 * SR).astype(np.float32) * 0.1
    assert audio.log_mel_db_np(wave).shape == (64, 1001)
    out = _jit_db(wave)
    assert out.shape == (64, 1001) and out.dtype == jnp.float32
    assert audio.log_mel_np(wave).dtype == np.float32


@pytest.mark.parametrize("length", [1, 100, 159, 160, 512, 513, 700, 16000 + 159])
def test_frame_count_any_length(length):
    wave = np.random.default_rng(length).standard_normal(length) * 0.1
    expected = (64, length // 160 + 1)
    np_db = audio.log_mel_db_np(wave)
    assert np_db.shape == expected
    assert _jit_db(wave.astype(np.float32)).shape == expected
    np.testing.assert_allclose(np.asarray(_jit_db(wave.astype(np.float32))), np_db, atol=1e-3)


def test_short_wave_is_zero_padded_to_513_then_cut():
    wave = np.random.default_rng(5).standard_normal(300)
    padded = np.concatenate([wave, np.zeros(213)])
    # Same power frames as the 513-sample zero-padded wave, cut to 300 // 160 + 1 = 2 frames (the top-db
    # floor is then taken over the kept frames only).
    power = audio.power_spectrogram_np(wave)
    np.testing.assert_array_equal(power, audio.power_spectrogram_np(padded)[:2])
    with pytest.raises(ValueError):
        audio.log_mel_db_np(np.zeros(0))


def test_mel_filterbank_matches_librosa_htk_no_norm():
    fb = audio.mel_filterbank()
    assert fb.shape == (513, 64) and fb.dtype == np.float32
    ref = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=60.0, fmax=7800.0, htk=True, norm=None)
    np.testing.assert_allclose(fb, ref.T, atol=1e-6)
    # The formula is general, not tuned to the defaults.
    fb2 = audio.mel_filterbank(sample_rate=32000, n_fft=512, n_mels=40, f_min=0.0, f_max=14000.0)
    ref2 = librosa.filters.mel(sr=32000, n_fft=512, n_mels=40, fmin=0.0, fmax=14000.0, htk=True, norm=None)
    np.testing.assert_allclose(fb2, ref2.T, atol=1e-6)
    # Unnormalised triangles: every filter's peak is at most 1 (and near 1 where bins are dense).
    assert fb.max() <= 1.0 and fb[:, -1].max() > 0.9


@pytest.mark.parametrize("name", list(SIGNALS))
def test_numpy_matches_librosa_reference(name):
    wave = SIGNALS[name]
    ref = _librosa_reference_db(wave)
    out = audio.log_mel_db_np(wave)
    assert out.shape == ref.shape == (64, len(wave) // 160 + 1)
    assert np.abs(out - ref).max() <= 1e-3
    if name == "tone_1k":
        assert np.mean(ref == ref.max() - 80.0) > 0.5  # the top-db floor really is in play
    if name == "quiet_then_silent":
        assert ref.min() == pytest.approx(-100.0) and ref.max() < -20.0  # amin clamp in play


@pytest.mark.parametrize("name", list(SIGNALS))
def test_jnp_float64_matches_librosa_reference(name):
    """The jax algorithm (padding, framing, mel, floors) is exact up to precision: check it in float64."""
    wave = SIGNALS[name]
    with jax.enable_x64(True):
        out = audio.log_mel_db_jnp(jnp.asarray(wave, dtype=jnp.float64))
        assert out.dtype == jnp.float64
        out = np.asarray(out)
    assert np.abs(out - _librosa_reference_db(wave)).max() <= 1e-3


@pytest.mark.parametrize("name", list(SIGNALS))
def test_jnp_float32_matches_numpy(name):
    wave = SIGNALS[name]
    ref = audio.log_mel_db_np(wave)
    out = np.asarray(_jit_db(wave.astype(np.float32)))
    err = np.abs(out - ref)
    # fp32 FFT round-off is relative to the loudest bin: tight within 60 dB of the peak; in the last 20 dB
    # above the floor (only reached by the chirp over a faint noise floor) a few 1e-3 dB (measured 2e-3).
    assert err[ref > ref.max() - 60.0].max() <= 1e-3
    assert err.max() <= 5e-3


def test_batched_equals_per_example_with_per_example_floor():
    waves = np.stack([SIGNALS["white_noise"], SIGNALS["tone_1k"], SIGNALS["quiet_then_silent"]])
    batch_np = audio.log_mel_db_np(waves)
    assert batch_np.shape == (3, 64, 301)
    for i, wave in enumerate(waves):
        np.testing.assert_allclose(batch_np[i], audio.log_mel_db_np(wave), atol=1e-6)
    # The quiet example keeps its own floor: a batch-wide max would have clamped it flat at (loud max - 80).
    assert batch_np[2].max() < batch_np[1].max() - 80.0
    assert batch_np[2].std() > 1.0

    batch_jnp = np.asarray(_jit_db(waves.astype(np.float32)))
    for i, wave in enumerate(waves):
        np.testing.assert_allclose(batch_jnp[i], np.asarray(_jit_db(wave.astype(np.float32))), atol=1e-4)
    # Extra leading dims work too.
    nested = np.asarray(_jit_db(waves[:2].astype(np.float32).reshape(2, 1, -1)))
    np.testing.assert_allclose(nested[:, 0], batch_jnp[:2], atol=1e-4)


def test_normalisation_constants():
    x64 = np.array([-79.6482, 50.6842, (50.6842 - 79.6482) / 2])
    np.testing.assert_allclose(audio.normalize_db(x64), [-1.0, 1.0, 0.0], atol=1e-12)
    out32 = audio.normalize_db(jnp.asarray(x64, dtype=jnp.float32))
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out32), [-1.0, 1.0, 0.0], atol=1e-6)
    # An affine map with slope 2 / 130.3324 per dB.
    np.testing.assert_allclose(audio.normalize_db(np.array([0.0])), [79.6482 / 130.3324 * 2 - 1], rtol=1e-12)
    np.testing.assert_allclose(audio.denormalize_db(audio.normalize_db(x64)), x64, atol=1e-9)
    wave = SIGNALS["white_noise"]
    np.testing.assert_allclose(audio.log_mel_np(wave), audio.normalize_db(audio.log_mel_db_np(wave)))
    np.testing.assert_allclose(
        np.asarray(audio.log_mel_jnp(wave.astype(np.float32))), audio.log_mel_np(wave), atol=1e-4
    )


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------


def _peak_freqs(wave: np.ndarray, sr: int, count: int) -> list[float]:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / sr)
    # Strongest local maxima.
    is_peak = (spectrum[1:-1] > spectrum[:-2]) & (spectrum[1:-1] > spectrum[2:])
    idx = np.nonzero(is_peak)[0] + 1
    return sorted(freqs[idx[np.argsort(spectrum[idx])[::-1][:count]]])


def test_load_int16_stereo_44k_downmixes_and_resamples(tmp_path):
    sr = 44100
    t = np.arange(sr) / sr
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 1000 * t), 0.5 * np.sin(2 * np.pi * 3000 * t)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, sr, subtype="PCM_16")
    wave = audio.load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == 16000
    # Mean downmix: both tones survive at half amplitude, at their original frequencies.
    assert _peak_freqs(wave, 16000, 2) == pytest.approx([1000.0, 3000.0], abs=1.0)
    middle = wave[2000:-2000]
    t16 = np.arange(16000)[2000:-2000] / 16000
    expected = 0.25 * np.sin(2 * np.pi * 1000 * t16) + 0.25 * np.sin(2 * np.pi * 3000 * t16)
    np.testing.assert_allclose(middle, expected, atol=2e-3)


def test_load_float32_mono_16k_is_passthrough(tmp_path):
    data = (np.random.default_rng(0).standard_normal(12345) * 0.2).astype(np.float32)
    path = tmp_path / "mono.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(audio.load_audio(path), data)


@pytest.mark.parametrize(
    ("fmt", "subtype", "sr", "tol"),
    [
        ("wav", "PCM_24", 22050, 1e-3),
        ("wav", "PCM_U8", 8000, 2e-2),  # 8-bit WAV is unsigned by definition
        ("wav", "PCM_32", 48000, 1e-3),
        ("flac", "PCM_16", 48000, 1e-3),
        ("ogg", "VORBIS", 32000, 5e-2),
        ("mp3", "MPEG_LAYER_III", 24000, 5e-2),
    ],
)
def test_load_formats_keep_a_1k_tone(tmp_path, fmt, subtype, sr, tol):
    if fmt.upper() not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    t = np.arange(sr) / sr
    path = tmp_path / f"tone.{fmt}"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 1000 * t), sr, subtype=subtype)
    wave = audio.load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    if fmt == "wav":  # lossy codecs add encoder delay/padding
        assert len(wave) == 16000
    assert abs(len(wave) - 16000) < 0.1 * 16000
    assert _peak_freqs(wave, 16000, 1) == pytest.approx([1000.0], abs=2.0)
    if fmt in ("wav", "flac"):
        t16 = np.arange(16000) / 16000
        np.testing.assert_allclose(wave[500:-500], 0.5 * np.sin(2 * np.pi * 1000 * t16)[500:-500], atol=tol)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples_raise(tmp_path, bad):
    data = np.zeros(1000, dtype=np.float32)
    data[10] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match="NaN or Inf"):
        audio.load_audio(path)


def test_unusable_files_raise(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(audio.AudioError, match="empty"):
        audio.load_audio(empty)
    with pytest.raises(audio.AudioError, match="no such file"):
        audio.load_audio(tmp_path / "missing.wav")
    with pytest.raises(audio.AudioError, match="directory"):
        audio.load_audio(tmp_path)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all " * 100)
    with pytest.raises(audio.AudioError, match="unreadable"):
        audio.load_audio(garbage)

    good = tmp_path / "good.wav"
    sf.write(good, np.zeros(16000), 16000, subtype="PCM_16")
    raw = good.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(raw[:5000])  # data chunk cut short
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.load_audio(cut)
    header_only = tmp_path / "header_only.wav"
    sf.write(header_only, np.zeros(0), 16000, subtype="PCM_16")
    with pytest.raises(audio.AudioError, match="no audio samples"):
        audio.load_audio(header_only)
    broken_header = tmp_path / "broken_header.wav"
    broken_header.write_bytes(raw[:20])
    with pytest.raises(audio.AudioError):
        audio.load_audio(broken_header)
    # AudioError is a ValueError, so callers that skip bad files can catch either.
    assert issubclass(audio.AudioError, ValueError)


def test_resample_helper():
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 880 * t)])
    out = audio.resample(stereo, 44100, 16000)
    assert out.shape == (2, 16000) and out.dtype == np.float32
    assert _peak_freqs(out[1], 16000, 1) == pytest.approx([880.0], abs=1.0)
    same = audio.resample(stereo[0], 16000, 16000)
    np.testing.assert_array_equal(same, stereo[0].astype(np.float32))
