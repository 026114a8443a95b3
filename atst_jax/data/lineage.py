"""Which clips a dataset holds: the manifest `prepare` writes beside the records, and dataset fingerprints.

A reproduced mAP that falls short is first blamed on missing or differing clips (AudioSet downloads differ
from one site to the next), so every prepared dataset says exactly what it holds and every run says what it
saw:

    manifest.jsonl   line 1: {"manifest": 1, "fingerprint": F, "clips": N, "content_hash": ...}
                     then one line per record, in record order (shard 0 first, then each shard's order):
                     {"id": ..., "file": source file relative to the audio dir, "seconds": valid duration,
                      "sha256": content hash}

The content hash is SHA-256 of the record's stored bytes (the `tf.train.Example` that `records.encode_example`
writes), not of the decoded audio: those bytes are what training reads, they are deterministic (the encoder
writes fields in a fixed order), they cover the mel, the labels and the strong events (a relabelled clip is a
different clip for training), and hashing them needs no decoding, so the manifest costs the preparation
nothing noticeable and `compare` can check any dataset, even one prepared before manifests existed, from its
shards alone. They do not depend on ArrayRecord's compression (hashed before it).

The fingerprint is SHA-256 over the sorted (id, content hash) pairs: the same for any sharding, shard order
or worker count, and different as soon as one clip is missing, added or changed.

A dataset without a manifest (prepared before it existed) has fingerprint None ("unknown"): reading every
record of an AudioSet-sized dataset to hash it at training start would cost minutes, so the trainer does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from atst_jax.data import records

MANIFEST = "manifest.jsonl"
MANIFEST_VERSION = 1
CONTENT_HASH = "sha256 of each record's stored tf.train.Example bytes"


def content_hash(record: bytes) -> str:
    return hashlib.sha256(record).hexdigest()


def entry(record: bytes, file: str | None, seconds_per_frame: float) -> dict[str, Any]:
    """The manifest line of one stored record (``file``: its source, relative to the audio dir)."""
    ex = records.decode_example(record)
    return {
        "id": ex["id"],
        "file": file,
        "seconds": round(ex["length"] * seconds_per_frame, 3),
        "sha256": content_hash(record),
    }


def fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the sorted ``(id, content hash)`` pairs (order and sharding do not matter)."""
    h = hashlib.sha256()
    for clip_id, digest in sorted(pairs):
        h.update(f"{clip_id}\t{digest}\n".encode())
    return h.hexdigest()


def write_manifest(out_dir: str, entries: Sequence[dict]) -> str:
    """Writes ``manifest.jsonl`` atomically; returns the fingerprint."""
    fp = fingerprint((e["id"], e["sha256"]) for e in entries)
    header = {
        "manifest": MANIFEST_VERSION,
        "fingerprint": fp,
        "clips": len(entries),
        "content_hash": CONTENT_HASH,
    }
    path = os.path.join(out_dir, MANIFEST)
    tmp = os.path.join(out_dir, f".{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in (header, *entries):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return fp


def read_manifest(directory: str, entries: bool = True) -> tuple[dict, list[dict]] | None:
    """``(header, entries)`` of a dataset's manifest, None when it has none (or an unreadable one).
    ``entries=False`` reads the header alone (entries ``[]``): AudioSet's manifest has ~2M lines."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            header = json.loads(f.readline() or "null")
            if not isinstance(header, dict) or header.get("manifest") != MANIFEST_VERSION:
                return None
            rows = [json.loads(line) for line in f if line.strip()] if entries else []
    except (OSError, ValueError):
        return None
    return header, rows


def entries_from_records(files: Sequence[str], seconds_per_frame: float | None = None) -> list[dict]:
    """Manifest lines recomputed from the shards themselves (no source file: the records do not keep it).
    ``seconds_per_frame``: the front end's hop in seconds (default: from the dataset's metadata)."""
    from atst_jax.data import pipeline
    from atst_jax.features import FEATURE_SETS

    if seconds_per_frame is None:
        fs = FEATURE_SETS[records.read_features(files)]
        seconds_per_frame = fs.hop_length / fs.sample_rate
    source = pipeline.make_source(files)
    return [entry(source[i], None, seconds_per_frame) for i in range(len(source))]


def _directory(files: Sequence[str]) -> str | None:
    dirs = {os.path.dirname(os.fspath(f)) for f in files}
    return next(iter(dirs)) if len(dirs) == 1 else None


def training_data(files: Sequence[str], subset: int = 0, subset_seed: int = 1234) -> dict[str, Any]:
    """What a run trains on: ``{"fingerprint", "clips", "subset_fingerprint"}`` (fingerprints None when the
    dataset has no manifest, or one that does not match its shards; ``subset_fingerprint`` None without
    ``data.subset``). The subset is the one `pipeline.make_dataset` draws (same indices: record order)."""
    from atst_jax.data import pipeline

    directory = _directory(files)
    manifest = read_manifest(directory, entries=bool(subset)) if directory is not None else None
    n = len(pipeline.make_source(files))
    if manifest is not None and manifest[0].get("clips") != n:  # of other shards: unknown, not wrong
        manifest = None
    out: dict[str, Any] = {
        "fingerprint": manifest[0]["fingerprint"] if manifest else None,
        "clips": subset or n,
        "subset_fingerprint": None,
    }
    if subset and manifest is not None and subset <= n:
        rows = manifest[1]
        out["subset_fingerprint"] = fingerprint(
            (rows[i]["id"], rows[i]["sha256"]) for i in pipeline.subset_indices(n, subset, subset_seed)
        )
    return out
