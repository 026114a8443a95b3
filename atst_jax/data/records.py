"""A small, pickle-free record format for spectrogram datasets, stored in ArrayRecord shards.

Everything that knows how an example is laid out on disk lives in this file, so the format can be swapped
(e.g. for the TFDS-compatible one of `atst_jax/data/prepare.py`) without touching the input pipeline: the
pipeline only calls `decode_example` and `list_record_files`.

Example (a plain dict):

    mel     np.float16 [n_mels, frames]  log-mel in dB, already top-db floored, NOT normalised
    length  int                          number of valid frames (<= frames)
    id      str                          clip identifier (e.g. file stem or YTID)
    labels  np.int32 [k]                 class indices, may be empty
    events  np.float32 [e, 3]            optional strong labels: onset s, offset s, class index

Encoding: one msgpack map per record. Arrays are stored as `{dtype, shape, data}` with the dtype as an
explicit byte-order string (`'<f2'`), so decoding is exact and independent of the host; strings and ints are
native msgpack values. msgpack is used (and not pickle) because records are data, never code: reading a
record cannot execute anything. A `v` field carries the format version so a future reader can refuse or
convert old shards.

Sharding: example j goes to shard `j % num_shards` (round-robin). Round-robin lets the writer stream an
iterable of unknown length with one pass and bounded memory, and keeps shard sizes within one record of each
other. The price is that the concatenated read order (shard 0, shard 1, ...) is not the input order; nothing
relies on that order because the pipeline shuffles and carries ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

FORMAT_VERSION = 1

# Fields with a fixed dtype and rank. Inputs are coerced to these so the on-disk types never depend on what
# the caller happened to pass (a float32 mel is stored as float16, the format's precision).
_ARRAY_FIELDS = {"mel": (np.float16, 2), "labels": (np.int32, 1), "events": (np.float32, 2)}


def _pack_array(x: np.ndarray) -> dict[str, Any]:
    x = np.ascontiguousarray(x)
    return {"dtype": x.dtype.str, "shape": list(x.shape), "data": x.tobytes()}


def _unpack_array(d: dict[str, Any]) -> np.ndarray:
    # frombuffer gives a read-only view of the record bytes: no copy on decode; consumers that modify the
    # array must copy (the pipeline's crop does).
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def encode_example(ex: dict[str, Any]) -> bytes:
    """Serialises one example dict (see module docstring) to bytes. Validates shapes and types."""
    mel = np.asarray(ex["mel"])
    if mel.ndim != 2:
        raise ValueError(f"mel must be [n_mels, frames], got shape {mel.shape}")
    length = int(ex["length"])
    if not 0 <= length <= mel.shape[1]:
        raise ValueError(f"length {length} outside [0, {mel.shape[1]}]")
    labels = np.asarray(ex.get("labels", np.zeros((0,), np.int32)))
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    out: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "id": str(ex["id"]),
        "length": length,
        "mel": _pack_array(mel.astype(np.float16, copy=False)),
        "labels": _pack_array(labels.astype(np.int32, copy=False)),
    }
    if ex.get("events") is not None:
        events = np.asarray(ex["events"], np.float32).reshape(-1, 3)
        out["events"] = _pack_array(events)
    return msgpack.packb(out, use_bin_type=True)


def decode_example(b: bytes) -> dict[str, Any]:
    """Inverse of `encode_example`. `events` is present only if it was written."""
    d = msgpack.unpackb(b, raw=False)
    if d.get("v") != FORMAT_VERSION:
        raise ValueError(f"unsupported record format version {d.get('v')!r} (expected {FORMAT_VERSION})")
    ex: dict[str, Any] = {"id": d["id"], "length": d["length"]}
    for name in _ARRAY_FIELDS:
        if name in d:
            ex[name] = _unpack_array(d[name])
    return ex


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.array_record"


def _shard_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}-(\d{{5}})-of-(\d{{5}})\.array_record$")


def write_records(out_dir: str, examples: Iterable[dict], num_shards: int, prefix: str = "data") -> list[str]:
    """Writes `examples` round-robin into `num_shards` ArrayRecord files; returns their paths in order.

    Each shard is written under a temporary name and renamed only after every shard has been closed, so an
    interrupted write never leaves files that `list_record_files` would take for a finished dataset. Shards of
    an earlier write with the same prefix (possibly a different shard count) are removed first at the rename
    step, so a directory never mixes two datasets.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(out_dir, exist_ok=True)
    finals = [os.path.join(out_dir, shard_name(prefix, i, num_shards)) for i in range(num_shards)]
    # The pid in the temporary name keeps two concurrent writers (e.g. two hosts racing to build the same
    # cache) from writing into the same file; the last rename wins with a complete shard set either way.
    temps = [f"{p}.tmp-{os.getpid()}" for p in finals]
    # group_size:1 puts every record in its own chunk: a random read decompresses one record, not a group.
    writers = [ArrayRecordWriter(t, "group_size:1") for t in temps]
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
    pattern = _shard_pattern(prefix)
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if pattern.match(name) and path not in finals:
            os.remove(path)
    for t, p in zip(temps, finals, strict=True):
        os.replace(t, p)
    return finals


def list_record_files(directory: str, prefix: str = "data") -> list[str]:
    """The complete, sorted shard set `{prefix}-XXXXX-of-NNNNN.array_record` in `directory`.

    Raises if the set is incomplete or mixes shard counts: reading a partial dataset silently would bias
    training, so it is an error, not an empty or short list.
    """
    pattern = _shard_pattern(prefix)
    found: dict[int, set[int]] = {}
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not found:
        raise FileNotFoundError(f"no {prefix}-*.array_record shards in {directory}")
    if len(found) > 1:
        raise ValueError(f"{directory} mixes shard counts {sorted(found)} for prefix {prefix!r}")
    ((n, indices),) = found.items()
    if indices != set(range(n)):
        raise ValueError(f"{directory}: incomplete shard set, have {len(indices)} of {n}")
    return [os.path.join(directory, shard_name(prefix, i, n)) for i in range(n)]
