"""Dataset preparation: broken-file zoo, AudioSet/DCASE/folder inputs, TFDS readability, determinism across
worker counts, restarts, multi-job builds, and the error paths."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from atst_jax import audio
from atst_jax.data import prepare
from atst_jax.data.pipeline import make_source
from atst_jax.data.records import decode_example, list_record_files, multi_hot, read_features

SR = 16000


def tone(seconds, sr=SR, channels=1, freq=440.0, amp=0.3):
    t = np.arange(int(round(seconds * sr))) / sr
    wave = amp * np.sin(2 * np.pi * freq * t)
    if channels == 1:
        return wave
    return np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1)


def noise(seconds, seed, sr=SR):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, int(round(seconds * sr)))


def records_of(out_dir):
    src = make_source(list_record_files(out_dir))
    return [decode_example(src[i]) for i in range(len(src))]


def shard_bytes(out_dir):
    return [open(p, "rb").read() for p in list_record_files(out_dir)]


# --- the zoo --------------------------------------------------------------------------------------------

GOOD = {
    # file: expected clips (frames of each)
    "u8.wav": [51],
    "p24.wav": [51],
    "f32.wav": [51],
    "stereo.wav": [51],
    "six_channels.wav": [51],
    "sr48k.wav": [101],
    "short.wav": [6],  # 0.05 s: kept at its length
    "long65.wav": [1001] * 6 + [501],  # split into 10 s clips, the 5 s tail kept
    "silence.wav": [101],
    "good.flac": [201],
    # libsndfile reads by content, not by extension: a WAV named .mp3 is a usable file.
    "wav_named.mp3": [51],
}
BAD = {
    "empty.wav": "empty file",
    "text.wav": "unreadable audio",
    "truncated.wav": "truncated",
    "bad_header.wav": "unreadable audio",
    "truncated.flac": "unreadable audio",
    "nan.wav": "NaN",
    "dangling.wav": "broken symbolic link",
    "x.wav": "is a directory",
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    sf.write(d / "u8.wav", tone(0.5), SR, subtype="PCM_U8")
    sf.write(d / "p24.wav", tone(0.5), SR, subtype="PCM_24")
    sf.write(d / "f32.wav", tone(0.5), SR, subtype="FLOAT")
    sf.write(d / "stereo.wav", tone(0.5, channels=2), SR, subtype="PCM_16")
    sf.write(d / "six_channels.wav", tone(0.5, channels=6), SR, subtype="PCM_16")
    sf.write(d / "sr48k.wav", tone(1.0, sr=48000), 48000, subtype="PCM_16")
    sf.write(d / "short.wav", tone(0.05), SR, subtype="PCM_16")
    sf.write(d / "long65.wav", noise(65.0, 1), SR, subtype="PCM_16")
    sf.write(d / "silence.wav", np.zeros(SR), SR, subtype="PCM_16")
    sf.write(d / "good.flac", noise(2.0, 2), SR)
    sf.write(d / "wav_named.mp3", tone(0.5), SR, subtype="PCM_16", format="WAV")

    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("this is not audio\n" * 20)
    sf.write(d / "ok16.tmp", tone(1.0), SR, subtype="PCM_16", format="WAV")
    wav = (d / "ok16.tmp").read_bytes()
    (d / "ok16.tmp").unlink()
    (d / "truncated.wav").write_bytes(wav[: len(wav) // 2])
    bad = bytearray(wav)
    bad[20:24] = b"\x99\x99\x00\x00"  # fmt chunk: unknown format code, zero channels
    (d / "bad_header.wav").write_bytes(bytes(bad))
    sf.write(d / "full.flac.tmp", noise(2.0, 3), SR, format="FLAC")
    flac = (d / "full.flac.tmp").read_bytes()
    (d / "full.flac.tmp").unlink()
    (d / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    nan = tone(0.5).astype(np.float32)
    nan[100] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    os.symlink(d / "does_not_exist.wav", d / "dangling.wav")
    (d / "x.wav").mkdir()
    (d / "notes.txt").write_text("not an audio extension: ignored\n")
    (d / "._hidden.wav").write_bytes(b"\x00\x05")  # macOS resource fork: hidden, ignored
    good = dict(GOOD)
    try:  # a real MP3 where this libsndfile can write (and so read) one
        sf.write(d / "real.mp3", tone(1.0), SR, format="MP3", subtype="MPEG_LAYER_III")
        good["real.mp3"] = [101]
    except (sf.LibsndfileError, TypeError, ValueError):
        pass
    return d, good


def check_zoo_output(zoo, good, out):
    with open(out / "report.json") as f:
        report = json.load(f)
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(BAD)
    for name, expected in BAD.items():
        assert expected in reasons[name], (name, reasons[name])
    recs = records_of(str(out))
    assert report["written"] == len(recs) == sum(len(v) for v in good.values())
    by_file = {}
    for r in recs:
        by_file.setdefault(r["id"].split("@")[0], []).append(r)
    assert set(by_file) == {os.path.splitext(f)[0] for f in good}
    for name, frames in good.items():
        clips = by_file[os.path.splitext(name)[0]]
        assert [c["length"] for c in clips] == frames, name
        assert all(c["mel"].shape == (64, c["length"]) and c["mel"].dtype == np.float16 for c in clips)
        assert all(c["labels"].size == 0 and "events" not in c for c in clips)
    # Pieces of a split file are named by their start second.
    assert [c["id"] for c in by_file["long65"]] == [f"long65@{10 * k}" for k in range(7)]
    # Contents match the reference front end (float64 numpy) up to float16 storage.
    for name in ("stereo.wav", "sr48k.wav", "good.flac", "short.wav"):
        ref = audio.log_mel_db_np(audio.load_audio(zoo / name))
        got = by_file[os.path.splitext(name)[0]][0]["mel"].astype(np.float32)
        np.testing.assert_allclose(got, ref, atol=0.07, rtol=1e-3)
    wave = audio.load_audio(zoo / "long65.wav")
    ref = audio.log_mel_db_np(wave[3 * 10 * SR : 4 * 10 * SR])  # each piece has its own 80 dB floor
    np.testing.assert_allclose(by_file["long65"][3]["mel"].astype(np.float32), ref, atol=0.07, rtol=1e-3)
    np.testing.assert_array_equal(by_file["silence"][0]["mel"], np.float16(-100.0))


def test_folder_cli_on_the_zoo(zoo, tmp_path):
    zoo, good = zoo
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "atst_jax.data.prepare",
        "folder",
        "--audio_dir",
        str(zoo),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd + ["--workers", "1", "--no_progress"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{sum(len(v) for v in good.values())} clips" in proc.stdout
    check_zoo_output(zoo, good, out)
    with open(out / "labels.json") as f:
        assert json.load(f)["num_classes"] == 0


def test_long_files_can_be_cropped(zoo, tmp_path):
    plan = prepare.plan_folder(str(zoo[0]))
    result = prepare.build(
        plan, str(tmp_path), options=prepare.Options(long="crop"), workers=0, progress=False
    )
    assert result["complete"]
    (long_clip,) = [r for r in records_of(str(tmp_path)) if r["id"].startswith("long65")]
    assert long_clip["id"] == "long65" and long_clip["length"] == 1001


def test_clip_ranges():
    opts = prepare.Options()
    assert prepare.clip_ranges(int(10.02 * SR), opts) == [(0, 10 * SR)]  # AudioSet's 10.02 s files: one clip
    assert prepare.clip_ranges(5, opts) == [(0, 5)]
    assert prepare.clip_ranges(int(20.5 * SR), opts) == [
        (0, 10 * SR),
        (10 * SR, 20 * SR),
    ]  # 0.5 s tail dropped
    assert prepare.clip_ranges(int(21.5 * SR), opts)[-1] == (20 * SR, int(21.5 * SR))
    assert prepare.clip_ranges(65 * SR, prepare.Options(long="crop")) == [(0, 10 * SR)]


def test_fast_log_mel_matches_reference():
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    waves = [
        rng.normal(0, 0.1, 3 * SR),
        0.9 * np.sin(2 * np.pi * 1000 * t) + 1e-5 * rng.normal(size=t.size),  # 100 dB of dynamic range
        rng.normal(0, 0.3, 300),  # shorter than the reflect padding
        np.zeros(SR),
    ]
    for w in waves:
        ref, fast = audio.log_mel_db_np(w), audio.log_mel_db_fast(w)
        assert fast.shape == ref.shape and fast.dtype == np.float32
        # ~1e-3 dB, far below the float16 step (1/32 dB between 32 and 64 dB) the records keep.
        np.testing.assert_allclose(fast, ref, atol=2e-3, rtol=0)


# --- AudioSet, DCASE ------------------------------------------------------------------------------------

CLASS_CSV = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/m/05zppz,"Male speech, man speaking"
2,/m/0ytgt,"Child speech, kid speaking"
3,/m/0bt9lr,"Dog"
4,/m/07yv9,"Vehicle"
"""


@pytest.fixture
def audioset(tmp_path):
    d = tmp_path / "audioset"
    (d / "audio" / "part01").mkdir(parents=True)
    (d / "class_labels_indices.csv").write_text(CLASS_CSV)
    segments = [
        "# Segments csv created Sun Mar  5 10:54:31 2017",
        "# num_ytids=5, num_segs=5, num_unique_labels=5, num_positive_labels=8",
        "# YTID, start_seconds, end_seconds, positive_labels",
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/05zppz"',
        'a_b-c_dE12x, 0.000, 10.000, "/m/0bt9lr"',
        'YmissingXYZ, 10.000, 20.000, "/m/07yv9"',
        'Xyz0123abcd, 5.500, 15.500, "/m/07yv9,/m/0bt9lr,/m/0ytgt"',
    ]
    (d / "balanced.csv").write_text("\n".join(segments) + "\n")
    (d / "eval.csv").write_text(
        '# YTID, start_seconds, end_seconds, positive_labels\nzzTop_00001, 1.000, 11.000, "/m/09x0r"\n'
    )
    # Files named YTID_start_end.ext, plain YTID.ext, with a Y prefix, in sub-folders, several extensions.
    sf.write(d / "audio" / "part01" / "--PJHxphWEs_30.000_40.000.wav", noise(1.0, 1), SR, subtype="PCM_16")
    sf.write(d / "audio" / "a_b-c_dE12x.flac", noise(1.0, 2), SR)
    sf.write(d / "audio" / "YXyz0123abcd_5.500_15.500.ogg", noise(1.0, 3), SR, format="OGG", subtype="VORBIS")
    sf.write(d / "audio" / "zzTop_00001.wav", noise(0.5, 4), 44100, subtype="PCM_16")
    return d


def test_audioset_multi_hot_labels(audioset, tmp_path):
    out = tmp_path / "out"
    argv = ["audioset", "--csv", str(audioset / "balanced.csv"), "--csv", str(audioset / "eval.csv")]
    argv += ["--labels", str(audioset / "class_labels_indices.csv"), "--audio_dir", str(audioset / "audio")]
    assert prepare.main(argv + ["--out", str(out), "--workers", "0", "--no_progress"]) == 0
    recs = {r["id"]: r for r in records_of(str(out))}
    expected = {
        "--PJHxphWEs": [1, 1, 0, 0, 0],
        "a_b-c_dE12x": [0, 0, 0, 1, 0],
        "Xyz0123abcd": [0, 0, 1, 1, 1],
        "zzTop_00001": [1, 0, 0, 0, 0],
    }
    assert set(recs) == set(expected)
    for ytid, hot in expected.items():
        np.testing.assert_array_equal(multi_hot(recs[ytid]["labels"], 5), hot)
    labels = json.loads((out / "labels.json").read_text())
    assert labels["num_classes"] == 5 and labels["classes"][1] == "Male speech, man speaking"
    assert labels["ids"][3] == "/m/0bt9lr"
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 4
    (missing,) = report["skipped"]
    assert missing["file"] == "YmissingXYZ" and "balanced.csv:6" in missing["reason"]
    # The front end is recorded next to n_mels & co., and read back from the shard list the trainer holds.
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["features"] == "atst_logmel64" and meta["n_mels"] == 64
    assert read_features(list_record_files(str(out))) == "atst_logmel64"


def _strong_tsv(d):
    rows = [
        "filename\tonset\toffset\tevent_label",
        "a.wav\t0.125\t1.5\tDog",
        "a.wav\t0.3\t0.9\tSpeech",
        "b.wav\t\t\t",  # a clip without events
        "a.wav\t2.0\t2.75\tDog",
        "sub/c.wav\t0.0\t0.333\tAlarm_bell_ringing",
    ]
    (d / "strong.tsv").write_text("\n".join(rows) + "\n")
    (d / "audio" / "sub").mkdir(parents=True)
    for name, seed in (("a.wav", 1), ("b.wav", 2), ("sub/c.wav", 3)):
        sf.write(d / "audio" / name, noise(3.0, seed), SR, subtype="PCM_16")


def test_dcase_strong_events_round_trip(tmp_path):
    _strong_tsv(tmp_path)
    out = tmp_path / "out"
    argv = ["dcase", "--tsv", str(tmp_path / "strong.tsv"), "--audio_dir", str(tmp_path / "audio")]
    assert prepare.main(argv + ["--out", str(out), "--workers", "0", "--no_progress"]) == 0
    classes = json.loads((out / "labels.json").read_text())["classes"]
    assert classes == ["Alarm_bell_ringing", "Dog", "Speech"]  # sorted labels of the TSV
    recs = {r["id"]: r for r in records_of(str(out))}
    assert list(recs) == ["a", "b", "sub/c"]  # input order
    np.testing.assert_array_equal(
        recs["a"]["events"], np.array([[0.125, 1.5, 1], [0.3, 0.9, 2], [2.0, 2.75, 1]], np.float32)
    )
    assert recs["a"]["labels"].tolist() == [1, 2]
    assert recs["b"]["events"].shape == (0, 3) and recs["b"]["labels"].size == 0
    np.testing.assert_array_equal(recs["sub/c"]["events"], np.array([[0.0, 0.333, 0]], np.float32))

    # A fixed vocabulary (here a labels.json of another dataset) gives the indices of that vocabulary.
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("Speech\nDog\nAlarm_bell_ringing\nCat\n")
    out2 = tmp_path / "out2"
    assert (
        prepare.main(argv + ["--out", str(out2), "--workers", "0", "--no_progress", "--classes", str(vocab)])
        == 0
    )
    a2 = next(r for r in records_of(str(out2)) if r["id"] == "a")
    np.testing.assert_array_equal(a2["events"][:, 2], [1, 0, 1])


def test_dcase_strong_events_follow_split_pieces(tmp_path):
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "long.wav", noise(25.0, 5), SR, subtype="PCM_16")
    tsv = tmp_path / "s.tsv"
    tsv.write_text(
        "filename\tonset\toffset\tevent_label\nlong.wav\t8.0\t12.5\tDog\nlong.wav\t21.0\t22.0\tCat\n"
    )
    plan = prepare.plan_dcase(str(tsv), str(tmp_path / "audio"))
    prepare.build(plan, str(tmp_path / "out"), workers=0, progress=False)
    recs = {r["id"]: r for r in records_of(str(tmp_path / "out"))}
    assert list(recs) == ["long@0", "long@10", "long@20"]
    np.testing.assert_allclose(recs["long@0"]["events"], [[8.0, 10.0, 1]])
    np.testing.assert_allclose(recs["long@10"]["events"], [[0.0, 2.5, 1]])
    np.testing.assert_allclose(recs["long@20"]["events"], [[1.0, 2.0, 0]])
    assert recs["long@20"]["labels"].tolist() == [0]


def test_dcase_weak_labels(tmp_path):
    (tmp_path / "audio").mkdir()
    for i in range(3):
        sf.write(tmp_path / "audio" / f"w{i}.wav", noise(0.5, i), SR, subtype="PCM_16")
    tsv = tmp_path / "weak.tsv"
    tsv.write_text("filename\tevent_labels\nw0.wav\tSpeech,Dog\nw1.wav\t\nw2.wav\tDishes\n")
    out = tmp_path / "out"
    assert (
        prepare.main(
            [
                "dcase",
                "--tsv",
                str(tsv),
                "--audio_dir",
                str(tmp_path / "audio"),
                "--out",
                str(out),
                "--workers",
                "0",
                "--no_progress",
            ]
        )
        == 0
    )
    labels = json.loads((out / "labels.json").read_text())
    assert labels["classes"] == ["Dishes", "Dog", "Speech"] and not labels["strong"]
    recs = {r["id"]: r for r in records_of(str(out))}
    assert recs["w0"]["labels"].tolist() == [1, 2] and recs["w1"]["labels"].size == 0
    assert recs["w2"]["labels"].tolist() == [0] and "events" not in recs["w0"]


def test_folder_labels_from_subdirs(tmp_path):
    for path in ("dog/a.wav", "dog/deeper/b.wav", "cat/c.wav", "top.wav"):
        (tmp_path / "audio" / path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / "audio" / path, noise(0.2, 0), SR, subtype="PCM_16")
    plan = prepare.plan_folder(str(tmp_path / "audio"), labels_from_subdirs=True)
    result = prepare.build(plan, str(tmp_path / "out"), workers=0, progress=False)
    recs = {r["id"]: r["labels"].tolist() for r in records_of(str(tmp_path / "out"))}
    assert recs == {"cat/c": [0], "dog/a": [1], "dog/deeper/b": [1]}
    assert [s["file"] for s in result["skipped"]] == ["top.wav"]


# --- TFDS -----------------------------------------------------------------------------------------------


def test_tfds_reads_the_same_examples_as_grain(tmp_path):
    import tensorflow_datasets as tfds

    _strong_tsv(tmp_path)
    # OUT = DATA_DIR/NAME/VERSION: readable by name as well as by directory.
    out = tmp_path / "tfds_data" / "my_strong" / "1.0.0"
    argv = ["dcase", "--tsv", str(tmp_path / "strong.tsv"), "--audio_dir", str(tmp_path / "audio")]
    assert (
        prepare.main(argv + ["--out", str(out), "--workers", "0", "--no_progress", "--output_shards", "2"])
        == 0
    )
    grain_examples = records_of(str(out))
    by_dir = tfds.builder_from_directory(str(out)).as_data_source(split="train")
    by_name = tfds.data_source("my_strong", data_dir=str(tmp_path / "tfds_data"), split="train")
    for source in (by_dir, by_name):
        assert len(source) == len(grain_examples) == 3
        for i, ours in enumerate(grain_examples):
            theirs = source[i]
            assert theirs["id"].decode() == ours["id"] and int(theirs["length"]) == ours["length"]
            for k in ("mel", "labels", "events"):
                assert theirs[k].dtype == ours[k].dtype
                np.testing.assert_array_equal(theirs[k], ours[k])
    info = tfds.builder_from_directory(str(out)).info
    assert (
        info.metadata["classes"] == ["Alarm_bell_ringing", "Dog", "Speech"] and info.metadata["n_mels"] == 64
    )
    # The front end that made the records is recorded, and read back by the trainer's check.
    assert info.metadata["features"] == "atst_logmel64" and read_features(str(out)) == "atst_logmel64"


# --- determinism, restarts, several jobs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    for i, seconds in enumerate([1.0, 0.3, 12.0, 2.0, 0.7, 1.5, 3.0]):
        sf.write(d / f"f{i}.wav", noise(seconds, 10 + i), SR, subtype="PCM_16")
    (d / "f3b.wav").write_text("broken")
    return d


def _build(audio_dir, out, **kw):
    kw = {"files_per_shard": 2, "progress": False, "workers": 0} | kw
    return prepare.build(prepare.plan_folder(str(audio_dir)), str(out), **kw)


def test_output_is_identical_for_any_worker_count(small_set, tmp_path):
    results = {w: _build(small_set, tmp_path / f"w{w}", workers=w) for w in (0, 1, 2)}
    assert all(r["complete"] and r["num_shards"] == 4 for r in results.values())
    reference = shard_bytes(tmp_path / "w0")
    for w in (1, 2):
        assert shard_bytes(tmp_path / f"w{w}") == reference
        for name in ("report.json", "labels.json", "dataset_info.json", "features.json"):
            assert (tmp_path / f"w{w}" / name).read_bytes() == (tmp_path / "w0" / name).read_bytes()
    assert read_features(str(tmp_path / "w0")) == "atst_logmel64"  # folder inputs record it too
    # Shards hold the files in input order (sorted paths), contiguous.
    ids = [r["id"].split("@")[0] for r in records_of(str(tmp_path / "w0"))]
    assert ids == sorted(ids)


def test_rerun_skips_finished_shards_and_resumes_an_interrupted_run(small_set, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    _build(small_set, clean)
    mtimes = {p: os.stat(p).st_mtime_ns for p in list_record_files(str(clean))}
    again = _build(small_set, clean)
    assert again["built"] == [] and again["reused"] == [0, 1, 2, 3] and again["complete"]
    assert {p: os.stat(p).st_mtime_ns for p in list_record_files(str(clean))} == mtimes

    # Interrupt while the third shard is being written (the fifth file).
    calls = []
    real = prepare.process_item

    def interrupted(item, audio_dir, options):
        calls.append(item.file)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(item, audio_dir, options)

    monkeypatch.setattr(prepare, "process_item", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _build(small_set, out)
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert not (out / "dataset_info.json").exists()
    monkeypatch.setattr(prepare, "process_item", real)
    resumed = _build(small_set, out)
    assert resumed["reused"] == [0, 1] and resumed["built"] == [2, 3]
    assert shard_bytes(out) == shard_bytes(clean)
    assert (out / "report.json").read_bytes() == (clean / "report.json").read_bytes()

    # Changed options change every shard's fingerprint: nothing stale is reused.
    changed = _build(small_set, out, options=prepare.Options(long="crop"))
    assert changed["built"] == [0, 1, 2, 3]


def test_jobs_build_disjoint_parts_of_one_dataset(small_set, tmp_path):
    single = tmp_path / "single"
    _build(small_set, single)
    out = tmp_path / "multi"
    first = _build(small_set, out, num_jobs=2, job_index=0)
    assert not first["complete"] and first["built"] == [0, 2]
    assert not (out / "dataset_info.json").exists()
    with pytest.raises(ValueError, match="incomplete"):
        list_record_files(str(out))
    second = _build(small_set, out, num_jobs=2, job_index=1)
    assert second["complete"] and second["built"] == [1, 3]  # the last job to finish writes the metadata
    assert set(first["shards"]).isdisjoint(second["shards"])
    assert sorted(first["shards"] + second["shards"]) == list_record_files(str(out))
    assert shard_bytes(out) == shard_bytes(single)
    assert json.loads((out / "report.json").read_text()) == json.loads((single / "report.json").read_text())
    assert read_features(list_record_files(str(out))) == "atst_logmel64"  # in the last job's metadata


def _crash_on_three(job):
    # Module-level (picklable) stand-in for a decoder that kills its process on one input. The others take
    # a while, so a job that is innocent (2) is still in flight in the other worker when 3 brings the pool
    # down: blaming whichever job failed first would blame the wrong file.
    if job == 3:
        time.sleep(0.1)
        os._exit(1)
    time.sleep(0.3)
    return [b"%d" % job], None


def test_a_crashing_decoder_is_isolated_and_reported():
    results = list(prepare._ordered_map(range(6), workers=2, fn=_crash_on_three))
    assert [r[0] for r in results] == [[b"0"], [b"1"], [b"2"], [], [b"4"], [b"5"]]
    assert "worker process died" in results[3][1] and all(
        r[1] is None for i, r in enumerate(results) if i != 3
    )


# --- errors ---------------------------------------------------------------------------------------------


def _run_main(argv, capsys):
    code = prepare.main(argv)
    err = capsys.readouterr().err
    return code, err


def test_no_usable_files_is_one_clear_error(small_set, tmp_path, capsys):
    (tmp_path / "empty_dir").mkdir()
    code, err = _run_main(
        ["folder", "--audio_dir", str(tmp_path / "empty_dir"), "--out", str(tmp_path / "o1")], capsys
    )
    assert code != 0 and err.count("\n") == 1 and err.startswith("prepare: error: no usable audio")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.wav").write_text("nope")
    (broken / "b.flac").write_bytes(b"")
    code, err = _run_main(
        [
            "folder",
            "--audio_dir",
            str(broken),
            "--out",
            str(tmp_path / "o2"),
            "--workers",
            "0",
            "--no_progress",
        ],
        capsys,
    )
    assert code != 0 and err.count("\n") == 1 and "no usable audio: all 2 file(s) were skipped" in err
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["written"] == 0


def test_malformed_lines_name_the_file_and_line(audioset, tmp_path, capsys):
    bad_csv = audioset / "bad.csv"
    bad_csv.write_text('# comment\nabcdefghijk, 0.000, 10.000, "/m/09x0r"\nbroken line without fields\n')
    base = ["--labels", str(audioset / "class_labels_indices.csv"), "--audio_dir", str(audioset / "audio")]
    code, err = _run_main(["audioset", "--csv", str(bad_csv), *base, "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and f"{bad_csv}:3:" in err and err.count("\n") == 1

    bad_csv.write_text('abcdefghijk, zero, 10.000, "/m/09x0r"\n')
    code, err = _run_main(["audioset", "--csv", str(bad_csv), *base, "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and f"{bad_csv}:1:" in err and "not numbers" in err

    bad_csv.write_text('abcdefghijk, 0.0, 10.000, "/m/09x0r,/m/unknown"\n')
    code, err = _run_main(["audioset", "--csv", str(bad_csv), *base, "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and f"{bad_csv}:1:" in err and "/m/unknown" in err

    tsv = tmp_path / "bad.tsv"
    tsv.write_text("filename\tonset\toffset\tevent_label\na.wav\t0.1\t0.5\tDog\nb.wav\t0.1\tDog\n")
    code, err = _run_main(
        ["dcase", "--tsv", str(tsv), "--audio_dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys
    )
    assert code != 0 and f"{tsv}:3:" in err

    tsv.write_text("file\tlabels\na.wav\tDog\n")
    code, err = _run_main(
        ["dcase", "--tsv", str(tsv), "--audio_dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys
    )
    assert code != 0 and f"{tsv}:1:" in err and "header" in err
