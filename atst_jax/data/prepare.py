"""Turn audio collections into spectrogram datasets: sharded ArrayRecord of log-mels that both the Grain
pipeline and tensorflow-datasets read.

    python -m atst_jax.data.prepare audioset --csv balanced_train_segments.csv [--csv more.csv ...] \\
        --labels class_labels_indices.csv --audio_dir AUDIO --out OUT
    python -m atst_jax.data.prepare dcase --tsv LABELS.tsv --audio_dir AUDIO --out OUT [--classes FILE]
    python -m atst_jax.data.prepare folder --audio_dir AUDIO --out OUT [--labels_from_subdirs]

Inputs
  audioset  Segment CSVs (`#` comment lines; `YTID, start_seconds, end_seconds, "label,label"`) and
            `class_labels_indices.csv` (`index,mid,display_name`, any number of classes). Audio files are
            found anywhere under AUDIO by name: `YTID.ext`, `YTID_<start>_<end>.ext`, optionally with a `Y`
            prefix, any common extension. Rows without an audio file are reported, not fatal.
  dcase     A weak (`filename<TAB>event_labels`, labels comma-separated) or strong
            (`filename<TAB>onset<TAB>offset<TAB>event_label`, seconds) TSV, told apart by its header; file names
            are relative to AUDIO. `--classes` (one name per line, or a labels.json) fixes the vocabulary,
            otherwise it is the sorted set of labels in the TSV.
  folder    Every audio file under AUDIO (hidden files skipped), in sorted path order; with
            `--labels_from_subdirs` the first sub-folder is the class (files at the top are reported).

Front end (`--features`, a name in `atst_jax.features`): `atst_logmel64` (default; ATST, 16 kHz, described
below), `atst_logmel64_unfloored` (the same dB log-mel without the 80 dB floor, down to −100 dB: for ATST-Clip's
per-crop floor), `kaldi_fbank128` (ASiT/AST Kaldi fbank: 32 kHz, float16 raw log fbank [128, frames], frames =
1 + (samples − 800) // 320) or `kaldi_fbank128_16k` (EAT's: the same at 16 kHz, frames = 1 + (samples − 400)
// 160); the name goes into metadata.json ("features") and into the shard fingerprints.

Each file is decoded with `atst_jax.audio.load_audio` (mono, resampled with soxr to the front end's rate),
split into clips of at most `--clip_seconds` (10 s; `--long crop` keeps only the first clip; a trailing piece
shorter than `--min_tail_seconds` is dropped, so a 10.02 s AudioSet file gives one clip), and each clip
becomes one record (format: `atst_jax/data/records.py`): float16 dB log-mel [64, frames] with its own 80 dB
floor (atst_logmel64_unfloored: without it; the Kaldi sets: the raw log fbank [128, frames]), frames, id
(YTID / file path without extension; `id@start_seconds` for the pieces of a split file), class indices, and
for strong labels the events (onset, offset, class; seconds) relative to the clip. Short files are kept at
their length (one shorter than a 25 ms Kaldi frame gives that one frame, zero-padded). A file that cannot be
used (empty, not audio, truncated, NaN/Inf, a directory, a broken link, a crashing decoder) is skipped and
reported; it never stops the run.

Output OUT
  {name}-{split}.array_record-XXXXX-of-NNNNN   shards; shard j holds files [j*n/N, (j+1)*n/N) in input order
  dataset_info.json, features.json, metadata.json   TFDS metadata:
        tfds.builder_from_directory(OUT).as_data_source("train"); with OUT = DATA_DIR/NAME/1.0.0 also
        tfds.data_source("NAME", data_dir=DATA_DIR, split="train") (NAME defaults to that folder name)
  labels.json     {"num_classes", "classes": [names], "ids": [AudioSet mids or names], "strong"}
  report.json     {"written": number of clips, "skipped": [{"file", "reason"}, ...]}
  _progress/      one done marker per finished shard (its fingerprint, record count, skipped files)

Speed, determinism, restarts
  `--workers` processes (default: all cores) decode files; the parent writes the records in input order,
  so the shards are byte-identical for any worker count. Every shard is written under a temporary name,
  renamed when complete, then marked done; a rerun skips shards whose marker matches (same files, labels and
  options) and rebuilds the rest, so an interrupted run is resumed by running the same command again.
  Each shard is built under a lock (`_progress/<shard>.lock`): two runs into one OUT split the shards between
  them (whichever finishes last writes the metadata), and a temporary shard whose lock is free is the orphan of
  a killed run and is removed. Malformed CSV/TSV rows are reported all at once; an AudioSet segment with a
  label missing from --labels is skipped and reported (`--unknown_labels error` stops instead). Record ids
  are unique per input: files that would share one (x.wav, x.flac) keep their extension in it.

Many machines (`--num_shards K --shard_index i`)
  Run the same command on K machines sharing OUT (a shared file system), with `--shard_index` 0..K-1: job i
  builds the output shards j with j % K == i, so the jobs write disjoint parts of one dataset (make sure
  there are at least K output shards, see `--files_per_shard`). Whichever job finds every shard done writes
  the metadata, labels.json and report.json; if jobs were killed, rerun the missing indices (or the whole
  command once without --shard_index: finished shards are skipped). On SLURM, for example:
      #SBATCH --array=0-31
      python -m atst_jax.data.prepare audioset ... --out $OUT --num_shards 32 --shard_index $SLURM_ARRAY_TASK_ID
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from atst_jax import audio
from atst_jax import features as feature_sets
from atst_jax.data import lineage, records
from atst_jax.errors import UserError
from atst_jax.features import DEFAULT_FEATURES

# Bump when the per-file processing changes in a way that changes record bytes (it is part of the shard
# fingerprints, so finished shards from older code are rebuilt rather than mixed with new ones).
PREPARE_VERSION = 1

AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .m4a .aac .aif .aiff .aifc .au .snd .caf .w64 .rf64 .wma .webm "
    ".mp4 .mka".split()
)
_PROGRESS_DIR = "_progress"


class PrepareError(UserError):
    """A problem with the inputs or the request (malformed CSV line, nothing usable...): one clear line."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-clip processing choices; all of them change the records, so all are part of the fingerprints."""

    long: str = "split"  # "split": cut long files into clip_seconds pieces; "crop": keep the first piece
    clip_seconds: float = 10.0
    min_tail_seconds: float = 1.0  # the last piece of a split file is dropped if shorter than this
    compression: str = "none"  # ArrayRecord chunk compression: "none" or "zstd"
    features: str = DEFAULT_FEATURES  # the front end (atst_jax.features): sample rate, frames, values

    def __post_init__(self):
        if self.features not in feature_sets.FEATURE_SETS:
            raise PrepareError(
                f"--features must be one of {sorted(feature_sets.FEATURE_SETS)}, got {self.features!r}"
            )
        if self.long not in ("split", "crop"):
            raise PrepareError(f"--long must be split or crop, got {self.long!r}")
        if not self.clip_seconds > 0 or self.min_tail_seconds < 0:
            raise PrepareError("--clip_seconds must be > 0 and --min_tail_seconds >= 0")
        if self.compression not in records.WRITER_OPTIONS:
            raise PrepareError(f"--compression must be one of {sorted(records.WRITER_OPTIONS)}")


@dataclasses.dataclass(frozen=True, slots=True)  # slots: AudioSet plans hold ~2M of these
class Item:
    """One input file: path relative to the audio dir, clip id, class indices, optional strong events."""

    file: str
    id: str
    labels: tuple[int, ...] = ()
    events: tuple[tuple[float, float, int], ...] | None = None


@dataclasses.dataclass
class Plan:
    """What to build: the ordered files, the vocabulary, and what was dropped while listing the inputs."""

    kind: str
    audio_dir: str
    items: list[Item]
    classes: list[str]
    class_ids: list[str]
    strong: bool = False
    skipped: list[dict] = dataclasses.field(default_factory=list)


# ======================================================================================================
# Reading the inputs (AudioSet CSV, DCASE TSV, folders)
# ======================================================================================================


def _audio_files(audio_dir: str) -> list[str]:
    """Relative POSIX paths of every entry with an audio extension under `audio_dir`, sorted.

    Directories and broken links with an audio extension are listed too (and not descended), so that they
    are reported as unusable instead of silently ignored. Hidden entries (`.x`, e.g. macOS `._x.wav`
    resource forks, our own temp files) are skipped. Symlinked directories are not followed (no cycles).
    """
    if not os.path.isdir(audio_dir):
        raise PrepareError(f"audio dir {audio_dir} does not exist or is not a directory")
    out = []
    for root, dirs, files in os.walk(audio_dir):
        rel_root = os.path.relpath(root, audio_dir)
        keep = []
        for d in dirs:
            if d.startswith("."):
                continue
            if os.path.splitext(d)[1].lower() in AUDIO_EXTENSIONS:
                out.append(os.path.normpath(os.path.join(rel_root, d)))
            else:
                keep.append(d)
        dirs[:] = keep
        out += [
            os.path.normpath(os.path.join(rel_root, f))
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in AUDIO_EXTENSIONS
        ]
    return sorted(p.replace(os.sep, "/") for p in out)


def read_class_labels(path: str) -> tuple[list[str], list[str]]:
    """`class_labels_indices.csv` → (mids, display names), ordered by index. Indices must be 0..C-1."""
    rows: dict[int, tuple[str, str, int]] = {}
    header = None
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [h.strip() for h in row]
                if not {"index", "mid", "display_name"} <= set(header):
                    raise PrepareError(f"{path}:{lineno}: header must name index,mid,display_name; got {row}")
                continue
            if len(row) != len(header):
                raise PrepareError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
            d = dict(zip(header, (x.strip() for x in row), strict=True))
            try:
                index = int(d["index"])
            except ValueError:
                raise PrepareError(f"{path}:{lineno}: index {d['index']!r} is not an integer") from None
            if not d["mid"]:
                raise PrepareError(f"{path}:{lineno}: empty mid")
            if index in rows:
                raise PrepareError(f"{path}:{lineno}: index {index} repeats line {rows[index][2]}")
            rows[index] = (d["mid"], d["display_name"], lineno)
    if not rows:
        raise PrepareError(f"{path}: no classes")
    if set(rows) != set(range(len(rows))):
        raise PrepareError(f"{path}: indices must be 0..{len(rows) - 1} without gaps")
    mids = [rows[i][0] for i in range(len(rows))]
    if len(set(mids)) != len(mids):
        raise PrepareError(f"{path}: a mid appears twice")
    return mids, [rows[i][1] for i in range(len(rows))]


def read_audioset_segments(path: str) -> list[tuple[str, float, float, list[str], int]]:
    """AudioSet segment CSV → [(YTID, start, end, [mids], line number)], in file order. Every malformed line
    is reported, in one error."""
    out, bad = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                out.append(_segment_row(path, lineno, line))
            except PrepareError as e:
                bad.append(str(e))
    _raise_all(bad, f"malformed line(s) in {path}")
    return out


def _segment_row(path: str, lineno: int, line: str) -> tuple[str, float, float, list[str], int]:
    try:
        # skipinitialspace: the real files put a space after each comma, before the quoted labels.
        (fields,) = list(csv.reader([line], skipinitialspace=True, strict=True))
    except (csv.Error, ValueError) as e:
        raise PrepareError(f"{path}:{lineno}: unparsable CSV line ({e})") from None
    if len(fields) != 4:
        raise PrepareError(
            f'{path}:{lineno}: expected 4 fields (YTID, start_seconds, end_seconds, "labels"), got {len(fields)}'
        )
    ytid = fields[0].strip()
    if not ytid:
        raise PrepareError(f"{path}:{lineno}: empty YTID")
    try:
        start, end = float(fields[1]), float(fields[2])
    except ValueError:
        raise PrepareError(
            f"{path}:{lineno}: start/end {fields[1]!r}/{fields[2]!r} are not numbers"
        ) from None
    mids = [m.strip() for m in fields[3].split(",") if m.strip()]
    return ytid, start, end, mids, lineno


_SEGMENT_SUFFIX = re.compile(r"^(.+)_(-?\d+(?:\.\d*)?)_(-?\d+(?:\.\d*)?)$")


def _index_by_stem(paths: Iterable[str]) -> dict[str, list[tuple[str, float | None]]]:
    """stem → [(path, segment start or None)]; `YTID_30.000_40.000.wav` is indexed under `YTID` too."""
    index: dict[str, list[tuple[str, float | None]]] = {}
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        index.setdefault(stem, []).append((p, None))
        m = _SEGMENT_SUFFIX.match(stem)
        if m:
            index.setdefault(m.group(1), []).append((p, float(m.group(2))))
    return index


def _find_segment(index, ytid: str, start: float) -> str | None:
    """The audio file of a segment: exact `YTID.ext` first, then `YTID_<start>_<end>.ext` (same start when
    there are several), each also with the `Y` prefix some download scripts add."""
    for key in (ytid, "Y" + ytid):
        cands = index.get(key, [])
        exact = [p for p, s in cands if s is None and os.path.splitext(os.path.basename(p))[0] == key]
        if exact:
            return exact[0]
        suffixed = [(p, s) for p, s in cands if s is not None]
        same_start = [p for p, s in suffixed if abs(s - start) < 1e-3]
        if same_start:
            return same_start[0]
        if len(suffixed) == 1:
            return suffixed[0][0]
    return None


def plan_audioset(
    csv_paths: Sequence[str], labels_csv: str, audio_dir: str, *, unknown_labels: str = "skip"
) -> Plan:
    """``unknown_labels``: a segment with a label missing from ``labels_csv`` is skipped and reported per clip
    (``"skip"``), or every such segment is listed in one error (``"error"``)."""
    mids, names = read_class_labels(labels_csv)
    mid_index = {m: i for i, m in enumerate(mids)}
    index = _index_by_stem(_audio_files(audio_dir))
    items, skipped, seen, bad = [], [], {}, []
    for path in csv_paths:
        for ytid, start, _end, seg_mids, lineno in read_audioset_segments(path):
            unknown = [m for m in seg_mids if m not in mid_index]
            if unknown:
                reason = f"{path}:{lineno}: label(s) {unknown} not in {labels_csv}"
                if unknown_labels == "error":
                    bad.append(reason)
                else:
                    skipped.append({"file": ytid, "reason": reason})
                continue
            where = f"{path}:{lineno}"
            audio_file = _find_segment(index, ytid, start)
            if audio_file is None:
                skipped.append(
                    {"file": ytid, "reason": f"{where}: no audio file for this YTID in {audio_dir}"}
                )
                continue
            if audio_file in seen:
                skipped.append({"file": audio_file, "reason": f"{where}: duplicate of {seen[audio_file]}"})
                continue
            seen[audio_file] = where
            labels = tuple(sorted({mid_index[m] for m in seg_mids}))
            items.append(Item(audio_file, ytid, labels))
    _raise_all(bad, "segment(s) with unknown labels (--unknown_labels skip drops them instead)")
    return Plan("audioset", audio_dir, _unique_ids(items), names, mids, skipped=skipped)


def _unique_ids(items: list[Item]) -> list[Item]:
    """One id per input: files whose ids would collide (``x.wav`` and ``x.flac``; one YTID with two audio
    files) are named by their whole relative path, extension included."""
    counts = collections.Counter(it.id for it in items)
    return [dataclasses.replace(it, id=it.file) if counts[it.id] > 1 else it for it in items]


def _raise_all(problems: list[str], what: str, shown: int = 10) -> None:
    """One ``PrepareError`` listing every bad input row (the first ``shown`` of them), so a malformed file is
    fixed in one pass instead of one row per run."""
    if problems:
        more = f"; ... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise PrepareError(f"{len(problems)} {what}: " + "; ".join(problems[:shown]) + more)


def _read_classes_file(path: str) -> list[str]:
    """A vocabulary file: a labels.json written by this tool, or one class name per line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            return [str(c) for c in json.loads(text)["classes"]]
        except (ValueError, KeyError, TypeError) as e:
            raise PrepareError(f"{path}: not a labels.json with a 'classes' list ({e})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_dcase_tsv(path: str) -> tuple[bool, list[tuple[str, Any, int]]]:
    """DCASE TSV → (strong?, [(filename, labels or event, line number)]).

    Weak rows give a list of label names; strong rows an (onset, offset, label) tuple, or None for a clip
    listed without events (empty onset, offset and label).
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise PrepareError(f"{path}: empty file, expected a header line")
    head_no, head = numbered[0]
    cols = [c.strip() for c in head.split("\t")]
    if {"filename", "onset", "offset", "event_label"} <= set(cols):
        strong = True
    elif {"filename", "event_labels"} <= set(cols):
        strong = False
    else:
        raise PrepareError(
            f"{path}:{head_no}: header must be filename<TAB>event_labels (weak) or "
            f"filename<TAB>onset<TAB>offset<TAB>event_label (strong); got {cols}"
        )
    col = {c: i for i, c in enumerate(cols)}
    rows, bad = [], []
    for lineno, line in numbered[1:]:
        try:
            rows.append(_dcase_row(path, lineno, line, cols, col, strong))
        except PrepareError as e:
            bad.append(str(e))
    _raise_all(bad, f"malformed row(s) in {path}")
    return strong, rows


def _dcase_row(path: str, lineno: int, line: str, cols: list[str], col: dict[str, int], strong: bool):
    fields = [x.strip() for x in line.split("\t")]
    if len(fields) != len(cols):
        raise PrepareError(f"{path}:{lineno}: expected {len(cols)} tab-separated fields, got {len(fields)}")
    filename = fields[col["filename"]]
    if not filename:
        raise PrepareError(f"{path}:{lineno}: empty filename")
    if not strong:
        return filename, [x.strip() for x in fields[col["event_labels"]].split(",") if x.strip()], lineno
    on_s, off_s, label = fields[col["onset"]], fields[col["offset"]], fields[col["event_label"]]
    if not (on_s or off_s or label):
        return filename, None, lineno
    try:
        onset, offset = float(on_s), float(off_s)
    except ValueError:
        raise PrepareError(f"{path}:{lineno}: onset/offset {on_s!r}/{off_s!r} are not numbers") from None
    if not (np.isfinite(onset) and np.isfinite(offset) and 0.0 <= onset <= offset):
        raise PrepareError(f"{path}:{lineno}: need 0 <= onset <= offset, got {onset} / {offset}")
    if not label:
        raise PrepareError(f"{path}:{lineno}: empty event_label")
    return filename, (onset, offset, label), lineno


def plan_dcase(tsv: str, audio_dir: str, classes: Sequence[str] | None = None) -> Plan:
    strong, rows = read_dcase_tsv(tsv)
    if classes is None:
        names = set()
        for _f, value, _n in rows:
            if strong and value is not None:
                names.add(value[2])
            elif not strong:
                names.update(value)
        classes = sorted(names)
    classes = list(classes)
    class_index = {c: i for i, c in enumerate(classes)}

    bad = []

    def lookup(label, lineno):
        if label not in class_index:
            bad.append(f"{tsv}:{lineno}: label {label!r} is not in the class list")
            return -1
        return class_index[label]

    per_file: dict[str, list] = {}  # insertion order = first appearance in the TSV
    for filename, value, lineno in rows:
        acc = per_file.setdefault(filename, [])
        if strong and value is not None:
            acc.append((value[0], value[1], lookup(value[2], lineno)))
        elif not strong:
            acc += [lookup(v, lineno) for v in value]
    _raise_all(bad, "row(s) with labels outside the class list")
    items = []
    for filename, acc in per_file.items():
        clip_id = os.path.splitext(filename)[0]
        if strong:
            items.append(Item(filename, clip_id, tuple(sorted({e[2] for e in acc})), tuple(acc)))
        else:
            items.append(Item(filename, clip_id, tuple(sorted(set(acc)))))
    return Plan("dcase", audio_dir, _unique_ids(items), classes, list(classes), strong=strong)


def plan_folder(audio_dir: str, labels_from_subdirs: bool = False) -> Plan:
    files = _audio_files(audio_dir)
    skipped = []
    if labels_from_subdirs:
        classes = sorted({f.split("/", 1)[0] for f in files if "/" in f})
        class_index = {c: i for i, c in enumerate(classes)}
        items = []
        for f in files:
            if "/" not in f:
                skipped.append({"file": f, "reason": "not inside a class sub-folder (--labels_from_subdirs)"})
                continue
            items.append(Item(f, os.path.splitext(f)[0], (class_index[f.split("/", 1)[0]],)))
    else:
        classes, items = [], [Item(f, os.path.splitext(f)[0]) for f in files]
    return Plan("folder", audio_dir, _unique_ids(items), classes, list(classes), skipped=skipped)


# ======================================================================================================
# One file → records (runs in the worker processes)
# ======================================================================================================


def clip_ranges(
    num_samples: int, options: Options, sample_rate: int = audio.SAMPLE_RATE
) -> list[tuple[int, int]]:
    """Sample ranges of the clips cut from a wave of `num_samples` (see the module docstring)."""
    clip = max(1, int(round(options.clip_seconds * sample_rate)))
    if num_samples <= clip:
        return [(0, num_samples)]
    if options.long == "crop":
        return [(0, clip)]
    ranges = [(s, min(s + clip, num_samples)) for s in range(0, num_samples, clip)]
    if ranges[-1][1] - ranges[-1][0] < options.min_tail_seconds * sample_rate:
        ranges.pop()
    return ranges


def _events_in(events, start_s: float, stop_s: float, whole: bool) -> np.ndarray:
    """Events of the clip [start_s, stop_s), relative to its start. A clip that is the whole file keeps the
    events exactly as annotated (so they round-trip); pieces keep the overlapping part of each event."""
    if whole:
        return np.asarray(events, np.float32).reshape(-1, 3)
    kept = [
        (max(on, start_s) - start_s, min(off, stop_s) - start_s, c)
        for on, off, c in events
        if on < stop_s and (off > start_s or on == off >= start_s)
    ]
    return np.asarray(kept, np.float32).reshape(-1, 3)


def _reason(error: Exception, path: str) -> str:
    """The message of an AudioError without its leading `path: ` (the report has a separate file field)."""
    message = str(error)
    return message[len(path) + 2 :] if message.startswith(f"{path}: ") else message


def process_item(item: Item, audio_dir: str, options: Options) -> tuple[list[bytes], str | None]:
    """One file → (encoded records, None), or ([], reason) when it cannot be used. Never raises for bad
    input: any exception from decoding is a reason, because one odd file must not stop a million-file run."""
    path = os.path.join(audio_dir, item.file)
    if os.path.islink(path) and not os.path.exists(path):
        return [], f"broken symbolic link (to {os.readlink(path)})"
    try:
        fs = feature_sets.get(options.features)
        sr = fs.sample_rate  # decoded and resampled to the feature set's rate; pieces and events in seconds
        wave = audio.load_audio(path, sr)
        ranges = clip_ranges(len(wave), options, sr)
        out = []
        for start, stop in ranges:
            mel = fs.compute(wave[start:stop])  # atst_logmel64: audio.log_mel_db_fast
            ex: dict[str, Any] = {
                "mel": mel.astype(np.float16),
                "length": mel.shape[1],
                "id": item.id if len(ranges) == 1 else f"{item.id}@{start / sr:g}",
                "labels": np.asarray(item.labels, np.int32),
            }
            if item.events is not None:
                whole = (start, stop) == (0, len(wave))
                events = _events_in(item.events, start / sr, stop / sr, whole)
                ex["events"] = events
                # A piece's labels are the classes of its own events; the whole file keeps all of them.
                if not whole:
                    ex["labels"] = np.unique(events[:, 2].astype(np.int32))
            out.append(records.encode_example(ex))
        return out, None
    except audio.AudioError as e:
        return [], _reason(e, path)
    except Exception as e:  # noqa: BLE001 (deliberately broad, see docstring)
        return [], f"unexpected {type(e).__name__}: {e}"


def _init_worker() -> None:
    # One BLAS thread per worker: the workers already use every core, and oversubscribed BLAS threads spin.
    # Ctrl-C goes to the parent only, which then shuts the pool down (no traceback per worker).
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_job(job: tuple[Item, str, Options]) -> tuple[list[bytes], str | None]:
    return process_item(*job)


def _ordered_map(jobs: Iterable, workers: int, fn=_process_job) -> Iterator[tuple[list[bytes], str | None]]:
    """`fn` (default `_process_job`; module-level, so it pickles) over `jobs`, results in input order, in
    `workers` processes (0: in this process).

    At most 4 jobs per worker are in flight, so memory stays bounded however long the input. If a worker
    process dies (a decoder crashing on a hostile file), the pool is rebuilt and the unfinished jobs are rerun
    one at a time, so the file that kills a worker again is identified and reported instead of stopping the
    run.
    """
    if workers <= 0:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # the same single-threaded BLAS as the workers: identical bytes
            for job in jobs:
                yield fn(job)
        return

    # spawn, not fork: the caller may run JAX (threads), and forking a threaded process can deadlock.
    ctx = multiprocessing.get_context("spawn")
    pending = iter(jobs)
    window: collections.deque = collections.deque()  # (job, future, isolated?)
    careful = 0  # jobs still to run one at a time after a crash
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
    try:
        while True:
            limit = 1 if careful else 4 * workers
            while len(window) < limit:
                job = next(pending, _DONE)
                if job is _DONE:
                    break
                try:
                    future = executor.submit(fn, job)
                except concurrent.futures.process.BrokenProcessPool as e:
                    # The pool broke after the last result was collected: handled like a crash below.
                    future = concurrent.futures.Future()
                    future.set_exception(e)
                window.append((job, future, careful > 0))
                careful = max(0, careful - 1)
            if not window:
                return
            job, future, isolated = window.popleft()
            try:
                result = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                executor.shutdown(wait=False, cancel_futures=True)
                executor = concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=ctx, initializer=_init_worker
                )
                if isolated:  # it ran alone, so it is the culprit
                    result = ([], "worker process died while decoding (a crashing decoder?)")
                else:  # rerun it and everything after it that was in flight, one by one
                    retry = [job] + [j for j, _f, _i in window]
                    window.clear()
                    careful = len(retry)
                    pending = _chain(retry, pending)
                    continue
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


_DONE = object()


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


# ======================================================================================================
# Shards, markers, metadata
# ======================================================================================================


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _fingerprint(plan: Plan, options: Options, name: str, split: str, items: Sequence[Item]) -> str:
    """Identifies what a shard holds: its files and labels, the options and the code versions. A finished
    shard is reused only if the rerun would write the same thing."""
    opts = dataclasses.asdict(options)
    if opts["features"] == DEFAULT_FEATURES:
        # Left out for the default, so shards prepared before feature sets were an option are still reused;
        # any other feature set changes every fingerprint.
        del opts["features"]
    blob = json.dumps(
        {
            "format": records.FORMAT_VERSION,
            "prepare": PREPARE_VERSION,
            "options": opts,
            "name": name,
            "split": split,
            "strong": plan.strong,
            "items": [[it.file, it.id, list(it.labels), it.events] for it in items],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _shard_bounds(num_items: int, files_per_shard: int, shards: int | None) -> list[int]:
    """Item index boundaries of the output shards: shard j = items[b[j]:b[j+1]] (contiguous, in order)."""
    if shards is None:
        if files_per_shard < 1:
            raise PrepareError("--files_per_shard must be >= 1")
        shards = max(1, -(-num_items // files_per_shard))
    if shards < 1:
        raise PrepareError("the number of output shards must be >= 1")
    return [j * num_items // shards for j in range(shards + 1)]


def _read_marker(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _marker_ok(marker: dict | None, fingerprint: str, shard_path: str) -> bool:
    return (
        marker is not None
        and marker.get("fingerprint") == fingerprint
        and os.path.isfile(shard_path)
        and os.path.getsize(shard_path) == marker.get("bytes")
    )


def build(
    plan: Plan,
    out_dir: str,
    *,
    name: str | None = None,
    split: str = "train",
    options: Options | None = None,
    workers: int | None = None,
    files_per_shard: int = 1024,
    shards: int | None = None,
    num_jobs: int = 1,
    job_index: int = 0,
    progress: bool = True,
    version: str = "1.0.0",
) -> dict[str, Any]:
    """Writes (this job's part of) the dataset of `plan` into `out_dir`; see the module docstring.

    `shards` fixes the number of output shards (default: ceil(files / files_per_shard)). `workers`: decoding
    processes (None: all cores; 0: in this process). Returns {"complete": all shards done and metadata
    written, "written": clips (whole dataset when complete, else this job's), "skipped": [...], "shards":
    this job's shard paths, "built": shard indices written now, "reused": indices skipped as done}. Raises PrepareError when
    nothing usable was found.
    """
    options = options or Options()
    name = name or plan.kind
    try:
        records.check_name(name, split)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    if not 0 <= job_index < num_jobs:
        raise PrepareError(f"--shard_index {job_index} must be in [0, --num_shards={num_jobs})")
    if not plan.items:
        reasons = (
            f" ({len(plan.skipped)} input(s) skipped, e.g. {plan.skipped[0]['reason']})"
            if plan.skipped
            else ""
        )
        raise PrepareError(f"no usable audio: no input files found in {plan.audio_dir}{reasons}")
    workers = _cpu_count() if workers is None else workers

    bounds = _shard_bounds(len(plan.items), files_per_shard, shards)
    num_shards = len(bounds) - 1
    os.makedirs(os.path.join(out_dir, _PROGRESS_DIR), exist_ok=True)
    paths = [os.path.join(out_dir, records.shard_name(name, split, j, num_shards)) for j in range(num_shards)]
    markers = [os.path.join(out_dir, _PROGRESS_DIR, os.path.basename(p) + ".json") for p in paths]
    prints = [
        _fingerprint(plan, options, name, split, plan.items[bounds[j] : bounds[j + 1]])
        for j in range(num_shards)
    ]

    mine = [j for j in range(num_shards) if j % num_jobs == job_index]
    todo = [j for j in mine if not _marker_ok(_read_marker(markers[j]), prints[j], paths[j])]
    reused = [j for j in mine if j not in todo]
    info_path = os.path.join(out_dir, "dataset_info.json")
    if todo:
        # The dataset is about to change: no TFDS reader may open the old metadata over new shards, and no
        # reader may take the old manifest for the new clips.
        for stale in (info_path, os.path.join(out_dir, lineage.MANIFEST)):
            if os.path.exists(stale):
                os.remove(stale)

    total_files = sum(bounds[j + 1] - bounds[j] for j in todo)
    skipped_now = 0
    bar = None
    if progress and total_files:
        from tqdm import tqdm

        bar = tqdm(total=total_files, unit="file", desc=f"prepare {name}-{split}", dynamic_ncols=True)

    # Each shard is built under its lock (_progress/<shard>.lock): a second prepare into the same OUT takes
    # the shards nobody holds instead of building them twice, and a temporary shard whose lock is free was
    # left by a killed run (removed when its shard is claimed).
    locks = _ShardLocks(out_dir, paths)
    for j in reused:
        locks.sweep(j)
    built, busy = [], []  # written by this run / held by another prepare process
    queued = collections.deque()  # (shard, item, last item of its shard?) per job, in submission order

    def start(j):
        tmp = os.path.join(out_dir, f".{os.path.basename(paths[j])}.tmp-{os.getpid()}")
        return tmp, ArrayRecordWriter(tmp, records.WRITER_OPTIONS[options.compression])

    fs = feature_sets.get(options.features)
    seconds_per_frame = fs.hop_length / fs.sample_rate

    def finish(j, tmp, writer, count, skipped, manifest):
        if not writer.ok():
            raise OSError(f"ArrayRecordWriter failed on {tmp}")
        writer.close()
        os.replace(tmp, paths[j])
        # The marker comes last: a shard without one (crash right after the rename) is simply rebuilt.
        _atomic_write_json(
            markers[j],
            {
                "fingerprint": prints[j],
                "records": count,
                "bytes": os.path.getsize(paths[j]),
                "skipped": skipped,
                # This shard's manifest lines (atst_jax.data.lineage), kept with the marker so that a resumed
                # or multi-job prepare writes the same manifest as one uninterrupted run.
                "manifest": manifest,
            },
        )
        locks.release(j)
        built.append(j)

    def jobs():  # claims shards as the workers need more files, so concurrent runs split the shards
        for j in todo:
            items = plan.items[bounds[j] : bounds[j + 1]]
            if not locks.claim(j):
                busy.append(j)
                if bar is not None:
                    bar.total -= len(items)
                    bar.refresh()
                continue
            if _marker_ok(_read_marker(markers[j]), prints[j], paths[j]):  # finished by another run meanwhile
                locks.release(j)
                reused.append(j)
                continue
            if not items:  # more shards than files
                finish(j, *start(j), 0, [], [])
                continue
            for k, it in enumerate(items):
                queued.append((j, it, k == len(items) - 1))
                yield it, plan.audio_dir, options

    results = _ordered_map(jobs(), min(workers, total_files))
    tmp = writer = None
    try:
        for recs, reason in results:
            j, item, last = queued.popleft()
            if writer is None:
                (tmp, writer), count, skipped, manifest = start(j), 0, [], []
            for r in recs:
                writer.write(r)
                manifest.append(lineage.entry(r, item.file, seconds_per_frame))
            count += len(recs)
            if reason is not None:
                skipped.append({"file": item.file, "reason": reason})
                skipped_now += 1
            if bar is not None:
                bar.update(1)
                if reason is not None:
                    bar.set_postfix(skipped=skipped_now, refresh=False)
            if last:
                finish(j, tmp, writer, count, skipped, manifest)
                tmp = writer = None
    except BaseException:
        if writer is not None:
            writer.close()
            os.remove(tmp)
        raise
    finally:
        results.close()
        locks.close()
        if bar is not None:
            bar.close()
    built.sort()
    reused.sort()
    todo = built

    summary = _finalize(plan, out_dir, name, split, options, paths, markers, prints, version)
    if summary is None:
        done = sum(_marker_ok(_read_marker(m), f, p) for m, f, p in zip(markers, prints, paths, strict=True))
        mine_skipped = [s for j in mine for s in (_read_marker(markers[j]) or {}).get("skipped", [])]
        return {
            "complete": False,
            "written": sum((_read_marker(markers[j]) or {}).get("records", 0) for j in mine),
            "skipped": mine_skipped,
            "shards": [paths[j] for j in mine],
            "built": todo,
            "reused": reused,
            "busy": busy,
            "shards_done": done,
            "num_shards": num_shards,
        }
    summary.update(
        shards=[paths[j] for j in mine],
        built=todo,
        reused=reused,
        busy=busy,
        shards_done=num_shards,
        num_shards=num_shards,
    )
    return summary


class _ShardLocks:
    """One advisory lock per output shard (``_progress/<shard>.lock``, ``flock``; released by the kernel when
    the process dies). Whoever holds a shard's lock builds it; its temporary files from anyone else are
    orphans of a killed run."""

    def __init__(self, out_dir: str, paths: Sequence[str]):
        self.out_dir, self.paths, self.held = out_dir, paths, {}

    def claim(self, j: int) -> bool:
        import fcntl

        base = os.path.basename(self.paths[j])
        fd = os.open(os.path.join(self.out_dir, _PROGRESS_DIR, base + ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another prepare process
            os.close(fd)
            return False
        self.held[j] = fd
        # We hold the lock, so no live process is writing this shard: its temporary files are orphans.
        for folder, prefix in (
            (self.out_dir, f".{base}.tmp-"),
            (os.path.join(self.out_dir, _PROGRESS_DIR), f".{base}.json.tmp-"),
        ):
            for filename in os.listdir(folder):
                if filename.startswith(prefix):
                    os.remove(os.path.join(folder, filename))
        return True

    def release(self, j: int) -> None:
        os.close(self.held.pop(j))

    def sweep(self, j: int) -> None:
        """Removes a finished shard's orphaned temporary files, if nobody holds its lock."""
        if self.claim(j):
            self.release(j)

    def close(self) -> None:
        for j in list(self.held):
            self.release(j)


def _finalize(plan, out_dir, name, split, options, paths, markers, prints, version) -> dict | None:
    """Once every shard is done: report.json, labels.json, TFDS metadata, and cleanup of stale shards.
    Returns None while shards of other jobs are missing."""
    loaded = [_read_marker(m) for m in markers]
    if not all(_marker_ok(m, f, p) for m, f, p in zip(loaded, prints, paths, strict=True)):
        return None
    written = sum(m["records"] for m in loaded)
    skipped = list(plan.skipped) + [s for m in loaded for s in m["skipped"]]
    _atomic_write_json(os.path.join(out_dir, "report.json"), {"written": written, "skipped": skipped})
    if written == 0:
        example = f", e.g. {skipped[0]['file']}: {skipped[0]['reason']}" if skipped else ""
        raise PrepareError(
            f"no usable audio: all {len(plan.items)} file(s) were skipped{example} "
            f"(see {os.path.join(out_dir, 'report.json')})"
        )
    # Shards and markers of an earlier build with another shard count would make the directory ambiguous.
    keep = {os.path.basename(p) for p in paths}
    for filename in os.listdir(out_dir):
        parsed = records.parse_shard_name(filename)
        if parsed and parsed[:2] == (name, split) and filename not in keep:
            os.remove(os.path.join(out_dir, filename))
    progress_dir = os.path.join(out_dir, _PROGRESS_DIR)
    for filename in os.listdir(progress_dir):
        if filename.endswith(".json") and filename[: -len(".json")] not in keep:
            os.remove(os.path.join(progress_dir, filename))

    fs = feature_sets.get(options.features)
    entries = []
    for m, path in zip(loaded, paths, strict=True):
        # A shard reused from a prepare that kept no manifest lines: recomputed from its records (no sources).
        entries += (
            m["manifest"]
            if "manifest" in m
            else lineage.entries_from_records([path], fs.hop_length / fs.sample_rate)
        )
    fingerprint = lineage.write_manifest(out_dir, entries)
    _atomic_write_json(
        os.path.join(out_dir, "labels.json"),
        {
            "num_classes": len(plan.classes),
            "classes": plan.classes,
            "ids": plan.class_ids,
            "strong": plan.strong,
        },
    )
    fs = feature_sets.get(options.features)
    records.write_tfds_metadata(
        out_dir,
        name=name,
        split=split,
        shard_lengths=[m["records"] for m in loaded],
        with_events=plan.strong,
        version=version,
        description=(
            f"{fs.name} spectrograms (float16, {fs.n_mels} mels, {fs.sample_rate} Hz, hop {fs.hop_length}; "
            f"{fs.description}) prepared by atst_jax.data.prepare from a {plan.kind} collection. "
            "labels = class indices into labels.json."
        ),
        metadata={
            # Which front end made the records (atst_jax.features): the trainer refuses a method or encoder
            # that expects other features, and the pipeline takes the normalisation from it.
            "features": fs.name,
            "n_mels": fs.n_mels,
            "sample_rate": fs.sample_rate,
            "hop_length": fs.hop_length,
            "options": dataclasses.asdict(options),
            "classes": plan.classes,
        },
    )
    return {"complete": True, "written": written, "skipped": skipped, "fingerprint": fingerprint}


# ======================================================================================================
# CLI
# ======================================================================================================


def _default_name(out_dir: str, kind: str) -> tuple[str, str]:
    """(name, version): `.../NAME/1.2.3` gives NAME and that version, so the directory also works with
    `tfds.data_source(NAME, data_dir=...)`; anything else gives the input kind and 1.0.0."""
    out = os.path.abspath(out_dir)
    base, parent = os.path.basename(out), os.path.basename(os.path.dirname(out))
    if re.fullmatch(r"\d+\.\d+\.\d+", base) and re.fullmatch(r"[a-z][a-z0-9_]*", parent):
        return parent, base
    return kind, "1.0.0"


def _parser() -> argparse.ArgumentParser:
    from atst_jax.cli import ArgumentParser

    p = ArgumentParser(
        prog="python -m atst_jax.data.prepare",
        description="Prepare log-mel ArrayRecord datasets (TFDS-readable) from audio files.",
        epilog="See the module docstring (atst_jax/data/prepare.py) for formats and cluster use.",
    )
    sub = p.add_subparsers(dest="kind", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--audio_dir", required=True, help="root of the audio files")
    common.add_argument("--out", required=True, help="output directory")
    common.add_argument(
        "--name", help="TFDS dataset name (default: OUT's parent if OUT is NAME/x.y.z, else the kind)"
    )
    common.add_argument("--split", default="train", help="split name (default train)")
    common.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: all cores; 0: none)"
    )
    common.add_argument("--files_per_shard", type=int, default=1024, help="input files per output shard")
    common.add_argument(
        "--output_shards", type=int, default=None, help="exact number of output shards instead"
    )
    common.add_argument(
        "--long", choices=("split", "crop"), default="split", help="long files: split or crop"
    )
    common.add_argument("--clip_seconds", type=float, default=10.0, help="longest clip (default 10)")
    common.add_argument("--min_tail_seconds", type=float, default=1.0, help="drop shorter last pieces")
    common.add_argument("--compression", choices=sorted(records.WRITER_OPTIONS), default="none")
    common.add_argument(
        "--features",
        choices=sorted(feature_sets.FEATURE_SETS),
        default=DEFAULT_FEATURES,
        help=f"front end of the records (atst_jax.features; default {DEFAULT_FEATURES})",
    )
    common.add_argument("--num_shards", type=int, default=1, help="K: number of jobs sharing the work")
    common.add_argument("--shard_index", type=int, default=0, help="i: this job's index in [0, K)")
    common.add_argument("--no_progress", action="store_true", help="no progress bar")

    a = sub.add_parser("audioset", parents=[common], help="AudioSet segment CSVs + class_labels_indices.csv")
    a.add_argument("--csv", action="append", required=True, help="segments CSV (repeatable)")
    a.add_argument("--labels", required=True, help="class_labels_indices.csv")
    a.add_argument(
        "--unknown_labels",
        choices=("skip", "error"),
        default="skip",
        help="a segment with a label missing from --labels: skip the clip and report it (default), or stop",
    )
    d = sub.add_parser("dcase", parents=[common], help="DCASE weak or strong label TSV")
    d.add_argument("--tsv", required=True)
    d.add_argument("--classes", help="class list: one name per line, or a labels.json")
    f = sub.add_parser("folder", parents=[common], help="a folder of audio files")
    f.add_argument("--labels_from_subdirs", action="store_true", help="class = first sub-folder name")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = Options(
            args.long, args.clip_seconds, args.min_tail_seconds, args.compression, args.features
        )
        if args.kind == "audioset":
            plan = plan_audioset(args.csv, args.labels, args.audio_dir, unknown_labels=args.unknown_labels)
        elif args.kind == "dcase":
            classes = _read_classes_file(args.classes) if args.classes else None
            plan = plan_dcase(args.tsv, args.audio_dir, classes)
        else:
            plan = plan_folder(args.audio_dir, args.labels_from_subdirs)
        name, version = _default_name(args.out, args.kind)
        result = build(
            plan,
            args.out,
            name=args.name or name,
            split=args.split,
            options=options,
            workers=args.workers,
            files_per_shard=args.files_per_shard,
            shards=args.output_shards,
            num_jobs=args.num_shards,
            job_index=args.shard_index,
            progress=not args.no_progress,
            version=version,
        )
    except (PrepareError, OSError) as e:
        print("prepare: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, always
        return 2
    if result["complete"]:
        print(
            f"prepare: {result['written']} clips in {result['num_shards']} shard(s) at {args.out} "
            f"({len(result['built'])} built, {len(result['reused'])} reused); {len(result['skipped'])} input(s) "
            f"skipped, see {os.path.join(args.out, 'report.json')}; fingerprint {result['fingerprint']} "
            f"(clips listed in {os.path.join(args.out, lineage.MANIFEST)})"
        )
    else:
        print(
            f"prepare: job {args.shard_index}/{args.num_shards} done ({result['written']} clips); "
            f"{result['shards_done']}/{result['num_shards']} shards done overall: the job that finishes the last "
            "one writes the metadata"
            + (
                f" ({len(result['busy'])} shard(s) are being built by another prepare into {args.out})"
                if result.get("busy")
                else ""
            )
        )
    return 0


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
