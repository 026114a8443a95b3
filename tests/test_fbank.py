"""The Kaldi fbank front end (atst_jax/fbank.py) against torchaudio's ``compliance.kaldi.fbank``, numpy against
jax.numpy, frame counts, silence and normalisation.

The reference is torchaudio's pure-Python ``torchaudio/compliance/kaldi.py``, loaded by path: the torchaudio
package itself cannot be imported beside the CPU torch (its C extension fails to load), and that file needs
``torchaudio`` only for MFCCs, so a stub stands in while it executes.

Two references: torchaudio in float64 is the algorithm without float32 round-off (the numpy path must agree
to float32 output precision); torchaudio in float32 is what ASiT/AST actually ran. In float32 the FFT's
round-off is relative to a frame's loudest bin, so bins ~90 dB or more below it (only pure tones and chirps
have them; real audio has a noise floor) carry round-off of ~1e-2 in the reference itself, and a float32 input
with a DC offset is rounded coarsely enough to move bins ~78 dB down by ~2e-3 in any float32 pipeline: there
the float32 comparisons (torchaudio float32, jax.numpy) are limited to bins within 70 dB of the frame maximum,
and beyond that the numpy path is required to be no further from float32 torchaudio than float32 torchaudio is
from float64 torchaudio.
"""

import importlib.metadata
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atst_jax import audio, fbank, features
from atst_jax.data import synthetic

TOL = 1e-3  # max abs on the log values
NEAR_PEAK = 70.0 / (10.0 / np.log(10.0))  # 70 dB of power in natural-log units (≈ 16.1)
CONFIGS = [(32000, 128), (16000, 128)]  # ASiT; EAT-style
# Compiled once per shape (eager jax.numpy compiles each op separately: seconds per new length).
fbank_jnp = jax.jit(fbank.fbank_jnp, static_argnums=(1, 2), static_argnames="subtract_waveform_mean")


def _load_kaldi():
    torch = pytest.importorskip("torch", reason="torch is needed for the torchaudio fbank reference")
    try:
        dist = importlib.metadata.distribution("torchaudio")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("torchaudio is not installed: pip install -r requirements-test.txt (torchaudio==2.11.1)")
    path = dist.locate_file("torchaudio/compliance/kaldi.py")
    spec = importlib.util.spec_from_file_location("_torchaudio_kaldi_reference", str(path))
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("torchaudio")
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")  # its top-level import; used only by mfcc()
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["torchaudio"]
        else:
            sys.modules["torchaudio"] = saved
    return torch, module


@pytest.fixture(scope="module")
def kaldi():
    return _load_kaldi()


def reference(kaldi, wave, sample_rate, n_mels, dtype="float32"):
    """torchaudio's fbank with the ASiT/AST arguments, ``[frames, n_mels]`` numpy."""
    torch, module = kaldi
    t = torch.from_numpy(np.asarray(wave)).to(getattr(torch, dtype))[None]
    out = module.fbank(
        t,
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=n_mels,
        dither=0.0,
        frame_shift=10,
    )
    return out.numpy()


def audio_like(sr, seconds=1.0):
    """Signals with a noise floor: white/uniform noise, synthetic event clips, noise bursts between digital
    silence, a tone over noise."""
    n = int(seconds * sr)
    rng = np.random.default_rng(sr)
    t = np.arange(n) / sr
    bursts = np.zeros(n)
    for start in (0.1, 0.45, 0.8):  # three bursts of a tenth of the signal, exact zeros between them
        a, b = int(start * n), int((start + 0.1) * n)
        bursts[a:b] = rng.standard_normal(b - a) * 0.3
    clip0, _ = synthetic.generate_clip(0, seed=3, duration=seconds, sample_rate=sr)
    clip1, _ = synthetic.generate_clip(5, seed=3, duration=seconds, sample_rate=sr)
    return {
        "gauss": rng.standard_normal(n) * 0.1,
        "uniform": rng.uniform(-1, 1, n),
        "synthetic0": clip0,
        "synthetic5": clip1,
        "bursts_and_silence": bursts,
        "tone_in_noise": 0.4 * np.sin(2 * np.pi * 523.0 * t) + 0.01 * rng.standard_normal(n),
    }


def pure(sr, seconds=1.0):
    """Noise-free signals: a huge dynamic range within each frame."""
    t = np.arange(int(seconds * sr)) / sr
    return {
        "tone": 0.5 * np.sin(2 * np.pi * 1000.0 * t),
        "tone_dc": 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.3,
        "chirp": 0.5 * np.sin(2 * np.pi * (100.0 * t + 3000.0 * t**2)),
        "two_tones": 0.3 * np.sin(2 * np.pi * 200.0 * t) + 0.2 * np.sin(2 * np.pi * 6000.0 * t),
    }


def near_peak(x):
    """Bins within 70 dB of their frame's maximum."""
    return x > x.max(axis=1, keepdims=True) - NEAR_PEAK


# --- numpy against torchaudio --------------------------------------------------------------------------


def test_mel_banks_match_torchaudio(kaldi):
    torch, module = kaldi
    for sr, n_mels in [*CONFIGS, (16000, 64), (44100, 128), (22050, 80)]:
        n_fft = fbank.frame_geometry(sr)[2]
        theirs, _ = module.get_mel_banks(n_mels, n_fft, sr, 20.0, 0.0, 100.0, -500.0, 1.0)
        ours = fbank.mel_banks(sr, n_mels)
        assert ours.shape == (n_fft // 2 + 1, n_mels) and not ours[-1].any()  # Nyquist bin: weight 0
        # Bit for bit where torch's float32 log is correctly rounded. On some CPUs its vectorised log is an ulp
        # off, which moves a few weights (seen on one CI machine: 67 of 65,536, ≤ 1.8e-5 apart; ≥ 99.75 % of
        # the weights still equal in every config). The equal share is what tells the float32 recipe from exact
        # float64 banks: on that machine those equal torchaudio's on only 97.0-98.5 % of the weights, also
        # within 1.4e-5, so the tolerance alone would not.
        theirs = theirs.numpy().T
        ours = ours[:-1].astype(np.float32)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
        assert np.mean(ours == theirs) > 0.995


@pytest.mark.parametrize("sr,n_mels", CONFIGS)
def test_numpy_matches_torchaudio(kaldi, sr, n_mels):
    signals = [(name, w, True) for name, w in audio_like(sr).items()]
    signals += [(name, w, False) for name, w in pure(sr).items()]
    for name, wave, has_noise_floor in signals:
        wave = np.asarray(wave, np.float32)
        ours = fbank.fbank_np(wave, sr, n_mels)
        exact = reference(kaldi, wave, sr, n_mels, "float64")
        theirs = reference(kaldi, wave, sr, n_mels, "float32")
        assert (
            ours.shape == theirs.shape == (fbank.num_frames(len(wave), sr), n_mels)
            and ours.dtype == np.float32
        )
        # The algorithm: equal to float32 output precision (observed ≤ 5e-7 where torch's float32 mel banks
        # equal ours bit for bit; ≤ 3e-5 on a CPU whose vectorised float32 log moves a few of them by an ulp).
        np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-4, err_msg=name)
        # What ASiT ran (float32 torch): within TOL; where the float32 reference's own round-off is larger,
        # no further from it than it is from the exact values.
        err = np.abs(ours - theirs)
        assert np.all(err <= np.maximum(TOL, np.abs(exact - theirs) + 1e-5)), name
        if has_noise_floor:
            assert err.max() <= TOL, (name, err.max())
        else:
            assert err[near_peak(exact)].max() <= TOL, (name, err[near_peak(exact)].max())


def test_waveform_mean_removal_is_asits_preprocessing(kaldi):
    sr = 32000
    wave = np.asarray(pure(sr, 0.5)["tone_dc"], np.float32)
    torch, _ = kaldi
    t = torch.from_numpy(wave).double()
    asit = reference(kaldi, (t - t.mean()).numpy(), sr, 128, "float64")  # ASiT: waveform - waveform.mean()
    ours = fbank.fbank_np(wave, sr, 128, subtract_waveform_mean=True)
    np.testing.assert_allclose(ours, asit, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(fbank.fbank_np(fbank.remove_waveform_mean(np.float64(wave)), sr, 128), ours)
    # Per-frame DC removal comes before pre-emphasis and cancels any constant offset, so the step changes
    # nothing but round-off (here not even that, in float64).
    np.testing.assert_allclose(fbank.fbank_np(wave, sr, 128), ours, rtol=0, atol=1e-5)


def test_frame_counts(kaldi):
    for sr, n_mels in CONFIGS:
        window, hop, n_fft = fbank.frame_geometry(sr)
        assert (window, hop, n_fft) == {32000: (800, 320, 1024), 16000: (400, 160, 512)}[sr]
        rng = np.random.default_rng(0)
        for n in (window, window + 1, window + hop - 1, window + hop, window + hop + 1, sr, 10 * sr // 4 + 7):
            wave = rng.standard_normal(n).astype(np.float32) * 0.1
            expected = 1 + (n - window) // hop
            assert fbank.num_frames(n, sr) == expected
            assert reference(kaldi, wave, sr, n_mels).shape == (expected, n_mels)
            assert fbank.fbank_np(wave, sr, n_mels).shape == (expected, n_mels)
            if n in (window, window + hop):  # jnp compiles per shape: two suffice
                assert fbank_jnp(wave, sr, n_mels).shape == (expected, n_mels)
        # Shorter than one window: no frames (torchaudio refuses such input outright).
        for n in (0, 1, window - 1):
            assert fbank.num_frames(n, sr) == 0
            assert fbank.fbank_np(np.zeros(n, np.float32), sr, n_mels).shape == (0, n_mels)
            assert fbank_jnp(jnp.zeros(n), sr, n_mels).shape == (0, n_mels)
        with pytest.raises(AssertionError):
            reference(kaldi, np.zeros(window - 1, np.float32), sr, n_mels)
    assert fbank.num_frames(10 * 32000) == 998  # a 10 s AudioSet clip at 32 kHz
    # Long input in blocks: the same as one block.
    wave = np.random.default_rng(1).standard_normal(3 * 32000).astype(np.float32)
    np.testing.assert_array_equal(
        fbank.fbank_np(wave, block_frames=7), fbank.fbank_np(wave, block_frames=4096)
    )


def test_silence_is_log_epsilon_and_normalisation(kaldi):
    zeros = np.zeros(32000, np.float32)
    theirs = reference(kaldi, zeros, 32000, 128)
    for ours in (fbank.fbank_np(zeros), np.asarray(fbank_jnp(zeros, 32000, 128))):
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(ours, np.float32(fbank.LOG_EPSILON))
    assert fbank.EPSILON == np.finfo(np.float32).eps and fbank.LOG_EPSILON == pytest.approx(-15.942385)
    # (x + 4.2677393) / (2 · 4.5689974), numpy and jax alike, and the feature set's scale/offset.
    x = np.array([-4.2677393, -4.2677393 + 2 * 4.5689974, fbank.LOG_EPSILON, 3.0])
    expected = (x + 4.2677393) / (2 * 4.5689974)
    np.testing.assert_allclose(fbank.normalize(x), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fbank.denormalize(fbank.normalize(x)), x, atol=1e-12)
    np.testing.assert_allclose(np.asarray(fbank.normalize(jnp.asarray(x, jnp.float32))), expected, atol=1e-6)
    fs = features.get("kaldi_fbank128")
    np.testing.assert_allclose(x * fs.scale + fs.offset, expected, rtol=0, atol=1e-12)
    assert (fs.sample_rate, fs.n_mels, fs.hop_length, fs.window_length) == (32000, 128, 320, 800)
    assert fs.silence == fbank.LOG_EPSILON and not fs.pad_with_clip_min


# --- jax.numpy against numpy ---------------------------------------------------------------------------


@pytest.mark.parametrize("sr,n_mels", CONFIGS)
def test_jnp_matches_numpy(sr, n_mels):
    signals = [(name, w, True) for name, w in audio_like(sr).items()]
    signals += [(name, w, False) for name, w in pure(sr).items()]
    for name, wave, has_noise_floor in signals:
        wave = np.asarray(wave, np.float32)
        ours = np.asarray(fbank_jnp(wave, sr, n_mels))
        ref = fbank.fbank_np(wave, sr, n_mels)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        err = np.abs(ours - ref)
        if has_noise_floor:
            assert err.max() <= TOL, (name, err.max())
        else:  # fp32 FFT round-off far below the frame peak, see the module docstring
            assert err[near_peak(ref)].max() <= TOL, (name, err[near_peak(ref)].max())
    # float64 (jax x64): the same algorithm, to float32 output precision.
    with jax.enable_x64(True):
        for name, wave in {**audio_like(sr, 0.5), **pure(sr, 0.5)}.items():
            got = np.asarray(fbank_jnp(np.asarray(wave, np.float64), sr, n_mels))
            np.testing.assert_allclose(got, fbank.fbank_np(wave, sr, n_mels), rtol=0, atol=1e-5, err_msg=name)


def test_jnp_batches_and_mean_removal():
    sr = 32000
    waves = np.stack([np.asarray(w, np.float32) for w in list(pure(sr, 0.3).values())[:2]])  # [2, samples]
    batched = np.asarray(fbank_jnp(waves, sr, 128, subtract_waveform_mean=True))
    single = np.stack([fbank.fbank_np(w, sr, 128, subtract_waveform_mean=True) for w in waves])
    assert batched.shape == single.shape == (2, fbank.num_frames(waves.shape[1]), 128)
    assert np.abs(batched - single)[near_peak(single.reshape(-1, 128)).reshape(single.shape)].max() <= TOL
    np.testing.assert_array_equal(fbank.fbank_np(waves, sr, 128, subtract_waveform_mean=True), single)


# --- the feature set's extractor -----------------------------------------------------------------------


def test_feature_set_compute_resamples_and_stores_mel_major():
    fs = features.get("kaldi_fbank128")
    clip, _ = synthetic.generate_clip(2, seed=0, duration=1.0)  # 16 kHz
    stored = fs.compute(clip, 16000)
    at32 = audio.resample(clip, 16000, 32000)
    assert stored.shape == (128, fs.num_frames(len(at32))) == (128, 98) and stored.dtype == np.float32
    np.testing.assert_array_equal(stored, fbank.fbank_np(at32, subtract_waveform_mean=True).T)
    # Shorter than one 25 ms window: zero-padded to one frame (a record cannot be empty).
    short = fs.compute(at32[:500])
    assert short.shape == (128, 1) == (128, fs.num_frames(500))
    padded = np.pad(fbank.remove_waveform_mean(at32[:500].astype(np.float64)), (0, 300))
    np.testing.assert_allclose(short, fbank.fbank_np(padded).T, atol=1e-6)
    # The default set is what preparation always stored.

    default = features.get(features.DEFAULT_FEATURES)
    np.testing.assert_array_equal(default.compute(clip), audio.log_mel_db_fast(clip))
    assert default.num_frames(len(clip)) == audio.num_frames(len(clip)) == default.compute(clip).shape[1]


def test_eat_feature_set_matches_torchaudio_at_16k(kaldi):
    """``kaldi_fbank128_16k`` is EAT's input: ``waveform − waveform.mean()``, then torchaudio's fbank with
    EAT's arguments (those of :func:`reference`) at 16 kHz, then ``(x + 4.268) / (2 · 4.569)``."""
    torch, _ = kaldi
    fs = features.get("kaldi_fbank128_16k")
    assert (fs.sample_rate, fs.n_mels, fs.hop_length, fs.window_length) == (16000, 128, 160, 400)
    assert fs.silence == fbank.LOG_EPSILON and not fs.pad_with_clip_min
    for name, wave in audio_like(16000).items():
        wave = np.asarray(wave, np.float32) + np.float32(0.05)  # a DC offset: EAT removes the wave's mean
        t = torch.from_numpy(wave)
        theirs = reference(kaldi, (t - t.mean()).numpy(), 16000, 128).T  # float32, as EAT runs it
        ours = fs.compute(wave)
        assert ours.shape == theirs.shape == (128, fs.num_frames(len(wave))) == (128, 98), name
        assert np.abs(ours - theirs).max() <= TOL, (name, np.abs(ours - theirs).max())
        np.testing.assert_allclose(fs.normalize(ours), (theirs + 4.268) / (2 * 4.569), rtol=0, atol=TOL)
    # A 32 kHz wave is resampled to 16 kHz first (as preparation does).
    clip = audio.resample(audio_like(16000)["synthetic0"], 16000, 32000)
    np.testing.assert_array_equal(fs.compute(clip, 32000), fs.compute(audio.resample(clip, 32000, 16000)))
