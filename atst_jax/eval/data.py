"""Labelled data for evaluation: prepared datasets read into memory (``read_labelled``), their checks
(``check_sets``: labels present, one vocabulary, the encoder's feature set), the deterministic validation
hold-out, the task a label set implies, and the clip / per-step targets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from atst_jax.data import records
from atst_jax.errors import UserError


class EvalError(UserError):
    """A user error (bad path, bad data, bad option): the CLI prints it as one line and exits 2."""


@dataclasses.dataclass
class LabelledSet:
    """One prepared dataset, all in memory: stored spectrograms (valid frames only, float16), labels, events."""

    path: str
    ids: list[str]
    mels: list[np.ndarray]  # float16 [F, length]: stored values (not normalised)
    labels: list[np.ndarray]  # int class indices per clip
    events: list[np.ndarray] | None  # float32 [e, 3] (onset s, offset s, class) per clip; None if weak
    classes: list[str]
    features: str
    # SHA-256 of each clip's stored record (atst_jax.data.lineage): RESULTS.json's split fingerprints.
    digests: list[str] | None = None

    @property
    def fingerprint(self) -> str | None:
        """The lineage fingerprint of exactly these clips (a held-out part too), None if not hashed."""
        from atst_jax.data import lineage

        return None if self.digests is None else lineage.fingerprint(zip(self.ids, self.digests, strict=True))

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, keep: np.ndarray, path: str) -> LabelledSet:
        idx = np.flatnonzero(keep)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return LabelledSet(
            path,
            pick(self.ids),
            pick(self.mels),
            pick(self.labels),
            pick(self.events),
            self.classes,
            self.features,
            pick(self.digests),
        )


def read_labelled(path: str, what: str) -> LabelledSet:
    """A prepared dataset directory → :class:`LabelledSet` (``what``: the option naming it, for errors)."""
    if not os.path.isdir(path):
        raise EvalError(f"{what} {path}: no such directory")
    try:
        files = records.list_record_files(path)
        features = records.read_features(path)
    except (OSError, ValueError) as e:
        raise EvalError(f"{what} {path}: not a prepared dataset ({e})") from None
    labels_path = os.path.join(path, "labels.json")
    try:
        with open(labels_path) as f:
            meta = json.load(f)
        classes = [str(c) for c in meta["classes"]]
    except FileNotFoundError:
        raise EvalError(
            f"{what} {path}: no labels.json (prepare it from labelled data: AudioSet CSVs, a DCASE TSV, or "
            "folder --labels_from_subdirs)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalError(f"{what} {labels_path}: unreadable ({type(e).__name__}: {e})") from None
    if not classes:
        raise EvalError(f"{what} {path}: the dataset has no labels (labels.json lists no classes)")
    from atst_jax.data import lineage, pipeline

    source = pipeline.make_source(files)
    ids, mels, labels, events, digests = [], [], [], [], []
    strong = bool(meta.get("strong"))
    for i in range(len(source)):
        try:
            record = source[i]
            ex = records.decode_example(record)
        except ValueError as e:
            raise EvalError(f"{what} {path}: record {i}: {e}") from None
        ids.append(ex["id"])
        digests.append(lineage.content_hash(record))  # evaluate reads every record: hashing is cheap
        mels.append(np.array(ex["mel"][:, : ex["length"]], np.float16))  # a copy: the view pins the buffer
        labels.append(np.asarray(ex["labels"], np.int64))
        events.append(np.asarray(ex.get("events", np.zeros((0, 3), np.float32)), np.float32))
        if "events" not in ex:
            strong = False
    if not ids:
        raise EvalError(f"{what} {path}: the dataset holds no clips")
    if len(set(ids)) != len(ids):
        raise EvalError(f"{what} {path}: clip ids are not unique")
    bad = [c for lab in labels for c in lab if not 0 <= c < len(classes)]
    if bad:
        raise EvalError(
            f"{what} {path}: class index {bad[0]} outside the {len(classes)} classes of labels.json"
        )
    if not any(len(lab) for lab in labels) and not any(len(ev) for ev in events):
        raise EvalError(f"{what} {path}: the dataset has no labels (no clip has a class)")
    return LabelledSet(path, ids, mels, labels, events if strong else None, classes, features, digests)


def id_hash(clip_id: str) -> int:
    return int.from_bytes(hashlib.sha1(clip_id.encode("utf-8")).digest()[:8], "big")


def hold_out(train: LabelledSet, fraction: float) -> tuple[LabelledSet, LabelledSet]:
    """``(train, val)``: the ``fraction`` of clips with the smallest id hash (at least one) as validation."""
    if len(train) < 2:
        raise EvalError(f"--train {train.path}: {len(train)} clip(s): too few to hold out a validation split")
    n_val = min(len(train) - 1, max(1, round(fraction * len(train))))
    order = np.argsort([id_hash(i) for i in train.ids], kind="stable")
    val = np.zeros(len(train), bool)
    val[order[:n_val]] = True
    where = f"{train.path} (held out {n_val} of {len(train)} clips)"
    return train.subset(~val, train.path), train.subset(val, where)


def task_of(sets: list[LabelledSet], task: str) -> str:
    """The probe task (``clip_single``, ``clip_multi`` or ``sed``) for ``--task auto|clip|sed``."""
    strong = all(s.events is not None for s in sets)
    if task == "sed" or (task == "auto" and strong):
        if not strong:
            weak = [s.path for s in sets if s.events is None]
            raise EvalError(f"--task sed needs strong labels (events), but {weak[0]} has weak labels only")
        return "sed"
    single = all(len(lab) == 1 for s in sets for lab in s.labels)
    return "clip_single" if single else "clip_multi"


def check_sets(sets: dict[str, LabelledSet], features: str, n_mels: int) -> None:
    """Same vocabulary everywhere, and the encoder's feature set."""
    from atst_jax import features as feature_sets  # imports JAX; the rest of this module does not

    train = sets["--train"]
    for what, s in sets.items():
        if s.classes != train.classes:
            raise EvalError(
                f"{what} {s.path} has other classes than --train {train.path} "
                f"({len(s.classes)} vs {len(train.classes)}: prepare both with the same --classes)"
            )
        if s.features != features:
            fs = feature_sets.get(s.features)
            raise EvalError(
                f"{what} {s.path} was prepared with feature set {s.features!r} ({fs.description}), but the "
                f"encoder takes {features!r}: prepare it with --features {features}"
            )
    if feature_sets.get(features).n_mels != n_mels:
        raise EvalError(f"the encoder has {n_mels} mel bins but feature set {features!r} has another count")


def frame_targets(events: np.ndarray, steps: int, step_s: float, num_classes: int) -> np.ndarray:
    """float32 ``[steps, K]``: step j (``[j·step_s, (j+1)·step_s)``) is active for an event's class when the
    event covers at least half of it (onset and offset rounded to the nearest step boundary)."""
    y = np.zeros((steps, num_classes), np.float32)
    for onset, offset, c in np.asarray(events, np.float64).reshape(-1, 3):
        a = max(0, int(np.floor(onset / step_s + 0.5)))
        b = min(steps, int(np.floor(offset / step_s + 0.5)))
        if b > a:
            y[a:b, int(c)] = 1.0
    return y


def clip_targets(data: LabelledSet) -> np.ndarray:
    k = len(data.classes)
    y = np.zeros((len(data), k), np.float32)
    for i, lab in enumerate(data.labels):
        y[i, lab] = 1.0
    return y
