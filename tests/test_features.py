"""Feature sets end to end: preparation with ``--features kaldi_fbank128`` (folder, DCASE strong TSV, AudioSet
CSVs), the shard fingerprints, the embedded dataset per feature set, the pipeline's padding value, and the
trainer asking for the feature set of its method's crops. Clips are short: the fbank itself is tested in
test_fbank.py."""

import json
import os
import types

import numpy as np
import pytest
import soundfile as sf

from atst_jax import audio, fbank, features
from atst_jax.data import pipeline, prepare
from atst_jax.data.records import decode_example, encode_example, list_record_files, read_features

KALDI = "kaldi_fbank128"


def records_of(out_dir):
    src = pipeline.make_source(list_record_files(str(out_dir)))
    return [decode_example(src[i]) for i in range(len(src))]


def noise(seconds, seed, sr):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, int(round(seconds * sr)))


def expected_fbank(path, start=0.0, stop=None):
    """The reference: the wave resampled to 32 kHz (mean removed per clip) → numpy fbank, [128, frames]."""
    wave = audio.load_audio(path, 32000)
    wave = wave[int(round(start * 32000)) : None if stop is None else int(round(stop * 32000))]
    return fbank.fbank_np(wave, 32000, 128, subtract_waveform_mean=True).T


def assert_fbank_record(rec, ref):
    n = rec["length"]
    assert rec["mel"].dtype == np.float16 and rec["mel"].shape == (128, n) == ref.shape
    # float16 storage: half an ulp is 2^-11 relative (values here are within ±20).
    np.testing.assert_allclose(rec["mel"].astype(np.float32), ref, rtol=2**-11, atol=1e-6)


def test_prepare_folder_with_kaldi_fbank(tmp_path):
    d = tmp_path / "audio"
    d.mkdir()
    sf.write(d / "a16k.wav", noise(1.0, 1, 16000), 16000, subtype="PCM_16")
    sf.write(
        d / "b48k_stereo.wav", np.stack([noise(0.7, 2, 48000)] * 2, axis=1) * 0.5, 48000, subtype="FLOAT"
    )
    sf.write(d / "c32k.wav", noise(0.5, 3, 32000) + 0.2, 32000, subtype="FLOAT")  # a DC offset
    sf.write(d / "d_click.wav", noise(0.01, 4, 16000), 16000, subtype="PCM_16")  # shorter than one frame
    out = tmp_path / "out"
    argv = ["folder", "--audio_dir", str(d), "--out", str(out), "--workers", "0", "--no_progress"]
    assert prepare.main(argv + ["--features", KALDI]) == 0

    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["features"], meta["n_mels"], meta["sample_rate"], meta["hop_length"]) == (
        KALDI,
        128,
        32000,
        320,
    )
    assert read_features(list_record_files(str(out))) == KALDI == read_features(str(out))
    recs = {r["id"]: r for r in records_of(out)}
    assert list(recs) == ["a16k", "b48k_stereo", "c32k", "d_click"]
    for name, samples in (("a16k", 32000), ("b48k_stereo", 22400), ("c32k", 16000)):
        assert recs[name]["length"] == 1 + (samples - 800) // 320
        assert_fbank_record(recs[name], expected_fbank(d / f"{name}.wav"))
    assert recs["d_click"]["length"] == 1  # 320 samples, zero-padded to one 25 ms window
    assert features.get(KALDI).num_frames(320) == 1

    # Unknown names are refused by the CLI.
    with pytest.raises(SystemExit):
        prepare.main(argv + ["--features", "nope"])
    with pytest.raises(prepare.PrepareError, match="--features"):
        prepare.Options(features="nope")


def test_prepare_dcase_and_audioset_with_kaldi_fbank(tmp_path):
    d = tmp_path / "audio"
    d.mkdir()
    sf.write(d / "long.wav", noise(4.6, 5, 16000), 16000, subtype="PCM_16")
    sf.write(d / "YabcdEFGH12_30.000_40.000.wav", noise(1.2, 6, 44100), 44100, subtype="PCM_16")
    tsv = tmp_path / "strong.tsv"
    tsv.write_text("filename\tonset\toffset\tevent_label\nlong.wav\t1.5\t2.5\tDog\nlong.wav\t4.2\t4.4\tCat\n")
    out = tmp_path / "dcase"
    argv = ["dcase", "--tsv", str(tsv), "--audio_dir", str(d), "--out", str(out), "--clip_seconds", "2"]
    assert prepare.main(argv + ["--workers", "0", "--no_progress", "--features", KALDI]) == 0
    recs = {r["id"]: r for r in records_of(out)}
    # 2 s pieces at 32 kHz (the 0.6 s tail, shorter than --min_tail_seconds, is dropped with its Cat event);
    # events stay in seconds, relative to their piece.
    assert list(recs) == ["long@0", "long@2"]
    for k, rec in enumerate(recs.values()):
        assert rec["length"] == 1 + (64000 - 800) // 320 == 198
        assert_fbank_record(rec, expected_fbank(d / "long.wav", 2 * k, 2 * k + 2))
    np.testing.assert_allclose(recs["long@0"]["events"], [[1.5, 2.0, 1]])
    np.testing.assert_allclose(recs["long@2"]["events"], [[0.0, 0.5, 1]])
    assert json.loads((out / "metadata.json").read_text())["features"] == KALDI

    (tmp_path / "seg.csv").write_text(
        '# YTID, start_seconds, end_seconds, positive_labels\nabcdEFGH12, 30.000, 40.000, "/m/b,/m/a"\n'
    )
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n")
    out = tmp_path / "audioset"
    argv = ["audioset", "--csv", str(tmp_path / "seg.csv"), "--labels", str(tmp_path / "labels.csv")]
    argv += ["--audio_dir", str(d), "--out", str(out), "--workers", "0", "--no_progress", "--features", KALDI]
    assert prepare.main(argv) == 0
    (rec,) = records_of(out)
    assert rec["id"] == "abcdEFGH12" and rec["labels"].tolist() == [0, 1]
    assert rec["length"] == 1 + (38400 - 800) // 320
    assert_fbank_record(rec, expected_fbank(d / "YabcdEFGH12_30.000_40.000.wav"))
    assert read_features(str(out)) == KALDI


def test_fingerprint_follows_the_feature_set(tmp_path):
    d = tmp_path / "audio"
    d.mkdir()
    for i in range(3):
        sf.write(d / f"x{i}.wav", noise(0.3, i, 16000), 16000, subtype="PCM_16")
    plan = prepare.plan_folder(str(d))
    out = str(tmp_path / "out")

    def build(features_name):
        opts = prepare.Options(features=features_name)
        return prepare.build(plan, out, options=opts, workers=0, progress=False, files_per_shard=2)

    assert build(features.DEFAULT_FEATURES)["built"] == [0, 1]
    assert build(features.DEFAULT_FEATURES)["reused"] == [0, 1]
    assert read_features(out) == "atst_logmel64" and records_of(out)[0]["mel"].shape[0] == 64
    assert build(KALDI)["built"] == [0, 1]  # another feature set: nothing reused
    assert read_features(out) == KALDI and all(r["mel"].shape[0] == 128 for r in records_of(out))
    assert build(KALDI)["reused"] == [0, 1]
    items = plan.items[:2]
    default, kaldi = (
        prepare._fingerprint(plan, prepare.Options(features=f), "folder", "train", items)
        for f in (features.DEFAULT_FEATURES, KALDI)
    )
    assert default != kaldi


def test_embedded_dataset_with_kaldi_fbank(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    files = pipeline.ensure_embedded_dataset(cache, num_clips=8, num_shards=2, features=KALDI)
    assert (
        all(os.path.dirname(f) == os.path.join(cache, f"records_{KALDI}") for f in files) and len(files) == 2
    )
    assert os.path.exists(os.path.join(cache, f"embedded_dataset_{KALDI}.json"))
    assert not os.path.exists(os.path.join(cache, "embedded_dataset.json"))  # the default's marker
    assert read_features(files) == KALDI
    recs = [decode_example(r) for r in (pipeline.make_source(files)[i] for i in range(8))]
    assert all(r["mel"].shape == (128, 998) and r["length"] == 998 for r in recs)  # 10 s at 32 kHz
    assert all(r["mel"].dtype == np.float16 and "events" in r for r in recs)
    first = next(r for r in recs if r["id"] == "clip_00000")
    assert_fbank_record(first, expected_fbank(os.path.join(cache, "audio", "clip_00000.wav")))

    # Reused without rebuilding; the default set lives beside it, in records/.
    real_build = prepare.build
    monkeypatch.setattr(prepare, "build", lambda *a, **k: pytest.fail("rebuilt a finished dataset"))
    assert pipeline.ensure_embedded_dataset(cache, num_clips=8, num_shards=2, features=KALDI) == files
    monkeypatch.setattr(prepare, "build", real_build)
    default = pipeline.ensure_embedded_dataset(cache, num_clips=8, num_shards=2)
    assert all(os.path.dirname(f) == os.path.join(cache, "records") for f in default)
    assert read_features(default) == "atst_logmel64" and read_features(files) == KALDI
    monkeypatch.setattr(prepare, "build", lambda *a, **k: pytest.fail("rebuilt a finished dataset"))
    assert pipeline.ensure_embedded_dataset(cache, num_clips=8, num_shards=2, features=KALDI) == files
    with pytest.raises(KeyError, match="unknown feature set"):
        pipeline.ensure_embedded_dataset(cache, num_clips=8, features="nope")


def test_pipeline_pads_kaldi_crops_with_silence():
    fs = features.get(KALDI)
    mel = np.full((128, 5), -3.0, np.float16)
    mel[:, 2:] = 999  # beyond length: must not be read
    ex = {"mel": mel, "length": 2, "id": "x", "labels": np.zeros(0, np.int32)}
    crop = pipeline.CropExample([("spec", 4)], features=KALDI)
    out = crop.random_map((0, encode_example(ex)), np.random.default_rng(0))
    np.testing.assert_allclose(out["spec"][:, :2], fbank.normalize(-3.0), atol=1e-6)
    np.testing.assert_allclose(out["spec"][:, 2:], fbank.normalize(fbank.LOG_EPSILON), atol=1e-6)
    empty = crop.random_map((0, encode_example(dict(ex, length=0))), np.random.default_rng(0))
    np.testing.assert_allclose(empty["spec"], np.float32(fs.silence) * fs.scale + fs.offset, atol=1e-6)
    # The default keeps its behaviour: the clip's own floor for short crops, NORM_MIN for empty clips.
    default = features.get(features.DEFAULT_FEATURES)
    assert default.silence == audio.NORM_MIN and default.pad_with_clip_min
    crop = pipeline.CropExample([("spec", 4)])
    out = crop.random_map((0, encode_example(dict(ex, mel=mel[:64]))), np.random.default_rng(0))
    np.testing.assert_allclose(out["spec"][:, 2:], audio.normalize_db(np.float32(-3.0)), atol=1e-6)
    empty = crop.random_map((0, encode_example(dict(ex, mel=mel[:64], length=0))), np.random.default_rng(0))
    np.testing.assert_allclose(empty["spec"], -1.0, atol=1e-6)


def test_train_builds_the_embedded_data_of_the_method_crops(monkeypatch, tmp_path):
    from atst_jax import methods, trainer
    from atst_jax.methods import Crop

    calls = []
    monkeypatch.setattr(pipeline, "ensure_embedded_dataset", lambda cache, **kw: calls.append(kw) or ["f"])
    config = types.SimpleNamespace(
        method="stub", data=types.SimpleNamespace(source="embedded", cache_dir=str(tmp_path), num_clips=8)
    )
    stub = types.SimpleNamespace(inputs=lambda: (Crop("a", 592, KALDI), Crop("b", 592, KALDI)))
    monkeypatch.setattr(methods, "build", lambda cfg: stub)
    assert trainer.data_files(config) == ["f"]
    assert calls and all(kw["features"] == KALDI and kw["num_clips"] == 8 for kw in calls)
    calls.clear()
    assert trainer.data_files(config, features_name="atst_logmel64") == ["f"]
    assert all(kw["features"] == "atst_logmel64" for kw in calls)
    stub.inputs = lambda: (Crop("a", 10, KALDI), Crop("b", 10, "atst_logmel64"))
    with pytest.raises(Exception, match="several feature sets"):
        trainer.data_files(config)
