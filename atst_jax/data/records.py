"""The on-disk record format of spectrogram datasets: TFDS-compatible `tf.train.Example`s in ArrayRecord shards.

Everything that knows how an example is laid out on disk lives in this file: the input pipeline only calls
`decode_example` and `list_record_files`, the preparation CLI (`atst_jax/data/prepare.py`) only
`encode_example`, `shard_name` and `write_tfds_metadata`, and the trainer `read_features` (which front end
made a dataset).

Example (a plain dict):

    mel     np.float16 [n_mels, frames]  log-mel in dB, already top-db floored, NOT normalised
    length  int                          number of valid frames (<= frames)
    id      str                          clip identifier (e.g. file stem or YTID)
    labels  np.int32 [k]                 class indices, may be empty
    events  np.float32 [e, 3]            optional strong labels: onset s, offset s, class index

Why `tf.train.Example` bytes: it is what tensorflow-datasets stores, so a prepared directory with a
`dataset_info.json` / `features.json` next to the shards opens with `tfds.builder_from_directory(dir)
.as_data_source(split)` (no TensorFlow needed) and with our Grain pipeline, from the same bytes. A record
parses to the same protobuf message that TFDS's own serializer writes for the `FeaturesDict` of
`tfds_features()`, and TFDS decodes it to the same arrays (both checked by the tests); keys:

    "mel/value"  bytes_list [1]   the float16 array, little-endian, row-major (TFDS `encoding='bytes'`)
    "mel/shape"  int64_list [2]   n_mels, frames (TFDS's layout for a tensor with two unknown dimensions:
                                  each record says its own shape, so decoding needs no schema)
    "length"     int64_list [1]
    "id"         bytes_list [1]   utf-8
    "labels"     int64_list [k]
    "events"     float_list [3e]  only when the dataset has strong labels

The mel is stored as raw bytes (not a float_list): a float_list would widen every float16 to 4 bytes (2x the
size) and TFDS's float-list path costs ~30 ms to serialise a 10 s clip against ~0.1 ms for bytes.

The protobuf wire format is written and read here by hand instead of through a protobuf library: the message
is five fixed fields, the hand-written encoder is deterministic (fields in sorted key order, so the same
example always gives the same bytes — what makes prepared shards byte-identical across worker counts), and
the decoder is a few dozen Python operations with a zero-copy view of the mel (the pipeline decodes every
record of every batch). The decoder accepts packed and unpacked repeated fields and skips unknown fields, as
any protobuf reader must.

Shard files follow TFDS's default naming, `{name}-{split}.array_record-{i:05d}-of-{n:05d}`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

# Bump when the layout changes; it is part of the embedded-dataset cache key and of prepare's shard
# fingerprints, so old files are rebuilt rather than misread. (1 was a msgpack layout.)
FORMAT_VERSION = 2

# group_size:1 puts every record in its own chunk: a random read touches one record. Uncompressed by default
# because log-mels compress poorly (~20 % with zstd) while decompression would cost ~4x the read itself, and
# the input pipeline's per-clip budget is a few hundred microseconds.
WRITER_OPTIONS = {"none": "group_size:1,uncompressed", "zstd": "group_size:1,zstd:3"}


# ---------------------------------------------------------------------------------------------------------
# Protobuf wire format (just what tf.train.Example needs)
# ---------------------------------------------------------------------------------------------------------

_LEN = 2  # wire type of length-delimited fields (messages, bytes, packed repeated scalars)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values are written as their 64-bit two's complement (10 bytes)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _header(field: int, size: int) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(size)


def _nested(field: int, parts: list) -> list:
    """`parts` (bytes-like chunks of one message) wrapped as length-delimited field `field`, still as chunks:
    the caller joins once at the end, so the 100 KB mel payload is copied a single time."""
    return [_header(field, sum(len(p) for p in parts)), *parts]


# Feature's oneof: 1 = BytesList, 2 = FloatList, 3 = Int64List; inside each list the values are field 1.
def _bytes_feature(values: Sequence) -> list:
    return _nested(1, [c for v in values for c in _nested(1, [v])])


def _raw(a: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array without copying them."""
    return memoryview(a.reshape(-1).view(np.uint8))


def _int64_feature(values: Iterable[int]) -> list:
    packed = b"".join(_varint(int(v)) for v in values)
    # An empty list is an empty (but present) Int64List, as protobuf serialises `Int64List(value=[])`.
    return _nested(3, _nested(1, [packed]) if packed else [])


def _float_feature(values: np.ndarray) -> list:
    data = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    return _nested(2, _nested(1, [_raw(data)]) if data.size else [])


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed record: varint longer than 10 bytes")


def _fields(buf: bytes, pos: int, end: int) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of every field of one message in buf[pos:end]. value: an int for
    varint and fixed-width fields, a (start, stop) span for length-delimited ones.

    Keys and sizes below 128 (all keys and most sizes here) are read inline: this runs ~50 times per record
    and the pipeline decodes every record of every batch, so function calls are most of its cost."""
    out = []
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _LEN:
            size = buf[pos]
            if size < 0x80:
                pos += 1
            else:
                size, pos = _read_varint(buf, pos)
            value = (pos, pos + size)
            pos += size
        elif wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"malformed record: wire type {wire}")
        if pos > end:
            raise ValueError("malformed record: field runs past the end of its message")
        out.append((field, wire, value))
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _array(buf: bytes, dtype: str, start: int, stop: int) -> np.ndarray:
    """Zero-copy read-only view of buf[start:stop] as `dtype` (frombuffer refuses an offset at the very end
    of the buffer, which an empty value as the last field would have)."""
    count = (stop - start) // np.dtype(dtype).itemsize
    return np.frombuffer(buf, dtype, count, start) if count else np.zeros((0,), dtype)


def _parse_list(buf: bytes, kind: int, start: int, end: int) -> Any:
    """The values of a BytesList (kind 1: list of (start, stop) spans), FloatList (2: float32 array) or
    Int64List (3: list of ints), accepting packed and unpacked encodings."""
    if kind == 1:
        return [v for f, w, v in _fields(buf, start, end) if f == 1 and w == _LEN]
    if kind == 2:
        chunks = []
        for f, w, v in _fields(buf, start, end):
            if f != 1:
                continue
            if w == _LEN:  # packed: one run of little-endian float32
                chunks.append(_array(buf, "<f4", *v))
            else:  # unpacked fixed32
                chunks.append(np.array([v], "<u4").view("<f4"))
        if len(chunks) == 1:
            return chunks[0]
        return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
    out: list[int] = []
    for f, w, v in _fields(buf, start, end):
        if f != 1:
            continue
        if w == _LEN:
            pos, stop = v
            while pos < stop:
                x, pos = _read_varint(buf, pos)
                out.append(_signed(x))
        else:
            out.append(_signed(v))
    return out


def _spans(buf: bytes, pos: int, end: int, field: int):
    """(start, stop) of every length-delimited occurrence of `field` in the message buf[pos:end]."""
    return [v for f, w, v in _fields(buf, pos, end) if f == field and w == _LEN]


def _parse_example(buf: bytes) -> dict[str, tuple[int, Any]]:
    """tf.train.Example bytes → {key: (kind, values)} (see `_parse_list`)."""
    features: dict[str, tuple[int, Any]] = {}
    for fs, fe in _spans(buf, 0, len(buf), 1):  # Example.features
        for es, ee in _spans(buf, fs, fe, 1):  # Features.feature: map entries
            key, kind, values = None, 0, None
            for f, w, v in _fields(buf, es, ee):
                if w != _LEN:
                    continue
                if f == 1:
                    key = bytes(buf[v[0] : v[1]]).decode("utf-8")
                elif f == 2:  # Feature: a oneof, the last list present wins (protobuf semantics)
                    for f2, w2, v2 in _fields(buf, v[0], v[1]):
                        if w2 == _LEN and f2 in (1, 2, 3):
                            kind, values = f2, _parse_list(buf, f2, *v2)
            if key is not None:
                features[key] = (kind, values)
    return features


# ---------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------


def encode_example(ex: dict[str, Any]) -> bytes:
    """Serialises one example dict (see module docstring) to tf.train.Example bytes. Validates shapes and
    types; a float32 mel is stored as float16, the format's precision."""
    mel = np.asarray(ex["mel"])
    if mel.ndim != 2 or mel.size == 0:
        # Empty mels are refused because TFDS's reader cannot decode an empty bytes-encoded tensor (its
        # shape check compares against the payload's length); every real clip has >= 1 frame anyway.
        raise ValueError(f"mel must be a non-empty [n_mels, frames], got shape {mel.shape}")
    length = int(ex["length"])
    if not 0 <= length <= mel.shape[1]:
        raise ValueError(f"length {length} outside [0, {mel.shape[1]}]")
    labels = np.asarray(ex.get("labels", np.zeros((0,), np.int32)))
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    mel16 = np.ascontiguousarray(mel, dtype="<f2")
    feats = {
        "id": _bytes_feature([str(ex["id"]).encode("utf-8")]),
        "labels": _int64_feature(labels.astype(np.int32, copy=False).tolist()),
        "length": _int64_feature([length]),
        "mel/shape": _int64_feature(mel16.shape),
        "mel/value": _bytes_feature([_raw(mel16)]),
    }
    if ex.get("events") is not None:
        feats["events"] = _float_feature(np.asarray(ex["events"], np.float32).reshape(-1, 3))
    entries = []
    for key in sorted(feats):  # fixed order: the same example always serialises to the same bytes
        entries += _nested(1, _nested(1, [key.encode("utf-8")]) + _nested(2, feats[key]))
    return b"".join(_nested(1, entries))


def decode_example(b: bytes) -> dict[str, Any]:
    """Inverse of `encode_example`. `events` is present only if it was written. Arrays are read-only views of
    `b` where possible (no copy); consumers that modify them must copy (the pipeline's crop does)."""
    try:
        feats = _parse_example(b)
        mel_shape = feats["mel/shape"][1]
        (span,) = feats["mel/value"][1]
        mel = _array(b, "<f2", *span).reshape(mel_shape)
        (length,) = feats["length"][1]
        (id_span,) = feats["id"][1]
    except (KeyError, ValueError, IndexError, TypeError) as e:
        # The likely cause of a record without these keys is a shard of another format (e.g. format 1's
        # msgpack): say so instead of a bare KeyError.
        raise ValueError(
            f"not a record of format {FORMAT_VERSION} (tf.train.Example with mel/value, mel/shape, length, "
            f"id): {type(e).__name__}: {e}"
        ) from None
    ex: dict[str, Any] = {
        "mel": mel,
        "length": int(length),
        "id": bytes(b[id_span[0] : id_span[1]]).decode("utf-8"),
        "labels": np.asarray(feats.get("labels", (3, []))[1], np.int32),
    }
    if "events" in feats:
        ex["events"] = np.asarray(feats["events"][1], np.float32).reshape(-1, 3)
    return ex


def multi_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices → float32 [num_classes] multi-hot vector (the dense form of `labels`)."""
    out = np.zeros((num_classes,), np.float32)
    out[np.asarray(labels, np.int64)] = 1.0
    return out


def tfds_features(with_events: bool):
    """The `tfds.features.FeaturesDict` whose serialisation `encode_example` reproduces (tensorflow-datasets
    is imported here, lazily: only metadata writing and TFDS readers need it)."""
    import tensorflow_datasets as tfds

    spec = {
        # Two unknown dimensions: TFDS then stores each record's shape next to its bytes ("mel/shape").
        "mel": tfds.features.Tensor(shape=(None, None), dtype=np.float16, encoding="bytes"),
        "length": tfds.features.Scalar(dtype=np.int32),
        "id": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    }
    if with_events:
        spec["events"] = tfds.features.Tensor(shape=(None, 3), dtype=np.float32)
    return tfds.features.FeaturesDict(spec)


# ---------------------------------------------------------------------------------------------------------
# Shards and TFDS metadata
# ---------------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # TFDS dataset names: snake_case
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


def check_name(name: str, split: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*), as TFDS requires")
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split name {split!r} must match [A-Za-z0-9_]+")


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
    """TFDS's default `{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}` file name."""
    return f"{name}-{split}.array_record-{index:05d}-of-{num_shards:05d}"


_SHARD_RE = re.compile(r"^([a-z][a-z0-9_]*)-([A-Za-z0-9_]+)\.array_record-(\d{5})-of-(\d{5})$")


def parse_shard_name(filename: str) -> tuple[str, str, int, int] | None:
    """(name, split, index, num_shards) of a shard file name, None for anything else (temp files included)."""
    m = _SHARD_RE.match(filename)
    return None if m is None else (m.group(1), m.group(2), int(m.group(3)), int(m.group(4)))


def list_record_files(directory: str, split: str | None = None) -> list[str]:
    """The complete, sorted shard set in `directory` (of `split`, needed only if it holds several).

    Raises if there is none, if the set is incomplete or mixes shard counts, or if several datasets/splits
    are present and `split` does not pick one: reading a partial dataset silently would bias training, so it
    is an error, not an empty or short list.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory")
    found: dict[tuple[str, str], dict[int, set[int]]] = {}
    for filename in os.listdir(directory):
        parsed = parse_shard_name(filename)
        if parsed and (split is None or parsed[1] == split):
            name, sp, index, n = parsed
            found.setdefault((name, sp), {}).setdefault(n, set()).add(index)
    what = "*.array_record-* shards" + (f" of split {split!r}" if split else "")
    if not found:
        raise FileNotFoundError(f"no {what} in {directory}")
    if len(found) > 1:
        raise ValueError(f"{directory} holds several datasets/splits {sorted(found)}: pass split=")
    ((name, sp), counts), *_ = found.items()
    if len(counts) > 1:
        raise ValueError(f"{directory} mixes shard counts {sorted(counts)} for {name}-{sp}")
    ((n, indices),) = counts.items()
    if indices != set(range(n)):
        raise ValueError(f"{directory}: incomplete shard set for {name}-{sp}, have {len(indices)} of {n}")
    return [os.path.join(directory, shard_name(name, sp, i, n)) for i in range(n)]


def write_tfds_metadata(
    out_dir: str,
    *,
    name: str,
    split: str,
    shard_lengths: Sequence[int],
    with_events: bool,
    description: str = "",
    metadata: dict | None = None,
    version: str = "1.0.0",
) -> None:
    """Writes `dataset_info.json` and `features.json` (+ `metadata.json`) for shards already in `out_dir`.

    Everything is first written into a temporary folder and then renamed into place file by file, so
    concurrent finishers (several machines of one build) never interleave partial JSON files.
    """
    import shutil
    import tempfile

    import tensorflow_datasets as tfds

    check_name(name, split)
    num_bytes = sum(
        os.path.getsize(os.path.join(out_dir, shard_name(name, split, i, len(shard_lengths))))
        for i in range(len(shard_lengths))
    )
    identity = tfds.core.DatasetIdentity(
        name=name, version=tfds.core.Version(version), data_dir=out_dir, module_name=""
    )
    info = tfds.core.DatasetInfo(
        builder=identity,
        features=tfds_features(with_events),
        description=description,
        metadata=tfds.core.MetadataDict(metadata or {}),
    )
    info.set_file_format("array_record")
    info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=split, shard_lengths=list(shard_lengths), num_bytes=num_bytes, filename_template=None
                )
            ]
        )
    )
    tmp = tempfile.mkdtemp(prefix=".tfds_meta-", dir=out_dir)
    try:
        info.write_to_directory(tmp)
        for filename in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, filename), os.path.join(out_dir, filename))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_records(
    out_dir: str,
    examples: Iterable[dict],
    num_shards: int,
    name: str = "data",
    split: str = "train",
    compression: str = "none",
) -> list[str]:
    """Writes `examples` round-robin into `num_shards` ArrayRecord files; returns their paths in order.

    A generic writer for examples already in memory (tests, synthetic data); `atst_jax/data/prepare.py` is
    the path from audio files. Round-robin lets it stream an iterable of unknown length in one pass with
    bounded memory; the price is that shard order is not input order (nothing relies on it: the pipeline
    shuffles and carries ids).

    Each shard is written under a temporary name and renamed only after every shard has been closed, so an
    interrupted write never leaves files that `list_record_files` would take for a finished dataset. Shards of
    an earlier write of the same name/split (possibly another shard count) are removed at the rename step,
    so a directory never mixes two datasets. No TFDS metadata is written (see `write_tfds_metadata`).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    check_name(name, split)
    os.makedirs(out_dir, exist_ok=True)
    finals = [os.path.join(out_dir, shard_name(name, split, i, num_shards)) for i in range(num_shards)]
    # Hidden temp names never match the shard pattern; the pid keeps two concurrent writers (e.g. two hosts
    # racing to build the same cache) apart; the last rename wins with a complete shard set either way.
    temps = [os.path.join(out_dir, f".{os.path.basename(p)}.tmp-{os.getpid()}") for p in finals]
    writers = [ArrayRecordWriter(t, WRITER_OPTIONS[compression]) for t in temps]
    try:
        for j, ex in enumerate(examples):
            writers[j % num_shards].write(encode_example(ex))
    except BaseException:
        for w, t in zip(writers, temps, strict=True):
            w.close()
            os.remove(t)
        raise
    for w in writers:
        if not w.ok():
            raise OSError("ArrayRecordWriter reported an error")
        w.close()
    for filename in os.listdir(out_dir):
        parsed = parse_shard_name(filename)
        path = os.path.join(out_dir, filename)
        if parsed and parsed[:2] == (name, split) and path not in finals:
            os.remove(path)
    for t, p in zip(temps, finals, strict=True):
        os.replace(t, p)
    return finals


def read_features(files_or_dir) -> str:
    """The feature-set name (``atst_jax.features``) a prepared dataset records in its TFDS ``metadata.json``:
    ``files_or_dir`` is the dataset's directory, or its list of shard files (as `list_record_files` gives).

    Datasets prepared before the name was recorded (no ``metadata.json``, or one without a ``"features"``
    entry; also bare shards from `write_records`) get ``atst_jax.features.DEFAULT_FEATURES``, the ATST log-mel:
    every one of them was made by that front end, the only one this code had. An unknown recorded name, or a
    metadata file that is not JSON, is an error rather than a guess."""
    import json

    from atst_jax import features

    if isinstance(files_or_dir, (str, os.PathLike)):
        directory = os.fspath(files_or_dir)
    else:
        paths = {os.path.dirname(os.fspath(f)) for f in files_or_dir}
        if len(paths) != 1:
            raise ValueError(
                f"the shards of one dataset must share a directory, got {sorted(paths)[:3] or 'no files'}"
            )
        (directory,) = paths
    name = features.DEFAULT_FEATURES
    path = os.path.join(directory, "metadata.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                name = json.load(f).get("features", name)
        except (ValueError, AttributeError) as e:  # not JSON, or JSON but not an object
            raise ValueError(f"{path}: unreadable dataset metadata ({type(e).__name__}: {e})") from None
    if name not in features.FEATURE_SETS:
        raise ValueError(
            f"{path}: the data was prepared with feature set {name!r}, unknown here "
            f"(known: {sorted(features.FEATURE_SETS)})"
        )
    return name
