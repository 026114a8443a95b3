"""ATST-Clip's 80 dB floor per crop on the unfloored log-mel (``atst_logmel64_unfloored``), and preparing and
reading the two feature sets added for fidelity (that one and EAT's 16 kHz Kaldi fbank ``kaldi_fbank128_16k``;
the fbank itself against torchaudio is in test_fbank.py)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from conftest import config_path

from atst_jax import audio, fbank, features
from atst_jax.data import pipeline, prepare
from atst_jax.data.records import encode_example, list_record_files, read_features
from atst_jax.methods.atst_clip import AtstClip, floor_below_peak
from atst_jax.sharding import ConfigError
from atst_jax.train import load_config

UNFLOORED = "atst_logmel64_unfloored"
EAT = "kaldi_fbank128_16k"
SR = 16000
# A crop's frames that see only its own samples: the STFT's reflect padding (n_fft / 2 = 512 samples) reaches
# 3.2 hops into a crop computed from its own waveform.
EDGE = 4


def loud_then_quiet(seed=0):
    """4 s: loud noise, then a faint 1 kHz tone over fainter noise with a burst at 3.0 s (the quiet half's
    maximum, well inside the quiet crop below)."""
    rng = np.random.default_rng(seed)
    n = 4 * SR
    t = np.arange(n) / SR
    wave = np.zeros(n)
    wave[: 2 * SR] = 0.3 * rng.standard_normal(2 * SR)
    quiet = slice(2 * SR, n)
    wave[quiet] = 1e-3 * np.sin(2 * np.pi * 1000 * t[quiet]) + 3e-6 * rng.standard_normal(2 * SR)
    burst = slice(int(2.95 * SR), int(3.05 * SR))
    wave[burst] += 3e-3 * np.sin(2 * np.pi * 1000 * t[burst])
    return wave.astype(np.float32)


def clip_method(**fields):
    config = load_config(config_path("atst_clip") + ":tiny")
    config.atst_clip.update(fields)
    method = AtstClip(config)
    method.check()
    return method


def test_unfloored_feature_set():
    fs, floored = features.get(UNFLOORED), features.get(features.DEFAULT_FEATURES)
    wave = loud_then_quiet()
    u = fs.compute(wave)
    assert u.shape == (64, fs.num_frames(len(wave))) == (64, 401) and u.dtype == np.float32
    np.testing.assert_array_equal(u, audio.log_mel_db_fast(wave, top_db=None))
    # The per-clip floor is the only difference from atst_logmel64.
    np.testing.assert_array_equal(np.maximum(u, u.max() - np.float32(80.0)), floored.compute(wave))
    assert u.min() < u.max() - 100  # detail below the clip's floor is kept
    np.testing.assert_array_equal(fs.compute(np.zeros(800, np.float32)), audio.SILENCE_DB)  # 10·log10(amin)
    # Same normalisation as atst_logmel64; padding is a zero wave's level; no floor baked in.
    assert (fs.scale, fs.offset, fs.sample_rate, fs.hop_length) == (
        floored.scale,
        floored.offset,
        floored.sample_rate,
        floored.hop_length,
    )
    assert fs.silence == -100.0 and not fs.pad_with_clip_min and fs.clip_floor_db == 0
    assert floored.clip_floor_db == 80.0
    assert fs.db_span(80.0) == pytest.approx(80.0 * 2 / (audio.NORM_MAX - audio.NORM_MIN))
    assert features.get(EAT).db_span(10 * np.log10(np.e)) == pytest.approx(features.get(EAT).scale)


def test_quiet_crop_floors_at_its_own_max_loud_crop_as_per_clip():
    fs = features.get(UNFLOORED)
    method = clip_method(features=UNFLOORED)
    assert [c.features for c in method.inputs()] == [UNFLOORED] * 2
    wave = loud_then_quiet()
    u = fs.compute(wave)
    per_clip = features.get(features.DEFAULT_FEATURES).compute(wave)
    frames = 101  # 1 s
    starts = {"loud": 50, "quiet": 250}
    x = jnp.stack([fs.normalize(u[:, s : s + frames]) for s in starts.values()])
    lengths = jnp.full((2,), frames)
    batch = {"anchor": x, "anchor_length": lengths, "positive": x, "positive_length": lengths}
    loud, quiet = np.asarray(method.floor_crops(batch)["anchor"])

    # The quiet crop: equal to atst_logmel64 of the cropped waveform itself (its own max − 80 dB), on the
    # frames the crop's reflect padding does not reach.
    s = starts["quiet"]
    direct = audio.log_mel_db_fast(wave[s * 160 : (s + frames - 1) * 160])
    assert direct.shape == (64, frames)
    inner = slice(EDGE, frames - EDGE)
    np.testing.assert_allclose(quiet[:, inner], fs.normalize(direct)[:, inner], rtol=0, atol=2e-6)
    # ... which keeps detail the per-clip floor (the loud half's max − 80 dB) flattens, and floors the rest.
    crop_u, clip_floor = u[:, s : s + frames], u.max() - 80
    own_floor = crop_u.max() - 80
    assert clip_floor - own_floor > 20
    assert np.mean((crop_u > own_floor) & (crop_u < clip_floor)) > 0.05
    assert np.mean(crop_u < own_floor) > 0.05  # the floor acts
    assert np.mean(per_clip[:, s : s + frames] == per_clip.min()) > 0.3

    # The loud crop holds the clip's maximum: its floor is the clip's, so it equals per-clip flooring.
    s = starts["loud"]
    assert u[:, s : s + frames].max() == u.max()
    np.testing.assert_allclose(loud, fs.normalize(per_clip[:, s : s + frames]), rtol=0, atol=2e-6)


def test_floor_ignores_padding_and_lifts_it():
    depth = features.get(UNFLOORED).db_span(80.0)
    x = np.full((3, 4, 6), -1.3, np.float32)
    x[:, :, 1] = 0.5  # the valid maximum
    x[:, :, 4:] = 9.0  # beyond length 4: must not set the floor
    x[2, :, 4:] = -1.31  # padding below the floor: lifted to it
    out = np.asarray(floor_below_peak(jnp.asarray(x), jnp.array([4, 0, 4]), depth))
    floor = np.float32(0.5 - depth)
    np.testing.assert_allclose(out[0, :, :4], np.where(x[0, :, :4] < floor, floor, x[0, :, :4]), atol=1e-7)
    np.testing.assert_array_equal(out[0, :, 4:], 9.0)
    np.testing.assert_array_equal(out[1], x[1])  # an empty crop: unchanged
    np.testing.assert_allclose(out[2, :, 4:], floor, atol=1e-7)


def test_floor_is_a_no_op_on_per_clip_floored_features_and_refused_below_their_floor():
    x = jnp.asarray(np.random.default_rng(0).uniform(-2, 1, (2, 64, 10)).astype(np.float32))
    batch = {
        "anchor": x,
        "anchor_length": jnp.array([10, 5]),
        "positive": x,
        "positive_length": jnp.array([3, 10]),
    }
    # The official per-crop floor is the default; on per-clip floored data it is a no-op.
    default = clip_method()
    assert default.cfg.features == UNFLOORED and default.cfg.crop_floor_db == 80.0
    assert default.crop_floor_depth() > 0
    floored = clip_method(features=features.DEFAULT_FEATURES)
    assert floored.crop_floor_depth() == 0 and floored.floor_crops(batch) is batch
    assert clip_method(crop_floor_db=0.0).floor_crops(batch) is batch
    with pytest.raises(ConfigError, match="below the 80 dB floor"):
        clip_method(features=features.DEFAULT_FEATURES, crop_floor_db=60.0)
    with pytest.raises(ConfigError, match="atst_clip.features"):
        clip_method(features="nope")


def _prepare(tmp_path, name):
    d = tmp_path / "audio"
    d.mkdir(exist_ok=True)
    sf.write(d / "a.wav", loud_then_quiet()[: 2 * SR + 8000], SR, subtype="FLOAT")  # 2.5 s
    sf.write(d / "b32k.wav", np.random.default_rng(1).uniform(-0.5, 0.5, 16000), 32000, subtype="PCM_16")
    out = tmp_path / name
    argv = ["folder", "--audio_dir", str(d), "--out", str(out), "--workers", "0", "--no_progress"]
    assert prepare.main(argv + ["--features", name]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    fs = features.get(name)
    assert (meta["features"], meta["n_mels"], meta["sample_rate"], meta["hop_length"]) == (
        name,
        fs.n_mels,
        fs.sample_rate,
        fs.hop_length,
    )
    files = list_record_files(str(out))
    assert read_features(files) == name
    return d, files


def test_prepare_and_read_eat_fbank(tmp_path):
    d, files = _prepare(tmp_path, EAT)
    fs = features.get(EAT)
    ds = pipeline.make_dataset(
        files, seed=0, crops=[("spec", 300)], per_host_batch=2, shuffle=False, num_epochs=1, features=EAT
    )
    batch = ds[0]
    assert batch["spec"].shape == (2, 128, 300)
    assert batch["spec_length"].tolist() == [fs.num_frames(40000), fs.num_frames(8000)] == [248, 48]
    # Stored at 16 kHz (b is resampled from 32 kHz), normalised with EAT's constants, padded with ln(eps).
    for row, length, name in zip(batch["spec"], batch["spec_length"], ("a.wav", "b32k.wav"), strict=True):
        wave = audio.load_audio(d / name, 16000)
        ref = fbank.fbank_np(wave, 16000, 128, subtract_waveform_mean=True).T
        expected = (ref.astype(np.float16).astype(np.float32) + 4.268) / (2 * 4.569)
        np.testing.assert_allclose(row[:, :length], expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(row[:, length:], (fbank.LOG_EPSILON + 4.268) / (2 * 4.569), atol=1e-6)


def test_prepare_and_read_unfloored_log_mel(tmp_path):
    d, files = _prepare(tmp_path, UNFLOORED)
    fs = features.get(UNFLOORED)
    ds = pipeline.make_dataset(
        files,
        seed=0,
        crops=[("anchor", 300)],
        per_host_batch=2,
        shuffle=False,
        num_epochs=1,
        features=UNFLOORED,
    )
    batch = ds[0]
    a = batch["anchor"][0, :, :251]
    ref = audio.log_mel_db_fast(audio.load_audio(d / "a.wav", SR), top_db=None)
    assert batch["anchor_length"].tolist() == [251, 51] and ref.shape == (64, 251)
    np.testing.assert_allclose(a, fs.normalize(ref.astype(np.float16).astype(np.float32)), atol=1e-6)
    assert ref.min() < ref.max() - 80  # stored without the floor
    # Padding: a zero wave's -100 dB, which the per-crop floor then lifts to the crop's own floor.
    np.testing.assert_allclose(batch["anchor"][0, :, 251:], fs.normalize(-100.0), atol=1e-6)
    both = {**batch, "positive": batch["anchor"], "positive_length": batch["anchor_length"]}
    floored = np.asarray(clip_method(features=UNFLOORED).floor_crops(both)["anchor"])
    peak = batch["anchor"][0, :, :251].max()
    np.testing.assert_allclose(floored[0, :, 251:], peak - fs.db_span(80.0), atol=1e-6)


def test_pipeline_pads_unfloored_crops_with_silence():
    mel = np.full((64, 5), -30.0, np.float16)
    ex = {"mel": mel, "length": 2, "id": "x", "labels": np.zeros(0, np.int32)}
    crop = pipeline.CropExample([("anchor", 4)], features=UNFLOORED)
    out = crop.random_map((0, encode_example(ex)), np.random.default_rng(0))
    np.testing.assert_allclose(out["anchor"][:, 2:], audio.normalize_db(np.float32(-100.0)), atol=1e-6)


def test_make_views_floors_the_crops_first(monkeypatch):
    import jax

    from atst_jax.data import views

    monkeypatch.setattr(views, "random_resize_crop", lambda key, x, *a, **k: x)
    method = clip_method(features=UNFLOORED, mixup_ratio=0.0)
    x = jnp.asarray(np.random.default_rng(0).uniform(-2.5, 1, (2, 64, 10)).astype(np.float32))
    batch = {
        "anchor": x,
        "anchor_length": jnp.array([10, 5]),
        "positive": x,
        "positive_length": jnp.array([3, 10]),
    }
    out = method.make_views(jax.random.key(0), batch)
    expected = method.floor_crops(batch)
    for name in ("anchor", "positive"):
        np.testing.assert_array_equal(out[name], expected[name])
        assert not np.array_equal(out[name], x)


def test_a_run_trained_on_crops_floored_each_is_evaluated_on_clips_floored_each():
    """Training floors each crop at its own maximum; inference, embedding, probes and exports compute the
    floored log-mel of whatever input they are given (the official evaluation transform), not the unfloored
    training set."""
    from atst_jax import inference

    config = load_config(config_path("atst_clip") + ":tiny")
    assert {crop.features for crop in AtstClip(config).inputs()} == {UNFLOORED}
    assert features.get(UNFLOORED).inference_name == features.DEFAULT_FEATURES
    assert inference.run_features(config.to_dict(), None) == features.DEFAULT_FEATURES
    assert inference.front_end(inference.run_features(config.to_dict(), None)).features == "atst_logmel64"
