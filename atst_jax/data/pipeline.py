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
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from atst_jax import features as feature_sets
from atst_jax.audio import NORM_MIN, normalize_db  # noqa: F401 (both re-exported)
from atst_jax.data.records import FORMAT_VERSION, decode_example, list_record_files
from atst_jax.features import DEFAULT_FEATURES


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


def normalisation(features: str = DEFAULT_FEATURES) -> tuple[np.float32, np.float32]:
    """``(scale, offset)`` in float32 that map the stored dB values of a feature set to the model input
    (``x · scale + offset``). For ``atst_logmel64`` that is ``normalize_db`` folded into one multiply-add: in
    float32 it differs from the four-operation form by at most a couple of ulps (~1e-7), and lets the batch be
    written with two in-place passes per clip while it is still in cache."""
    fs = feature_sets.get(features)
    return np.float32(fs.scale), np.float32(fs.offset)


class CropExample(grain.transforms.RandomMap):
    """Decodes a record and returns one random window of exactly ``frames`` frames per named crop, normalised.

    ``crops``: ``[(name, frames), ...]``. The windows are drawn **in order from the one generator** Grain
    passes in, each independently of the others (ATST-Clip's anchor and positive are two independent crops
    of one clip); a single crop draws exactly what the one-crop pipeline always drew.

    - Clip at least ``frames`` long: start drawn uniformly from [0, length − frames] within the *valid*
      frames, so padding stored after ``length`` is never selected.
    - Shorter clip: all valid frames, then padding up to ``frames``. The pad value is the clip's own minimum
      over its valid frames (in dB, then normalised): after the top-db floor that minimum is the clip's
      silence level, so the padded tail looks like the clip going quiet rather than a hard step to an
      arbitrary constant. Padded frames are excluded by the length in the encoder anyway; the value matters
      only for augmentations that mix across time or clips (mixup, resizing). That is ``atst_logmel64``; a
      feature set without a per-clip floor (``FeatureSet.pad_with_clip_min`` false, e.g. ``kaldi_fbank128``)
      pads with its ``silence`` value (what a zero waveform gives), as does every set for an empty clip.

    - ``roll_prob`` > 0: with that probability the clip's valid frames are first rotated by a random number
      of frames ``r`` in [1, length) (ASiT rolls each waveform so, p = 0.5, before its transform crops it):
      every crop of the clip is then drawn, as above, from the one rotated clip, i.e. frame ``i`` of it is the
      clip's frame ``(i − r) mod length`` and a window may run over the clip's end into its start. Draws
      nothing when 0, so other methods' crops are what they always were.

    Output: ``{name: float32 [n_mels, frames], f"{name}_length": int32}`` per crop (+ ``"index": int32``, the
    record's position in the source, when ``keep_index``). Randomness comes only from the generator Grain
    passes in.

    Inside ``make_dataset`` the work is split in two (``_CropRecord`` per record, ``AssembleBatch`` per batch)
    so the float16 → float32 conversion and the normalisation write straight into the batch array: a separate
    per-clip float32 array followed by ``np.stack`` cost about as much again as everything else together
    (16 MB copied per batch of 64 ten-second clips). Both paths run the same code and give the same values.
    """

    def __init__(
        self, crops, keep_index: bool = False, features: str = DEFAULT_FEATURES, roll_prob: float = 0.0
    ):
        self.crops = tuple((str(name), int(frames)) for name, frames in crops)
        if not self.crops:
            raise ValueError("at least one crop is needed")
        if not 0.0 <= roll_prob <= 1.0:
            raise ValueError(f"roll_prob must be in [0, 1], got {roll_prob}")
        self.roll_prob = float(roll_prob)
        for name, frames in self.crops:
            if frames < 1:
                raise ValueError(f"crop {name!r}: frames must be >= 1, got {frames}")
        names = [name for name, _ in self.crops]
        # Each crop becomes two batch keys, `name` and `name_length`, next to "index": refuse names that
        # would overwrite one another's keys instead of silently dropping a crop.
        keys = [k for name in names for k in (name, f"{name}_length")] + ["index"]
        if len(set(keys)) != len(keys):
            raise ValueError(f"crop names must be distinct and give distinct batch keys, got {names}")
        self.keep_index = keep_index
        self.features = features
        # Built once (it also checks `features` now, not at the first record inside a worker process).
        self._assemble = AssembleBatch(self.crops, features)
        fs = feature_sets.get(features)
        self._silence, self._pad_with_clip_min = np.float32(fs.silence), fs.pad_with_clip_min

    def crop(self, element: tuple[int, bytes], rng: np.random.Generator) -> dict[str, Any]:
        """The crops as plans: per crop the valid float16 frames (a view into the record), the dB pad value
        and the valid length (+ index)."""
        index, record = element
        ex = decode_example(record)
        mel, length = ex["mel"], int(ex["length"])
        roll = 0
        if self.roll_prob and length > 1 and rng.random() < self.roll_prob:
            roll = int(rng.integers(1, length))
        out: dict[str, Any] = {}
        for name, t in self.crops:
            if length >= t:
                start = int(rng.integers(0, length - t + 1))
                out[name] = {
                    "mel": _window(mel, start - roll, t, length),
                    "pad": np.float32(0.0),
                    "length": np.int32(t),
                }
            else:
                valid = np.roll(mel[:, :length], roll, axis=1) if roll else mel[:, :length]
                # The feature set's silence, or (atst_logmel64) the clip's own floor; an empty clip has no
                # floor of its own, so silence (for atst_logmel64 the normalisation's minimum, −1) stands in.
                if self._pad_with_clip_min and length > 0:
                    floor = np.float32(valid.min())
                else:
                    floor = self._silence
                out[name] = {"mel": valid, "pad": floor, "length": np.int32(length)}
        if self.keep_index:
            out["index"] = np.int32(index)
        return out

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator) -> dict[str, np.ndarray]:
        batch = self._assemble([self.crop(element, rng)])
        return {k: v[0] for k, v in batch.items()}


def _window(mel: np.ndarray, start: int, frames: int, length: int) -> np.ndarray:
    """``frames`` frames of the clip's ``length`` valid ones from ``start`` (taken mod ``length``), wrapping
    over the end into the start: a view when the window does not wrap."""
    start %= length
    if start + frames <= length:
        return mel[:, start : start + frames]
    return np.concatenate([mel[:, start:length], mel[:, : frames - (length - start)]], axis=1)


class _CropRecord(CropExample):
    """`CropExample` without the conversion: yields the plan that `AssembleBatch` turns into the batch."""

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator) -> dict[str, Any]:
        return self.crop(element, rng)


# float16 → float32 by bit manipulation: a float16's exponent/mantissa bits shifted left by 13 are a float32
# whose value is the float16's times 2^-112 (exponent bias 15 vs 127), subnormals included; one multiply by
# 2^112 * scale both undoes that and normalises, exactly (a power-of-two factor adds no rounding). numpy's
# own float16 cast is not vectorised: ~100 µs per 10 s clip here, a quarter of the pipeline's whole budget,
# against ~40 µs for these integer passes.
_F16_BIAS = np.float32(2.0**112)


def _normalize_f16_into(dst, src, bits, sign, scale, offset) -> None:
    """dst = float32(src) * scale + offset for a float16 `src`; bits/sign: uint32 scratch, same shape.
    Identical to the plain cast-multiply-add (IEEE rounding is sign-symmetric)."""
    np.copyto(bits, src.view(np.uint16), casting="unsafe")
    np.bitwise_and(bits, 0x8000, out=sign)
    np.bitwise_and(bits, 0x7FFF, out=bits)
    if bits.size and bits.max() >= 0x7C00:  # Inf/NaN: the trick does not cover them, take the slow path
        dst[...] = src
        np.multiply(dst, scale, out=dst)
    else:
        np.left_shift(bits, 13, out=bits)
        np.multiply(bits.view(np.float32), _F16_BIAS * scale, out=dst)
        np.left_shift(sign, 16, out=sign)
        dst_bits = dst.view(np.uint32)
        np.bitwise_or(dst_bits, sign, out=dst_bits)
    np.add(dst, offset, out=dst)


class AssembleBatch:
    """Grain `batch_fn`: crop plans → per crop ``{name: float32 [B, n_mels, frames], f"{name}_length": int32
    [B]}`` (+ "index"), converting and normalising each clip directly into its row of the batch."""

    def __init__(self, crops, features: str = DEFAULT_FEATURES):
        self.crops = tuple((str(name), int(frames)) for name, frames in crops)
        self.features = features
        self.scale, self.offset = normalisation(features)

    def __call__(self, plans: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        out = {}
        scale, offset = self.scale, self.offset
        for name, frames in self.crops:
            n_mels = plans[0][name]["mel"].shape[0]
            spec = np.empty((len(plans), n_mels, frames), np.float32)
            bits = np.empty((n_mels, frames), np.uint32)
            sign = np.empty_like(bits)
            for row, plan in zip(spec, plans, strict=True):
                crop = plan[name]
                valid = int(crop["length"])
                mel = crop["mel"]
                if mel.dtype == np.float16:
                    _normalize_f16_into(row[:, :valid], mel, bits[:, :valid], sign[:, :valid], scale, offset)
                else:
                    np.multiply(mel, scale, out=row[:, :valid], dtype=np.float32, casting="unsafe")
                    np.add(row[:, :valid], offset, out=row[:, :valid])
                row[:, valid:] = crop["pad"] * scale + offset
            out[name] = spec
            out[f"{name}_length"] = np.array([p[name]["length"] for p in plans], np.int32)
        if "index" in plans[0]:
            out["index"] = np.array([p["index"] for p in plans], np.int32)
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
    crops: Sequence[tuple[str, int]],
    per_host_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    keep_index: bool = False,
    features: str = DEFAULT_FEATURES,
    subset: int = 0,
    subset_seed: int = 1234,
    roll_prob: float = 0.0,
) -> grain.MapDataset:
    """The training pipeline as a lazy, random-access `MapDataset` of per-host batches.

    ``crops``: ``[(name, frames), ...]`` per clip and ``roll_prob`` (see `CropExample`); ``features``: the
    dataset's feature set (its normalisation); ``subset=N`` > 0 trains on N distinct records drawn with ``subset_seed`` (the
    official small ATST recipes: 200,000 AudioSet clips, seed 1234), the same on every process and for any
    shuffle seed, kept in ascending order.

    Order of operations and why:
    0. subset: a fixed set of source indices, before everything else, so the shuffle permutes only it.
    1. shuffle: one global permutation per epoch, the same on every process (same seed), different each
       epoch (Grain folds the epoch into the seed).
    2. repeat: `num_epochs=None` repeats forever (`len` becomes `sys.maxsize`).
    3. crop (random_map): applied to the *global* stream before sharding, so an example's crop depends only on
       (seed, global position), not on how many processes read the data. MapDataset is lazy: each process
       still decodes only the records it keeps.
    4. per-process share: global batch k is the stream's examples ``[k·G, (k+1)·G)`` (G = per_host_batch ×
       process_count) and process p reads the contiguous block ``p·per_host_batch + [0, per_host_batch)`` of
       it. Concatenated in process order (what `make_array_from_process_local_data` does), the global batch
       is then the same array for any process count, so a run's losses do not depend on how many hosts read
       the data. With finite epochs the stream is first cut to a multiple of `process_count` so all
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
    if subset < 0:
        raise ValueError(f"subset={subset} must be >= 0 (0: all records)")
    if subset > n:
        raise ValueError(f"subset={subset} clips asked for, but the data has {n} records")
    if subset:
        # Its own generator, seeded by subset_seed alone: the same set on every process and for every shuffle
        # seed, so runs with different seeds still train on the same clips (as the official recipes do).
        ds = _Subset(ds, subset_indices(n, subset, subset_seed))
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(num_epochs)
    crop = _CropRecord(crops, keep_index=keep_index, features=features, roll_prob=roll_prob)
    ds = ds.random_map(crop, seed=crop_seed)
    if process_count > 1:
        ds = _ProcessBlocks(ds, per_host_batch, process_index, process_count, finite=num_epochs is not None)
    return ds.batch(per_host_batch, drop_remainder=drop_remainder, batch_fn=AssembleBatch(crops, features))


def subset_indices(n: int, subset: int, subset_seed: int) -> np.ndarray:
    """The ascending source indices of the ``subset`` records drawn from ``n`` (one definition, shared with
    `lineage.training_data`, which fingerprints the clips drawn)."""
    return np.sort(np.random.default_rng(subset_seed).choice(n, size=subset, replace=False))


class _Subset(grain.MapDataset):
    """The records at ``indices`` (ascending) of the parent, in that order: a fixed N-clip subset."""

    def __init__(self, parent, indices: np.ndarray):
        super().__init__(parent)
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[int(self._indices[index % len(self._indices)])]

    def __str__(self) -> str:
        return f"Subset({len(self._indices)} records)"


class _ProcessBlocks(grain.MapDataset):
    """Process p's examples: block p of every global batch (see `make_dataset`, step 4).

    With a finite stream of L examples (cut to a multiple of the process count), the last, partial global
    batch of r examples is split the same way: r / process_count consecutive examples per process.
    """

    def __init__(self, parent, per_host: int, process_index: int, process_count: int, finite: bool):
        super().__init__(parent)
        self._per_host, self._p, self._count = per_host, process_index, process_count
        self._global = per_host * process_count
        total = len(parent) // process_count * process_count if finite else len(parent)
        self._full = total // self._global  # complete global batches
        self._tail = (total - self._full * self._global) // process_count  # per process, in the last one
        self._len = total // process_count if finite else len(parent) // process_count

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        k, j = divmod(index, self._per_host)
        if k < self._full:
            return self._parent[k * self._global + self._p * self._per_host + j]
        t = index - self._full * self._per_host
        return self._parent[self._full * self._global + self._p * self._tail + t]

    def __str__(self) -> str:
        return f"ProcessBlocks(process={self._p}/{self._count}, per_host={self._per_host})"


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
# 2: records written by atst_jax.data.prepare (TFDS-compatible tf.train.Example) from the WAVs.
# 3: the patterned classes of atst_jax.data.synthetic (same file names, event times and class indices as 2:
#    only a stamp beside the records tells their shards apart, see clear_stale_records).
EMBEDDED_VERSION = 3
EMBEDDED_NAME = "atst_embedded"
_MARKER = "embedded_dataset.json"


def _embedded_deps() -> types.SimpleNamespace:
    """The synthetic generator, imported on first use. Fields: classes (label names, index = class id) and
    write_dataset(out_dir, num_clips, seed), which writes `audio/*.wav` and a DCASE `strong_labels.tsv`.
    Behind a function so tests can substitute a stand-in."""
    synthetic = importlib.import_module("atst_jax.data.synthetic")
    return types.SimpleNamespace(classes=list(synthetic.CLASSES), write_dataset=synthetic.write_dataset)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ensure_embedded_dataset(
    cache_dir: str,
    num_clips: int = 512,
    seed: int = 0,
    num_shards: int = 4,
    num_workers: int | None = None,
    features: str = DEFAULT_FEATURES,
) -> list[str]:
    """Builds (once) and returns the record shards of the embedded synthetic dataset.

    Built the way users build theirs: `synthetic.write_dataset` writes `audio/clip_XXXXX.wav` (16-bit) and the
    DCASE strong-label `strong_labels.tsv`, then `atst_jax.data.prepare` turns them into `records/` (a
    TFDS-readable directory: shards `atst_embedded-train.array_record-*`, dataset_info.json, labels.json,
    report.json). Record ids are the WAV stems, labels the sorted unique class indices into
    `synthetic.CLASSES`, events (onset s, offset s, class index). `embedded_dataset.json` marks completion.

    The JSON marker is removed before and written (atomically) after everything else, so a build interrupted
    at any point is redone (prepare reuses the shards it had finished), and a finished one with the same
    (num_clips, seed, num_shards, versions) is reused without touching the files. Concurrent callers on one
    host (several training processes per machine) serialise on an advisory lock file, so one builds and the
    others reuse; across hosts on a shared file system, build on one process and barrier (the trainer does).

    `num_workers`: decoding processes (None: in-process below 64 clips, else up to 8 CPUs). The records do not
    depend on it.

    `features`: the feature set of the records (`atst_jax.features`). The default's are `records/` and
    `embedded_dataset.json` (as before feature sets existed, so those caches stay valid); any other set has its
    own `records_<features>/` and `embedded_dataset_<features>.json`, so caches of several sets live side by
    side. `audio/` is shared: the WAVs depend only on (seed, clip index).
    """
    feature_sets.get(features)  # an unknown name fails here, not after the audio is written
    suffix = "" if features == DEFAULT_FEATURES else f"_{features}"
    marker_path = os.path.join(cache_dir, f"{os.path.splitext(_MARKER)[0]}{suffix}.json")
    records_dir = os.path.join(cache_dir, f"records{suffix}")
    expected = {
        "kind": "atst_jax embedded synthetic dataset",
        "version": EMBEDDED_VERSION,
        "record_format": FORMAT_VERSION,
        "num_clips": num_clips,
        "seed": seed,
        "num_shards": num_shards,
    }
    if features != DEFAULT_FEATURES:
        expected["features"] = features

    def finished() -> bool:
        try:
            with open(marker_path) as f:
                return json.load(f) == expected
        except (OSError, ValueError):
            return False  # missing, unreadable, partial or mismatched: rebuild

    if finished():
        return list_record_files(records_dir)
    os.makedirs(cache_dir, exist_ok=True)
    import fcntl

    with open(os.path.join(cache_dir, ".build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if finished():  # another process built it while we waited
            return list_record_files(records_dir)
        return _build_embedded(cache_dir, records_dir, marker_path, expected, num_workers, features)


def clear_stale_records(records_dir: str, version: int) -> None:
    """Removes ``records_dir`` unless the stamp beside it (``<records_dir>.source.json``) says it was built from
    generator ``version``; then writes that stamp. ``prepare`` reuses a finished shard when the file names
    and labels match, and a new version of the synthetic generator keeps both (only the sound changes), so
    without this an old cache's shards would be reused under new WAVs. Shards of an interrupted build of the
    same version are kept (the stamp already says ``version``)."""
    import shutil

    stamp = f"{records_dir}.source.json"
    try:
        with open(stamp) as f:
            if json.load(f) == {"version": version}:
                return
    except (OSError, ValueError):
        pass
    if os.path.isdir(records_dir):
        shutil.rmtree(records_dir)
    os.makedirs(os.path.dirname(os.path.abspath(records_dir)), exist_ok=True)
    tmp = f"{stamp}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": version}, f)
    os.replace(tmp, stamp)


def _build_embedded(cache_dir, records_dir, marker_path, expected, num_workers, features=DEFAULT_FEATURES):
    num_clips, seed, num_shards = expected["num_clips"], expected["seed"], expected["num_shards"]
    if os.path.exists(marker_path):
        os.remove(marker_path)
    clear_stale_records(records_dir, EMBEDDED_VERSION)  # also removes version-1 (msgpack) shards
    if num_workers is None:
        num_workers = 0 if num_clips < 64 else min(8, _cpu_count())

    deps = _embedded_deps()
    deps.write_dataset(cache_dir, num_clips, seed)
    prepare = importlib.import_module("atst_jax.data.prepare")
    plan = prepare.plan_dcase(
        os.path.join(cache_dir, "strong_labels.tsv"), os.path.join(cache_dir, "audio"), classes=deps.classes
    )
    result = prepare.build(
        plan,
        records_dir,
        name=EMBEDDED_NAME,
        options=prepare.Options(features=features),
        shards=num_shards,
        workers=num_workers,
        progress=sys.stderr.isatty(),
    )
    if result["skipped"]:
        raise RuntimeError(
            f"embedded dataset: {len(result['skipped'])} clip(s) unusable: {result['skipped'][:3]}"
        )
    files = list_record_files(records_dir)

    tmp = f"{marker_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(expected, f, indent=1)
    os.replace(tmp, marker_path)
    return files
