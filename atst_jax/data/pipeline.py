"""Grain input pipeline: ArrayRecord spectrograms → shuffle → repeat → crop/pad/normalise → per-host shard →
batch → (on device) global `jax.Array`.

Determinism contract: every batch is a pure function of (files, seed, pipeline arguments, position). The
shuffle is Grain's index shuffle (a permutation computed from the index, no buffer), the crop draws from
Grain's per-record generator keyed by (crop seed, global position), and nothing reads host-global random
state. That is what makes `get_state()`/`set_state()` resume exact and makes the output independent of the
number of prefetch worker processes.

Pickling: `mp_prefetch` ships the dataset to spawned worker processes, so every transform here is a
module-level class or function (no lambdas or closures). Scripts that use worker_count > 0 need a
`if __name__ == "__main__":` guard and parsed absl flags (`absl.app.run`, or
`absl.flags.FLAGS.mark_as_parsed()`).
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys
import types
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from atst_jax.audio import NORM_MIN, normalize_db
from atst_jax.data.records import FORMAT_VERSION, decode_example, list_record_files, write_records


def make_source(files: Sequence[str]) -> grain.sources.ArrayRecordDataSource:
    """Random-access view over the concatenation of `files` (in the given order), yielding record bytes."""
    return grain.sources.ArrayRecordDataSource(list(files))


class _TagIndex:
    """Pairs each record with its index in the source, so a batch can say which clips it holds.

    Upstream of `shuffle`/`repeat` the index Grain passes can exceed the source length (it carries the epoch);
    the source itself reads `index % n`, so the tag does the same.
    """

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __call__(self, index: int, record: bytes) -> tuple[int, bytes]:
        return index % self.num_records, record


class CropExample(grain.transforms.RandomMap):
    """Decodes a record and returns one random crop of exactly `crop_frames` frames, normalised.

    - Clip at least `crop_frames` long: start drawn uniformly from [0, length − crop_frames] within the
      *valid* frames, so padding stored after `length` is never selected.
    - Shorter clip: all valid frames, then padding up to `crop_frames`. The pad value is the clip's own
      minimum over its valid frames (in dB, then normalised): after the top-db floor that minimum is the
      clip's silence level, so the padded tail looks like the clip going quiet rather than a hard step to an
      arbitrary constant. Padded frames are excluded by `length` in the encoder anyway; the value matters
      only for augmentations that mix across time or clips (mixup, resizing).

    Output: `{"spec": float32 [n_mels, crop_frames], "length": int32}` (+ `"index": int32`, the record's
    position in the source, when `keep_index`). Randomness comes only from the generator Grain passes in.
    """

    def __init__(self, crop_frames: int, keep_index: bool = False):
        if crop_frames < 1:
            raise ValueError(f"crop_frames must be >= 1, got {crop_frames}")
        self.crop_frames = int(crop_frames)
        self.keep_index = keep_index

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator) -> dict[str, np.ndarray]:
        index, record = element
        ex = decode_example(record)
        mel, length = ex["mel"], int(ex["length"])
        n_mels, t = mel.shape[0], self.crop_frames
        # Normalise in float32: `normalize_db` keeps its input's dtype, and float16 arithmetic would round
        # the result to ~1e-3.
        if length >= t:
            start = int(rng.integers(0, length - t + 1))
            spec = normalize_db(mel[:, start : start + t].astype(np.float32))
            valid = t
        else:
            spec = np.empty((n_mels, t), np.float32)
            # An empty clip has no floor of its own; the normalisation's minimum (−1) stands in for silence.
            floor = np.float32(mel[:, :length].min()) if length > 0 else np.float32(NORM_MIN)
            spec[:, :length] = normalize_db(mel[:, :length].astype(np.float32))
            spec[:, length:] = normalize_db(floor)
            valid = length
        out = {"spec": spec, "length": np.int32(valid)}
        if self.keep_index:
            out["index"] = np.int32(index)
        return out


def _derive_seeds(seed: int) -> tuple[int, int]:
    # Grain's shuffle seeds epoch e with (seed + e), so raw seeds s and s+1 would replay each other's epochs
    # shifted by one. Hashing the user seed through SeedSequence decorrelates runs, and gives the crop its
    # own stream so shuffle order and crop offsets are independent.
    shuffle_seed, crop_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(crop_seed)


def make_dataset(
    files: Sequence[str],
    *,
    seed: int,
    crop_frames: int,
    per_host_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    keep_index: bool = False,
) -> grain.MapDataset:
    """The training pipeline as a lazy, random-access `MapDataset` of per-host batches.

    Order of operations and why:
    1. shuffle: one global permutation per epoch, the same on every process (same seed), different each
       epoch (Grain folds the epoch into the seed).
    2. repeat: `num_epochs=None` repeats forever (`len` becomes `sys.maxsize`).
    3. crop (random_map): applied to the *global* stream before sharding, so an example's crop depends only on
       (seed, global position), not on how many processes read the data. MapDataset is lazy: each process
       still decodes only the records it keeps.
    4. per-process shard `[process_index::process_count]`: processes read disjoint examples that together
       cover every epoch. With finite epochs the stream is first cut to a multiple of `process_count` so all
       processes produce the same number of batches (an unequal count would hang a multi-host step).
    5. batch(per_host_batch): stacks leaves along a new leading axis.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    source = make_source(files)
    n = len(source)
    if n == 0:
        raise ValueError("no records in files")
    shuffle_seed, crop_seed = _derive_seeds(seed)
    ds = grain.MapDataset.source(source).map_with_index(_TagIndex(n))
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(CropExample(crop_frames, keep_index=keep_index), seed=crop_seed)
    if num_epochs is None:
        ds = ds[process_index::process_count]
    else:
        usable = len(ds) // process_count * process_count
        ds = ds[process_index:usable:process_count]
    return ds.batch(per_host_batch, drop_remainder=drop_remainder)


class BatchIterator(grain.DatasetIterator):
    """Iterator over a batched `MapDataset` whose checkpoint state is just the next batch's position.

    Grain's own iterator states differ between 0 and N worker processes (a prefetch index vs. per-worker
    interleave states), so a checkpoint taken with 4 workers could not be resumed with 8 or 0. Because the
    pipeline is a random-access MapDataset whose batch k is a pure function of k, `{"next_batch": k}` is a
    complete state: restoring rebuilds the Grain iterator on `ds[k:]`. Subclassing `grain.DatasetIterator`
    keeps it usable with Grain's Orbax handler (`grain.checkpoint.CheckpointSave/Restore`), which JSON-dumps
    `get_state()` of such iterators.
    """

    def __init__(self, ds: grain.MapDataset, worker_count: int, prefetch_buffer: int, num_threads: int):
        super().__init__()
        self._ds = ds
        self._worker_count = worker_count
        self._prefetch_buffer = prefetch_buffer
        self._num_threads = num_threads
        self._next_batch = 0
        self._it: grain.DatasetIterator | None = None  # built lazily, so set_state before next() is free

    def _ensure_started(self) -> grain.DatasetIterator:
        if self._it is None:
            self._assert_not_closed()
            read_options = grain.ReadOptions(
                num_threads=self._num_threads, prefetch_buffer_size=self._prefetch_buffer
            )
            it_ds = self._ds[self._next_batch :].to_iter_dataset(read_options)
            if self._worker_count > 0:
                it_ds = it_ds.mp_prefetch(
                    grain.MultiprocessingOptions(
                        num_workers=self._worker_count, per_worker_buffer_size=self._prefetch_buffer
                    )
                )
            self._it = iter(it_ds)
        return self._it

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._ensure_started())
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next_batch}

    def set_state(self, state: dict[str, Any]) -> None:
        next_batch = int(state["next_batch"])
        if self._it is not None:
            if next_batch == self._next_batch:
                return  # already there: keep the running workers and their prefetched batches
            self._it.close()
            self._it = None
        self._next_batch = next_batch

    def start_prefetch(self) -> None:
        self._ensure_started().start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        super().close()

    def __str__(self) -> str:
        return f"BatchIterator(worker_count={self._worker_count}, next_batch={self._next_batch})"


def make_iterator(
    ds: grain.MapDataset, worker_count: int = 0, prefetch_buffer: int = 2, num_threads: int = 1
) -> BatchIterator:
    """A checkpointable iterator over `ds` (`get_state()` / `set_state()`), optionally in worker processes.

    `prefetch_buffer` counts *batches* (batching happens inside the MapDataset), per worker process when
    `worker_count > 0`; Grain's defaults (hundreds of elements) would hold gigabytes of batches. `num_threads`
    reads batches concurrently within a process; 1 suffices when worker processes do the heavy lifting.
    `mp_prefetch` gives worker w the batches w, w+W, ... and interleaves them back in order, so the stream —
    and the state — are identical for every `worker_count`; call `close()` to stop the workers.
    """
    return BatchIterator(ds, worker_count, prefetch_buffer, num_threads)


def to_global_batch(
    host_batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
    """Assembles each process's batch into global arrays sharded by `sharding` (leading dim = batch).

    The global shape is inferred by JAX: with the batch axis split across all processes (the usual
    `P('data')` / `P(('data', 'fsdp'))`) it is per_host × process_count along dim 0. Processes must pass
    batches of the same shape.
    """
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in host_batch.items()}


# ---------------------------------------------------------------------------------------------------------
# Embedded default data: synthetic DCASE-style clips, built once into a cache directory.
# ---------------------------------------------------------------------------------------------------------

# Bump when the embedded data or its record layout changes, so old caches are rebuilt instead of reused.
EMBEDDED_VERSION = 1
_MARKER = "embedded_dataset.json"


def _embedded_deps() -> types.SimpleNamespace:
    """The synthetic generator and the front end, imported on first use.

    Fields: generate_clip(index, seed) -> (wave, [(onset, offset, label)]), classes (label names, index =
    class id), write_dataset(out_dir, num_clips, seed), clip_filename(index), log_mel_db_np(wave).
    Behind a function so tests can substitute a stand-in.
    """
    synthetic = importlib.import_module("atst_jax.data.synthetic")
    audio = importlib.import_module("atst_jax.audio")
    return types.SimpleNamespace(
        generate_clip=synthetic.generate_clip,
        classes=list(synthetic.CLASSES),
        write_dataset=synthetic.write_dataset,
        clip_filename=synthetic.clip_filename,
        log_mel_db_np=audio.log_mel_db_np,
    )


def _embedded_example(job: tuple[int, int]) -> dict[str, Any]:
    """One embedded clip → record dict. A pure function of (index, seed), so a Pool gives serial output.

    The log-mel is computed from the generated float wave, not from the 16-bit WAV that `write_dataset`
    stores (quantisation noise sits ~90 dB below full scale, under the 80 dB top-db floor of loud clips).
    The record id is the WAV's file stem, which is how the DCASE TSV names the clip.
    """
    index, seed = job
    deps = _embedded_deps()
    class_index = {name: i for i, name in enumerate(deps.classes)}
    wave, events = deps.generate_clip(index, seed)
    mel = np.asarray(deps.log_mel_db_np(wave), np.float32)
    ev = np.array([(on, off, class_index[label]) for on, off, label in events], np.float32).reshape(-1, 3)
    return {
        # float16 here halves what a worker sends back; it is the stored precision anyway.
        "mel": mel.astype(np.float16),
        "length": mel.shape[1],
        "id": os.path.splitext(deps.clip_filename(index))[0],
        "labels": np.unique(ev[:, 2].astype(np.int32)),
        "events": ev,
    }


def _write_embedded_audio(cache_dir: str, num_clips: int, seed: int) -> None:
    _embedded_deps().write_dataset(cache_dir, num_clips, seed)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _with_progress(examples: Iterable[dict], total: int) -> Iterator[dict]:
    every = max(1, total // 10)
    for done, ex in enumerate(examples, 1):
        if done % every == 0 or done == total:
            print(f"embedded dataset: {done}/{total} clips", file=sys.stderr, flush=True)
        yield ex


def ensure_embedded_dataset(
    cache_dir: str, num_clips: int = 512, seed: int = 0, num_shards: int = 4, num_workers: int | None = None
) -> list[str]:
    """Builds (once) and returns the record shards of the embedded synthetic dataset.

    Layout of `cache_dir`: `audio/clip_XXXXX.wav` + `strong_labels.tsv` (16-bit WAVs and DCASE strong labels,
    from `synthetic.write_dataset`), `records/data-XXXXX-of-NNNNN.array_record` (dB log-mels, id = WAV stem,
    labels = sorted unique class indices into `synthetic.CLASSES`, events = (onset s, offset s, class
    index)), and `embedded_dataset.json`.

    The JSON marker is removed before and written (atomically) after everything else, so a build interrupted
    at any point is redone, and a finished one with the same (num_clips, seed, num_shards, version) is reused
    without touching the files. Concurrent builders of one directory are not coordinated: on a shared file
    system build on one process, then barrier.

    `num_workers`: processes (None: serial below 64 clips, else up to 8 CPUs). Clips are pure functions of
    (index, seed) and come back in order, so the records do not depend on it.
    """
    marker_path = os.path.join(cache_dir, _MARKER)
    records_dir = os.path.join(cache_dir, "records")
    expected = {
        "kind": "atst_jax embedded synthetic dataset",
        "version": EMBEDDED_VERSION,
        "record_format": FORMAT_VERSION,
        "num_clips": num_clips,
        "seed": seed,
        "num_shards": num_shards,
    }
    try:
        with open(marker_path) as f:
            if json.load(f) == expected:
                return list_record_files(records_dir)
    except (OSError, ValueError):
        pass  # missing, unreadable, partial or mismatched: rebuild below

    os.makedirs(cache_dir, exist_ok=True)
    if os.path.exists(marker_path):
        os.remove(marker_path)
    if num_workers is None:
        num_workers = 0 if num_clips < 64 else min(8, _cpu_count())
    jobs = [(i, seed) for i in range(num_clips)]

    if num_workers > 1:
        # spawn, not fork: the parent usually has JAX's runtime threads running, and forking a threaded
        # process can deadlock the child. The WAV/TSV writer (which renders every clip once more) is queued
        # first so it runs on one worker while the others compute log-mels; imap keeps the clip order.
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            audio_done = pool.apply_async(_write_embedded_audio, (cache_dir, num_clips, seed))
            results = pool.imap(_embedded_example, jobs, chunksize=4)
            files = write_records(records_dir, _with_progress(results, num_clips), num_shards)
            audio_done.get()
    else:
        _write_embedded_audio(cache_dir, num_clips, seed)
        files = write_records(
            records_dir, _with_progress(map(_embedded_example, jobs), num_clips), num_shards
        )

    tmp = f"{marker_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(expected, f, indent=1)
    os.replace(tmp, marker_path)
    return files
