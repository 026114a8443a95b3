"""Record format and Grain pipeline: exact round trips, crop semantics, determinism, resume, sharding."""

import csv
import functools
import json
import os
import types

import grain
import jax
import numpy as np
import pytest
import soundfile as sf
from jax.sharding import NamedSharding, PartitionSpec

from atst_jax.audio import denormalize_db
from atst_jax.data import pipeline
from atst_jax.data.pipeline import (
    CropExample,
    ensure_embedded_dataset,
    make_dataset,
    make_iterator,
    make_source,
    normalize_db,
    to_global_batch,
)
from atst_jax.data.records import (
    decode_example,
    encode_example,
    list_record_files,
    read_features,
    write_records,
)

N_MELS, FRAMES, CROP = 8, 60, 16
NUM_EXAMPLES = 40


def denormalize(spec):
    """Inverse of normalize_db, to read back the frame indices written into the fake mels."""
    return denormalize_db(np.asarray(spec, np.float64))


def fake_example(j, length=None, frames=FRAMES):
    """Row 0 holds the example number j, the other rows the frame index; frames past `length` hold 999 so a
    crop that strays outside the valid region is visible."""
    length = frames if length is None else length
    mel = np.tile(np.arange(frames, dtype=np.float16), (N_MELS, 1))
    mel[0] = j
    mel[:, length:] = 999
    return {
        "mel": mel,
        "length": length,
        "id": f"ex{j:03d}",
        "labels": np.arange(j % 3, dtype=np.int32),
        "events": np.array([[0.5, 1.25, j % 5]], np.float32),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    # Lengths from 20 to 59 frames: all longer than CROP; every example has a distinct valid length.
    examples = (fake_example(j, length=20 + j) for j in range(NUM_EXAMPLES))
    return write_records(str(out), examples, num_shards=3)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --- records -------------------------------------------------------------------------------------------


def test_encode_decode_round_trip_exact():
    rng = np.random.default_rng(0)
    ex = {
        "mel": rng.normal(-40, 20, (64, 1001)).astype(np.float16),
        "length": 987,
        "id": "Y-abc_123.wav ünï",
        "labels": np.zeros((0,), np.int32),
        "events": np.array([[0.0, 1.5, 3], [2.25, 9.99, 0]], np.float32),
    }
    back = decode_example(encode_example(ex))
    assert set(back) == set(ex)
    assert back["id"] == ex["id"] and back["length"] == 987
    for k in ("mel", "labels", "events"):
        assert back[k].dtype == ex[k].dtype and back[k].shape == ex[k].shape
        np.testing.assert_array_equal(back[k], ex[k])
    # Bit-exact, including NaN payloads and signed zeros that assert_array_equal would forgive.
    assert back["mel"].tobytes() == ex["mel"].tobytes()

    no_events = {k: v for k, v in ex.items() if k != "events"} | {"labels": np.array([5, 2], np.int32)}
    back = decode_example(encode_example(no_events))
    assert "events" not in back
    np.testing.assert_array_equal(back["labels"], [5, 2])


def test_encode_rejects_bad_length():
    with pytest.raises(ValueError):
        encode_example(fake_example(0) | {"length": FRAMES + 1})


def test_write_records_shards_and_listing(tmp_path):
    out = str(tmp_path)
    paths = write_records(out, (fake_example(j) for j in range(10)), num_shards=3)
    assert [os.path.basename(p) for p in paths] == [
        f"data-train.array_record-0000{i}-of-00003" for i in range(3)
    ]
    assert list_record_files(out) == paths
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    # Round-robin: shard s holds examples s, s+3, ...
    src = make_source(paths)
    assert len(src) == 10
    ids = [decode_example(src[i])["id"] for i in range(10)]
    assert ids == [f"ex{j:03d}" for j in (0, 3, 6, 9, 1, 4, 7, 2, 5, 8)]

    # Rewriting with another shard count replaces the old set instead of mixing with it.
    paths2 = write_records(out, (fake_example(j) for j in range(4)), num_shards=2)
    assert list_record_files(out) == paths2 and len(make_source(paths2)) == 4

    os.remove(paths2[1])
    with pytest.raises(ValueError, match="incomplete"):
        list_record_files(out)


def test_write_records_interrupted_leaves_nothing(tmp_path):
    def boom():
        yield fake_example(0)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_records(str(tmp_path), boom(), num_shards=2)
    assert os.listdir(tmp_path) == []


def test_records_are_what_tfds_writes_and_reads():
    """The hand-written tf.train.Example bytes parse to the same proto as TFDS's own serializer writes, and
    TFDS's numpy decoder returns the same arrays as decode_example."""
    from tensorflow_datasets.proto import tf_example_pb2

    from atst_jax.data.records import tfds_features

    rng = np.random.default_rng(1)
    base = {
        "mel": rng.normal(-40, 20, (64, 37)).astype(np.float16),
        "length": 30,
        "id": "Yé_1",
        "labels": np.array([4, 0, 526], np.int32),
    }
    for ex in (
        base,
        base | {"events": np.array([[0.25, 1.5, 3], [0, 0, 1]], np.float32)},
        base | {"events": np.zeros((0, 3), np.float32)},
    ):
        features = tfds_features(with_events="events" in ex)
        ours = encode_example(ex)
        theirs = features.serialize_example(ex)
        assert tf_example_pb2.Example.FromString(ours) == tf_example_pb2.Example.FromString(theirs)
        assert encode_example(ex) == ours  # deterministic
        via_tfds = features.deserialize_example_np(ours)
        back = decode_example(ours)
        assert via_tfds["id"].decode() == back["id"] == ex["id"]
        assert int(via_tfds["length"]) == back["length"] == 30
        for k in ("mel", "labels") + (("events",) if "events" in ex else ()):
            assert via_tfds[k].dtype == back[k].dtype == ex[k].dtype
            np.testing.assert_array_equal(via_tfds[k], back[k])
            np.testing.assert_array_equal(back[k], ex[k])
        # decode also accepts what TFDS wrote (field order and packing are TFDS's there).
        np.testing.assert_array_equal(decode_example(theirs)["mel"], ex["mel"])


def test_decode_rejects_other_formats():
    # A format-1 record: the msgpack map {"v": 1, "id": "x", "length": 3} (bytes spelled out, msgpack is not
    # a dependency any more).
    with pytest.raises(ValueError, match="not a record of format"):
        decode_example(b"\x83\xa1v\x01\xa2id\xa1x\xa6length\x03")
    with pytest.raises(ValueError):
        encode_example(fake_example(0) | {"mel": np.zeros((N_MELS, 0), np.float16), "length": 0})


def test_list_record_files_picks_a_split(tmp_path):
    out = str(tmp_path)
    train = write_records(out, (fake_example(j) for j in range(4)), num_shards=2, split="train")
    test = write_records(out, (fake_example(j) for j in range(3)), num_shards=1, split="test")
    with pytest.raises(ValueError, match="several"):
        list_record_files(out)
    assert list_record_files(out, split="train") == train
    assert list_record_files(out, split="test") == test
    (tmp_path / ".data-train.array_record-00000-of-00002.tmp-1").write_bytes(b"")  # temp files are ignored
    assert list_record_files(out, split="train") == train


# --- crop ----------------------------------------------------------------------------------------------


def test_crop_long_clip_lies_in_valid_region():
    crop = CropExample([("spec", CROP)], keep_index=True)
    length = 50
    record = encode_example(fake_example(7, length=length))
    starts = set()
    for s in range(600):
        out = crop.random_map((7, record), np.random.default_rng(s))
        assert out["spec"].shape == (N_MELS, CROP) and out["spec"].dtype == np.float32
        assert out["spec_length"] == CROP and out["spec_length"].dtype == np.int32
        assert out["index"] == 7
        frames = np.round(denormalize(out["spec"][1:])).astype(int)
        start = frames[0, 0]
        np.testing.assert_array_equal(frames, np.tile(np.arange(start, start + CROP), (N_MELS - 1, 1)))
        np.testing.assert_allclose(denormalize(out["spec"][0]), 7, atol=1e-3)
        starts.add(start)
    # Uniform over [0, length - CROP]: both ends reachable, nothing beyond.
    assert min(starts) == 0 and max(starts) == length - CROP
    assert len(starts) == length - CROP + 1


def test_crop_short_clip_pads_with_clip_floor():
    crop = CropExample([("spec", CROP)])
    ex = fake_example(0, length=10)
    ex["mel"][:, :10] += np.float16(-30)  # valid frames: -30 .. -21 dB, floor -30
    out = crop.random_map((0, encode_example(ex)), np.random.default_rng(0))
    assert out["spec"].shape == (N_MELS, CROP) and out["spec_length"] == 10
    assert "index" not in out
    np.testing.assert_allclose(
        denormalize(out["spec"][1:, :10]), np.tile(np.arange(10) - 30.0, (N_MELS - 1, 1)), atol=1e-3
    )
    np.testing.assert_allclose(out["spec"][:, 10:], normalize_db(np.float32(-30)), atol=1e-6)

    empty = crop.random_map((0, encode_example(fake_example(0, length=0))), np.random.default_rng(0))
    assert empty["spec_length"] == 0
    np.testing.assert_allclose(empty["spec"], -1.0, atol=1e-6)


def test_crop_output_is_float32_precise():
    # float16 storage must not leak into float16 arithmetic: −79.6482 dB is not representable in float16, so
    # compare against the float32 normalisation of the stored (float16) value.
    ex = fake_example(0)
    ex["mel"][:] = np.float16(-37.3)
    out = CropExample([("spec", CROP)]).random_map((0, encode_example(ex)), np.random.default_rng(0))
    expected = (np.float32(np.float16(-37.3)) + 79.6482) / (50.6842 + 79.6482) * 2 - 1
    np.testing.assert_allclose(out["spec"], expected, rtol=0, atol=1e-6)


# --- determinism, epochs, resume -----------------------------------------------------------------------


def dataset(files, seed=0, **kw):
    kw = {"crops": [("spec", CROP)], "per_host_batch": 8, "keep_index": True} | kw
    return make_dataset(files, seed=seed, **kw)


def test_same_seed_same_batches_other_seed_differs(files):
    a = [dataset(files, seed=1)[i] for i in range(6)]
    b = [dataset(files, seed=1)[i] for i in range(6)]
    c = [dataset(files, seed=2)[i] for i in range(6)]
    assert_batches_equal(a, b)
    assert a[0]["spec"].shape == (8, N_MELS, CROP) and a[0]["spec_length"].shape == (8,)
    assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c, strict=True))
    # Same order but different crops would also be a seed failure: compare the specs too.
    assert not all(np.array_equal(x["spec"], y["spec"]) for x, y in zip(a, c, strict=True))


def test_each_epoch_is_a_new_permutation(files):
    ds = dataset(files, seed=3)
    per_epoch = NUM_EXAMPLES // 8
    epochs = [np.concatenate([ds[e * per_epoch + i]["index"] for i in range(per_epoch)]) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(NUM_EXAMPLES))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(NUM_EXAMPLES))
    # The same clip gets a fresh crop in the next epoch (lengths 20..59 leave room to move).
    ds_specs = {}
    for e in range(2):
        for i in range(per_epoch):
            b = ds[e * per_epoch + i]
            for idx, spec in zip(b["index"], b["spec"], strict=True):
                ds_specs.setdefault(int(idx), []).append(spec)
    moved = sum(not np.array_equal(*v) for v in ds_specs.values())
    assert moved > NUM_EXAMPLES // 2


def test_unshuffled_is_in_source_order(files):
    ds = dataset(files, shuffle=False, num_epochs=1)
    order = np.concatenate([b["index"] for b in ds])
    np.testing.assert_array_equal(order, np.arange(NUM_EXAMPLES))


def test_iterator_resume_is_exact(files):
    ds = dataset(files, seed=5)
    it = make_iterator(ds)
    take(it, 4)
    state = it.get_state()
    expected = take(it, 3)
    it2 = make_iterator(dataset(files, seed=5))
    it2.set_state(state)
    assert_batches_equal(take(it2, 3), expected)


def test_worker_processes_give_identical_batches(files):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    reference = take(make_iterator(dataset(files, seed=6)), 9)
    it = make_iterator(dataset(files, seed=6), worker_count=2)
    try:
        first = take(it, 4)
        state = it.get_state()
        rest = take(it, 2)
        # Rewinding a running multi-worker iterator replays the same batches.
        it.set_state(state)
        assert_batches_equal(take(it, 2), rest)
    finally:
        it.close()
    assert_batches_equal(first + rest, reference[:6])
    # The state does not depend on the worker count: one saved under 2 workers resumes without workers.
    it0 = make_iterator(dataset(files, seed=6))
    it0.set_state(state)
    assert_batches_equal(take(it0, 5), reference[4:])


def test_grain_checkpoint_handler_round_trip(files, tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    it = make_iterator(dataset(files, seed=8))
    take(it, 3)
    CheckpointHandler().save(epath.Path(tmp_path), item=it)
    expected = take(it, 2)
    restored = CheckpointHandler().restore(epath.Path(tmp_path), item=make_iterator(dataset(files, seed=8)))
    assert_batches_equal(take(restored, 2), expected)


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_read_disjoint_examples_covering_the_epoch(files, process_count):
    single = {}
    for b in dataset(files, seed=7, per_host_batch=1, num_epochs=1, drop_remainder=False):
        single[int(b["index"][0])] = b["spec"][0]
    per_process = []
    for p in range(process_count):
        ds = dataset(
            files,
            seed=7,
            per_host_batch=4,
            num_epochs=1,
            process_index=p,
            process_count=process_count,
            drop_remainder=False,  # so an unequal split would show up as unequal counts
        )
        batches = list(ds)
        per_process.append(np.concatenate([b["index"] for b in batches]))
        # The crop of a clip does not depend on how many processes share the data.
        for b in batches:
            for idx, spec in zip(b["index"], b["spec"], strict=True):
                np.testing.assert_array_equal(spec, single[int(idx)])
    counts = {len(x) for x in per_process}
    assert len(counts) == 1, "every process must produce the same number of examples"
    all_idx = np.concatenate(per_process)
    assert len(set(all_idx.tolist())) == len(all_idx), "processes overlap"
    # Only the remainder of the epoch modulo process_count is dropped (40 = 3·13 + 1).
    assert len(all_idx) == NUM_EXAMPLES // process_count * process_count
    src = make_source(files)
    ids = {decode_example(src[int(i)])["id"] for i in all_idx}
    if process_count == 2:  # 40 = 2 processes × 5 batches × 4: the whole epoch
        assert ids == {f"ex{j:03d}" for j in range(NUM_EXAMPLES)}


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_is_the_same_for_any_process_count(files, process_count):
    """Process p's batch k is block p of the single-process global batch k, so concatenating the processes'
    batches in process order (what make_array_from_process_local_data does) gives identical global batches
    — and identical losses — however many hosts read the data. Checked across an epoch boundary (40 clips,
    global batch 8: batches 5.. come from the second epoch)."""
    single = dataset(files, seed=3, per_host_batch=8)
    shards = [
        dataset(
            files, seed=3, per_host_batch=8 // process_count, process_index=p, process_count=process_count
        )
        for p in range(process_count)
    ]
    for k in (0, 1, 4, 5, 7):
        glued = {key: np.concatenate([s[k][key] for s in shards]) for key in single[k]}
        assert_batches_equal([glued], [single[k]])


# --- global batch --------------------------------------------------------------------------------------


def test_to_global_batch_on_8_devices():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    host = {
        "spec": np.arange(16 * N_MELS * CROP, dtype=np.float32).reshape(16, N_MELS, CROP),
        "length": np.arange(16, dtype=np.int32),
    }
    out = to_global_batch(host, sharding)
    for k, v in host.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        assert out[k].sharding == sharding
        np.testing.assert_array_equal(np.asarray(out[k]), v)
        for shard in out[k].addressable_shards:
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), v[shard.index])


# --- embedded dataset ----------------------------------------------------------------------------------

FAKE_CLASSES = ["Alarm", "Dog", "Speech"]


def _fake_events(index):
    return [(0.1 * k, 0.1 * k + 0.05, FAKE_CLASSES[(index + 2 * k) % 3]) for k in range(index % 3)]


def _fake_write_dataset(out_dir, num_clips, seed, fail_at=None):
    """Stand-in for synthetic.write_dataset: 0.1 s noise WAVs and a strong TSV (a clip without events gets a
    row with empty onset/offset/label, as DCASE allows)."""
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    rows = ["filename\tonset\toffset\tevent_label"]
    for i in range(num_clips):
        if i == fail_at:
            raise KeyboardInterrupt
        wave = np.random.default_rng([seed, i]).uniform(-0.5, 0.5, 1600)
        sf.write(os.path.join(out_dir, "audio", f"clip_{i:05d}.wav"), wave, 16000, subtype="PCM_16")
        events = _fake_events(i)
        rows += [f"clip_{i:05d}.wav\t{on:.3f}\t{off:.3f}\t{lab}" for on, off, lab in events]
        rows += [] if events else [f"clip_{i:05d}.wav\t\t\t"]
    with open(os.path.join(out_dir, "strong_labels.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def fake_deps(fail_at=None):
    return types.SimpleNamespace(
        classes=FAKE_CLASSES, write_dataset=functools.partial(_fake_write_dataset, fail_at=fail_at)
    )


def read_tsv_labels(path, classes):
    labels = {}
    with open(path) as f:
        for row in csv.reader(f, delimiter="\t"):
            if row[0] == "filename":
                continue
            stem = os.path.splitext(os.path.basename(row[0]))[0]
            labels.setdefault(stem, set()).update([classes.index(row[3])] if row[3] else [])
    return labels


def check_embedded(cache, files, num_clips, classes):
    assert len(files) == 2 and all(os.path.exists(f) for f in files)
    assert os.path.exists(os.path.join(cache, "embedded_dataset.json"))
    tsv = read_tsv_labels(os.path.join(cache, "strong_labels.tsv"), classes)
    src = make_source(files)
    assert len(src) == num_clips
    seen = set()
    for i in range(num_clips):
        ex = decode_example(src[i])
        seen.add(ex["id"])
        assert (
            ex["mel"].dtype == np.float16 and ex["mel"].shape[0] == 64 and ex["length"] == ex["mel"].shape[1]
        )
        assert ex["labels"].tolist() == sorted(tsv.get(ex["id"], set()))
        assert sorted(set(ex["events"][:, 2].astype(int).tolist())) == ex["labels"].tolist()
    assert seen == {f"clip_{i:05d}" for i in range(num_clips)}
    # Built by the preparation tool: the directory is a TFDS dataset with its vocabulary.
    with open(os.path.join(cache, "records", "labels.json")) as f:
        assert json.load(f)["classes"] == list(classes)
    assert os.path.exists(os.path.join(cache, "records", "dataset_info.json"))
    assert read_features(files) == "atst_logmel64"  # recorded by prepare, not defaulted
    with open(os.path.join(cache, "records", "metadata.json")) as f:
        assert json.load(f)["features"] == "atst_logmel64"


def test_embedded_dataset_builds_once_with_stand_in(tmp_path, monkeypatch):
    calls = []

    def deps():
        calls.append(1)
        return fake_deps()

    monkeypatch.setattr(pipeline, "_embedded_deps", deps)
    cache = str(tmp_path / "emb")
    files = ensure_embedded_dataset(cache, num_clips=8, seed=1, num_shards=2)
    check_embedded(cache, files, 8, FAKE_CLASSES)
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}

    calls.clear()
    assert ensure_embedded_dataset(cache, num_clips=8, seed=1, num_shards=2) == files
    assert calls == [] and {f: os.stat(f).st_mtime_ns for f in files} == mtimes

    # A different request rebuilds; so does a build whose marker never got written.
    assert len(make_source(ensure_embedded_dataset(cache, num_clips=6, seed=1, num_shards=2))) == 6
    os.remove(os.path.join(cache, "embedded_dataset.json"))
    calls.clear()
    files = ensure_embedded_dataset(cache, num_clips=8, seed=1, num_shards=2)
    assert calls and len(make_source(files)) == 8


def test_embedded_dataset_interrupted_build_is_redone(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_embedded_deps", lambda: fake_deps(fail_at=5))
    cache = str(tmp_path / "emb")
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_dataset(cache, num_clips=8, seed=1, num_shards=2)
    assert not os.path.exists(os.path.join(cache, "embedded_dataset.json"))
    assert not os.path.exists(os.path.join(cache, "records"))
    monkeypatch.setattr(pipeline, "_embedded_deps", fake_deps)
    check_embedded(cache, ensure_embedded_dataset(cache, num_clips=8, seed=1, num_shards=2), 8, FAKE_CLASSES)


def test_embedded_dataset_replaces_format_1_cache(tmp_path, monkeypatch):
    # A cache written by EMBEDDED_VERSION 1 (msgpack records, other file names) is rebuilt, not misread.
    cache = tmp_path / "emb"
    (cache / "records").mkdir(parents=True)
    (cache / "records" / "data-00000-of-00001.array_record").write_bytes(b"old")
    (cache / "embedded_dataset.json").write_text(json.dumps({"version": 1}))
    monkeypatch.setattr(pipeline, "_embedded_deps", fake_deps)
    files = ensure_embedded_dataset(str(cache), num_clips=4, seed=0, num_shards=2)
    assert not (cache / "records" / "data-00000-of-00001.array_record").exists()
    assert len(make_source(files)) == 4


def test_embedded_dataset_rebuilds_records_when_the_generator_changes(tmp_path, monkeypatch):
    # A new generator version keeps file names, event times and labels (only the sound changes): prepare's
    # finished-shard markers would match, so the records must be cleared, not reused under the new WAVs.
    cache = str(tmp_path / "emb")
    monkeypatch.setattr(pipeline, "_embedded_deps", fake_deps)
    old = [decode_example(r) for r in make_source(ensure_embedded_dataset(cache, 4, 0, num_shards=2))]

    def louder_deps():
        deps = fake_deps()
        write = deps.write_dataset

        def write_dataset(out_dir, num_clips, seed):
            tsv = write(out_dir, num_clips, seed)
            for wav in sorted(os.listdir(os.path.join(out_dir, "audio"))):
                path = os.path.join(out_dir, "audio", wav)
                data, sr = sf.read(path, dtype="float32")
                sf.write(path, np.clip(4.0 * data, -1, 1), sr, subtype="PCM_16")
            return tsv

        deps.write_dataset = write_dataset
        return deps

    monkeypatch.setattr(pipeline, "_embedded_deps", louder_deps)
    monkeypatch.setattr(pipeline, "EMBEDDED_VERSION", pipeline.EMBEDDED_VERSION + 1)
    new = [decode_example(r) for r in make_source(ensure_embedded_dataset(cache, 4, 0, num_shards=2))]
    assert [ex["id"] for ex in new] == [ex["id"] for ex in old]
    assert all(not np.array_equal(a["mel"], b["mel"]) for a, b in zip(new, old, strict=True))
    # The same version again: nothing is cleared (an interrupted build keeps its finished shards).
    stamp = os.path.join(cache, "records.source.json")
    with open(stamp) as f:
        assert json.load(f) == {"version": pipeline.EMBEDDED_VERSION}
    before = {f: os.stat(f).st_mtime_ns for f in list_record_files(os.path.join(cache, "records"))}
    pipeline.clear_stale_records(os.path.join(cache, "records"), pipeline.EMBEDDED_VERSION)
    assert {f: os.stat(f).st_mtime_ns for f in list_record_files(os.path.join(cache, "records"))} == before


def _real_deps_available():
    try:
        pipeline._embedded_deps()
    except (ImportError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _real_deps_available(), reason="atst_jax.data.synthetic not present")
def test_embedded_dataset_real_generator(tmp_path):
    from atst_jax.data import synthetic

    cache = str(tmp_path / "emb")
    files = ensure_embedded_dataset(cache, num_clips=6, seed=0, num_shards=2)
    check_embedded(cache, files, 6, list(synthetic.CLASSES))
    assert len([n for n in os.listdir(os.path.join(cache, "audio")) if n.endswith(".wav")]) == 6
    src = make_source(files)
    assert decode_example(src[0])["mel"].shape == (64, 1001)
    # The events are the generator's, exactly as the TSV states them (3 decimals, whole milliseconds).
    by_id = {decode_example(src[i])["id"]: decode_example(src[i]) for i in range(6)}
    events = synthetic.clip_events(0, seed=0)
    expected = np.array([(on, off, synthetic.CLASSES.index(lab)) for on, off, lab in events], np.float32)
    np.testing.assert_array_equal(by_id["clip_00000"]["events"], expected)


# --- several crops, subsets, feature sets ---------------------------------------------------------------


def test_two_crops_are_independent_windows_of_one_clip_and_the_first_is_the_single_crop():
    record = encode_example(fake_example(3, length=50))
    two = CropExample([("anchor", CROP), ("positive", 10)], keep_index=True)
    one = CropExample([("spec", CROP)])
    differ, pairs = 0, set()
    for s in range(200):
        out = two.random_map((3, record), np.random.default_rng(s))
        assert out["anchor"].shape == (N_MELS, CROP) and out["positive"].shape == (N_MELS, 10)
        assert out["anchor_length"] == CROP and out["positive_length"] == 10 and out["index"] == 3
        starts = []
        for name, width in (("anchor", CROP), ("positive", 10)):
            frames = np.round(denormalize(out[name][1:])).astype(int)
            np.testing.assert_allclose(denormalize(out[name][0]), 3, atol=1e-3)  # the same clip
            start = frames[0, 0]
            np.testing.assert_array_equal(frames, np.tile(np.arange(start, start + width), (N_MELS - 1, 1)))
            starts.append(start)
        differ += starts[0] != starts[1]
        pairs.add(tuple(int(x) for x in starts))
        # The first crop consumes the generator exactly as the one-crop pipeline: identical values.
        single = one.random_map((3, record), np.random.default_rng(s))
        assert out["anchor"].tobytes() == single["spec"].tobytes()
    assert differ > 150  # not one shared offset
    # Independent draws: 200 samples of 35 x 41 possible (anchor, positive) starts give well over a hundred
    # distinct pairs; a positive start derived from the anchor's (or from a reused generator state) would give
    # at most one pair per anchor start, i.e. <= 35.
    assert len(pairs) > 100


def test_short_clip_is_padded_per_crop():
    """A 12-frame clip: the 16-frame crop takes all of it and pads with the clip's floor, the 8-frame crop is
    a random window inside it; each crop has its own length."""
    ex = fake_example(1, length=12)
    ex["mel"][1:, :12] -= np.float16(20)  # valid frames of rows 1..: -20 .. -9 dB; row 0 holds 1: floor -20
    record = encode_example(ex)
    crop = CropExample([("a", CROP), ("b", 8)])
    starts = set()
    for s in range(100):
        out = crop.random_map((1, record), np.random.default_rng(s))
        assert out["a_length"] == 12 and out["b_length"] == 8
        assert out["a"].shape == (N_MELS, CROP) and out["b"].shape == (N_MELS, 8)
        np.testing.assert_allclose(
            denormalize(out["a"][1:, :12]), np.tile(np.arange(12) - 20.0, (7, 1)), atol=1e-3
        )
        np.testing.assert_allclose(out["a"][:, 12:], normalize_db(np.float32(-20)), atol=1e-6)
        frames = np.round(denormalize(out["b"][1:])).astype(int) + 20
        start = frames[0, 0]
        np.testing.assert_array_equal(frames, np.tile(np.arange(start, start + 8), (N_MELS - 1, 1)))
        starts.add(int(start))
    assert starts == set(range(12 - 8 + 1))  # never into the stored padding (999) past the length


def test_rolled_clip_gives_circular_windows_one_rotation_for_all_crops():
    """``roll_prob``: the clip's valid frames rotated by one random count r in [1, length) before every crop is
    drawn from it (ASiT's waveform roll, one per clip): a window may run over the clip's end into its start;
    two full-length crops are the same rotation; a short clip is rotated, then padded; 0 draws nothing."""
    length = 30
    record = encode_example(fake_example(2, length=length))
    crop = CropExample([("full", length), ("part", 12)], roll_prob=0.5)
    rolls, wrapped = set(), 0
    for s in range(200):
        out = crop.random_map((2, record), np.random.default_rng(s))
        full = np.round(denormalize(out["full"][1:])).astype(int)
        r = (-int(full[0, 0])) % length  # frame i of the rotated clip is frame (i - r) mod length
        np.testing.assert_array_equal(full, np.tile((np.arange(length) - r) % length, (N_MELS - 1, 1)))
        part = np.round(denormalize(out["part"][1:])).astype(int)
        start = int(part[0, 0])
        np.testing.assert_array_equal(part, np.tile((start + np.arange(12)) % length, (N_MELS - 1, 1)))
        wrapped += start + 12 > length
        rolls.add(r)
    assert 0 in rolls and len(rolls) > 20  # about half unrotated; rotations spread over the clip
    assert wrapped > 10  # windows over the seam, which an unrotated clip never gives
    # Unrotated (0) is exactly the plain pipeline's draw: nothing extra is drawn.
    plain = CropExample([("full", length), ("part", 12)], roll_prob=0.0)
    ref = CropExample([("full", length), ("part", 12)])
    for s in range(20):
        a = plain.random_map((2, record), np.random.default_rng(s))
        assert a["part"].tobytes() == ref.random_map((2, record), np.random.default_rng(s))["part"].tobytes()
    # A short clip: rotated, then padded with its floor.
    short = CropExample([("a", CROP)], roll_prob=1.0)
    record = encode_example(fake_example(1, length=12))
    for s in range(10):
        out = short.random_map((1, record), np.random.default_rng(s))
        frames = np.round(denormalize(out["a"][1:, :12])).astype(int)
        r = (-int(frames[0, 0])) % 12
        assert r != 0
        np.testing.assert_array_equal(frames, np.tile((np.arange(12) - r) % 12, (N_MELS - 1, 1)))
        np.testing.assert_allclose(out["a"][1:, 12:], normalize_db(np.float32(0)), atol=1e-6)
    with pytest.raises(ValueError, match="roll_prob"):
        CropExample([("a", 4)], roll_prob=1.5)


def test_only_asit_rolls_its_clips():
    from atst_jax.config import load_config
    from atst_jax.methods import build

    rolls = {
        m: build(load_config(f"configs/{m}.py:tiny")).roll_prob() for m in ("asit", "atst_frame", "aasp")
    }
    assert rolls == {"asit": 0.5, "atst_frame": 0.0, "aasp": 0.0}


def test_crop_names_must_give_distinct_batch_keys():
    for crops in ([("a", 4), ("a", 5)], [("a", 4), ("a_length", 5)], [("index", 4)], []):
        with pytest.raises(ValueError):
            CropExample(crops)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        CropExample([("a", 0)])
    with pytest.raises(KeyError, match="unknown feature set"):  # at construction, not at the first record
        CropExample([("a", 4)], features="nope")


# The one-crop pipeline as it was before crops had names, written out from Grain's primitives and the plain
# float32 formula: single-crop batches of `make_dataset` must equal it bit for bit (a recorded training-run
# digest depends on those numbers).
_OLD_SCALE = np.float32(2.0 / (50.6842 - -79.6482))
_OLD_OFFSET = np.float32(-1.0 - 2.0 * -79.6482 / (50.6842 - -79.6482))


class _OldTag:
    def __init__(self, n):
        self.n = n

    def __call__(self, index, record):
        return index % self.n, record


class _OldCrop(grain.transforms.RandomMap):
    def __init__(self, t):
        self.t = t

    def random_map(self, element, rng):
        index, record = element
        ex = decode_example(record)
        mel, length, t = ex["mel"], ex["length"], self.t
        if length >= t:
            start = int(rng.integers(0, length - t + 1))
            x = mel[:, start : start + t].astype(np.float32)
        else:
            floor = np.float32(mel[:, :length].min()) if length else np.float32(-79.6482)
            pad = np.full((mel.shape[0], t - length), floor, np.float32)
            x = np.concatenate([mel[:, :length].astype(np.float32), pad], axis=1)
        return {
            "spec": x * _OLD_SCALE + _OLD_OFFSET,
            "length": np.int32(min(length, t)),
            "index": np.int32(index),
        }


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory):
    """Clips from empty to longer than the crop, random dB values (negative zeros, subnormals included)."""
    rng = np.random.default_rng(4)
    examples = []
    for j in range(23):
        length = [0, 3, CROP - 1, CROP, 40][j % 5]
        mel = rng.normal(-40, 25, (N_MELS, max(length, 1) + j % 3)).astype(np.float16)
        mel[0, 0] = [np.float16(-0.0), np.float16(3e-7), mel[0, 0]][j % 3]
        examples.append({"mel": mel, "length": length, "id": f"m{j}"})
    return write_records(str(tmp_path_factory.mktemp("mixed")), examples, num_shards=2)


@pytest.mark.parametrize("seed", [0, 17])
def test_single_crop_is_bit_identical_to_the_one_crop_pipeline(mixed_files, seed):
    source = make_source(mixed_files)
    shuffle_seed, crop_seed = np.random.SeedSequence(seed).generate_state(2)
    reference = (
        grain.MapDataset.source(source)
        .map_with_index(_OldTag(len(source)))
        .shuffle(seed=int(shuffle_seed))
        .repeat(None)
        .random_map(_OldCrop(CROP), seed=int(crop_seed))
        .batch(5)
    )
    ours = make_dataset(mixed_files, seed=seed, crops=[("spec", CROP)], per_host_batch=5, keep_index=True)
    for k in (0, 1, 4, 5, 9):  # an epoch is 23 clips: batches 4 and 5 straddle the first boundary
        ref, got = reference[k], ours[k]
        assert sorted(got) == ["index", "spec", "spec_length"]
        assert got["spec"].dtype == np.float32 and got["spec"].tobytes() == ref["spec"].tobytes()
        np.testing.assert_array_equal(got["spec_length"], ref["length"])
        np.testing.assert_array_equal(got["index"], ref["index"])


def test_make_dataset_two_crops_are_independent_windows_of_the_batched_clip(files):
    """Through the batched path (`_CropRecord` plans + `AssembleBatch`): each row of both crops comes from
    the record its index names, each crop is a window of the valid frames (or the whole clip, padded with its
    floor, when the clip is shorter: lengths here are 20..59 against a 40-frame anchor), the windows move
    independently, and the first crop is exactly what a one-crop pipeline gives."""
    crops = [("anchor", 40), ("positive", 10)]
    two = dataset(files, seed=4, crops=crops, per_host_batch=8)
    one = dataset(files, seed=4, crops=crops[:1], per_host_batch=8)
    src = make_source(files)
    differ = padded = 0
    for k in range(10):
        batch = two[k]
        assert sorted(batch) == ["anchor", "anchor_length", "index", "positive", "positive_length"]
        assert batch["anchor"].shape == (8, N_MELS, 40) and batch["positive"].shape == (8, N_MELS, 10)
        assert batch["anchor"].tobytes() == one[k]["anchor"].tobytes()
        np.testing.assert_array_equal(batch["anchor_length"], one[k]["anchor_length"])
        for row, index in enumerate(batch["index"]):
            ex = decode_example(src[int(index)])
            j, length = int(ex["id"][2:]), ex["length"]
            assert batch["anchor_length"][row] == min(length, 40) and batch["positive_length"][row] == 10
            starts = []
            for name in ("anchor", "positive"):
                valid = int(batch[f"{name}_length"][row])
                x = batch[name][row]
                np.testing.assert_allclose(denormalize(x[0, :valid]), j, atol=1e-3)  # row 0 names the clip
                frames = np.round(denormalize(x[1:, :valid])).astype(int)
                start = frames[0, 0]
                np.testing.assert_array_equal(
                    frames, np.tile(np.arange(start, start + valid), (N_MELS - 1, 1))
                )
                assert 0 <= start and start + valid <= length
                if valid < x.shape[1]:  # the clip's floor: min(j, frame 0) over its valid frames
                    padded += 1
                    np.testing.assert_allclose(x[:, valid:], normalize_db(np.float32(min(j, 0))), atol=1e-6)
                starts.append(start)
            differ += starts[0] != starts[1]
    assert padded > 0 and differ > 60  # 80 rows
    with pytest.raises(ValueError, match="distinct"):
        dataset(files, crops=[("a", 4), ("a", 5)])


def test_subset_is_a_fixed_seeded_set_covered_by_an_epoch(files):
    def epoch_indices(**kw):
        ds = dataset(files, subset=16, shuffle=True, num_epochs=1, per_host_batch=4, **kw)
        return sorted(int(i) for b in ds for i in b["index"])

    a = epoch_indices(seed=0)
    assert len(a) == 16 == len(set(a))
    assert epoch_indices(seed=7) == a  # independent of the shuffle seed
    assert epoch_indices(seed=0, subset_seed=99) != a
    expected = sorted(np.random.default_rng(1234).choice(NUM_EXAMPLES, 16, replace=False).tolist())
    assert a == expected
    # The same set on every process: the union of two processes' epochs is the subset.
    parts = [
        int(i)
        for p in range(2)
        for b in dataset(files, subset=16, num_epochs=1, per_host_batch=4, process_index=p, process_count=2)
        for i in b["index"]
    ]
    assert sorted(parts) == a
    with pytest.raises(ValueError, match="subset=41 clips asked for, but the data has 40 records"):
        dataset(files, subset=41)
    with pytest.raises(ValueError, match="subset=-1 must be >= 0"):
        dataset(files, subset=-1)
    # The whole source as a "subset" is the whole source, in its order.
    assert_batches_equal(
        [dataset(files, subset=NUM_EXAMPLES)[i] for i in range(3)], [dataset(files)[i] for i in range(3)]
    )
    # subset=0 changes nothing.
    assert_batches_equal(
        [dataset(files, subset=0)[i] for i in range(3)], [dataset(files)[i] for i in range(3)]
    )


def test_normalisation_comes_from_the_feature_set_bit_for_bit():
    from atst_jax.audio import NORM_MAX

    scale, offset = pipeline.normalisation("atst_logmel64")
    NORM_MIN = pipeline.NORM_MIN
    assert scale == np.float32(2.0 / (NORM_MAX - NORM_MIN)) and scale.dtype == np.float32
    assert offset == np.float32(-1.0 - 2.0 * NORM_MIN / (NORM_MAX - NORM_MIN))
    # ... and, bit for bit, the module constants the pipeline used before (written out above).
    assert scale.tobytes() == _OLD_SCALE.tobytes() and offset.tobytes() == _OLD_OFFSET.tobytes()
    with pytest.raises(KeyError, match="unknown feature set"):
        pipeline.normalisation("kaldi_fbank999")


def test_features_are_read_from_the_metadata_with_the_atst_default(tmp_path):
    files = write_records(str(tmp_path), (fake_example(j) for j in range(4)), num_shards=2)
    assert read_features(files) == "atst_logmel64"  # prepared before the name was recorded
    (tmp_path / "metadata.json").write_text(json.dumps({"features": "atst_logmel64", "n_mels": 64}))
    assert read_features(str(tmp_path)) == "atst_logmel64"
    # TFDS metadata written before the name was recorded: n_mels & co., no "features".
    (tmp_path / "metadata.json").write_text(json.dumps({"n_mels": 64, "sample_rate": 16000}))
    assert read_features(files) == "atst_logmel64"
    (tmp_path / "metadata.json").write_text(json.dumps({"features": "mfcc40"}))
    with pytest.raises(ValueError, match="feature set 'mfcc40', unknown here"):
        read_features(files)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable dataset metadata"):
        read_features(files)
    with pytest.raises(ValueError, match="share a directory"):
        read_features([])
