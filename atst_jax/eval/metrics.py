"""Evaluation metrics in pure NumPy (no JAX): average precision and mAP, clip accuracy, the median filter on
posteriors, frame-level F1, and the SED event metrics (PSDS1 / PSDS2 and the collar-based F1 through
``sed_scores_eval``).

Every metric is computed on its own (:class:`Guard`): one that fails is None in the metrics, with its error
in ``errors`` (``RESULTS.json``'s ``"errors"`` of the encoder), and never costs the others. Class names are
data: ``sed_scores_eval`` only ever sees the ids ``class0, class1, …`` (it splits names on a backslash and
asserts there is none), mapped back to the names in what it returns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

from atst_jax.eval.data import EvalError, LabelledSet, frame_targets

THRESHOLD = 0.5
# The PSDS scenarios of DCASE task 4 (2021-2023); alpha_st = 1 and max_efpr = 100 / hour in both.
PSDS1 = dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=None, alpha_ct=0.0, alpha_st=1.0)
PSDS2 = dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5, alpha_st=1.0)
MAX_EFPR = 100.0
COLLAR = dict(onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2)


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean of the precisions at each positive (ties in the
    scores ranked together, as scikit-learn's ``average_precision_score``); NaN without positives."""
    y = np.asarray(y, bool)
    pos = int(y.sum())
    if pos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(s, np.float64), kind="stable")
    s_sorted, y_sorted = np.asarray(s)[order], y[order]
    # The last index of every run of equal scores: a threshold admits a whole tie group at once.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last]
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0, tp]) / pos
    return float((precision * recall_gain).sum())


def mean_ap(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray]:
    """``(mAP over classes with positives, per-class AP [K] with NaN where a class has none)``."""
    ap = np.array([average_precision(y[:, j], s[:, j]) for j in range(y.shape[1])])
    return (float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")), ap


class Guard:
    """Runs each metric on its own: ``guard(name, fn, default)`` is ``fn()``, or ``default`` with the error
    kept in ``errors[name]`` (one line) when it raises, so a bug or a library's refusal in one metric (PSDS on
    a data set it does not handle, say) is reported beside the others instead of losing all of them.
    ``errors=None``: the error is a warning instead (callers that keep no error record)."""

    def __init__(self, errors: dict | None = None):
        self.errors = errors

    def __call__(self, name: str, fn: Callable, default=None):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - recorded, not swallowed: see the class docstring
            message = " ".join(f"{type(e).__name__}: {e}".split())
            if self.errors is None:
                warnings.warn(f"metric {name} failed: {message}", RuntimeWarning, stacklevel=2)
            else:
                self.errors[name] = message
            return default


def clip_metrics(
    y: np.ndarray, p: np.ndarray, task: str, classes: list[str], errors: dict | None = None
) -> tuple[dict, dict]:
    """``(metrics, per-class)`` for clip classification; a metric that fails is None, its error in
    ``errors`` (:class:`Guard`)."""
    guard = Guard(errors)
    k = len(classes)
    m, ap = guard("mAP", lambda: mean_ap(y, p), (None, np.full(k, np.nan)))
    if task == "clip_single":
        truth = y.argmax(1)
        accuracy = guard("accuracy", lambda: float((p.argmax(1) == truth).mean()))
        per_acc = guard(
            "accuracy_per_class",
            lambda: [
                float((p.argmax(1)[truth == j] == j).mean()) if (truth == j).any() else None for j in range(k)
            ],
            [None] * k,
        )
    else:
        accuracy = guard("accuracy", lambda: float(((p >= THRESHOLD) == (y > 0.5)).all(axis=1).mean()))
        per_acc = guard(
            "accuracy_per_class",
            lambda: [float(((p[:, j] >= THRESHOLD) == (y[:, j] > 0.5)).mean()) for j in range(k)],
            [None] * k,
        )
    per = {
        c: {"ap": json_num(ap[j]), "accuracy": per_acc[j], "test_positives": int(y[:, j].sum())}
        for j, c in enumerate(classes)
    }
    return {"accuracy": accuracy, "mAP": m}, per


def median_steps(seconds: float, step_s: float) -> int:
    """The median filter's length in time steps: ``seconds`` rounded to an odd count, at least 1."""
    return int(round(seconds / step_s)) // 2 * 2 + 1 if seconds > 0 else 1


def median_filter(p: np.ndarray, size: int) -> np.ndarray:
    """Median over ``size`` steps (odd) per class, edges padded with the nearest value."""
    if size <= 1 or len(p) == 0:
        return p
    import scipy.ndimage

    return scipy.ndimage.median_filter(p, size=(size, 1), mode="nearest")


def frame_f1(y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """``(macro F1 over classes with positives, per-class F1 [K], NaN without positives)`` at 0.5."""
    pred = p >= THRESHOLD
    truth = y > 0.5
    tp = (pred & truth).sum(0)
    fp = (pred & ~truth).sum(0)
    fn = (~pred & truth).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(truth.any(0), 2 * tp / (2 * tp + fp + fn), np.nan)
    return (float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")), f1


def import_sed_scores_eval():
    """The ``sed_scores_eval`` module, or an ``EvalError`` saying how to install it (``evaluate`` asks before
    any work on a SED task)."""
    try:
        with warnings.catch_warnings():  # dcase_util (under sed_eval) imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import sed_scores_eval
    except ImportError as e:
        raise EvalError(
            f"PSDS needs sed_scores_eval ({e}): pip install -r requirements.txt (sed_scores_eval==0.0.4, "
            "pandas<3, setuptools<82)"
        ) from None
    return sed_scores_eval


def event_metrics(
    scores: dict,
    ground_truth: dict,
    durations: dict,
    step_s: float,
    classes: list[str],
    errors: dict | None = None,
) -> dict:
    """PSDS1, PSDS2 and collar-based event F1 (``sed_scores_eval``) from per-clip posteriors ``[T, K]`` on a
    grid of ``step_s`` seconds, ground truth ``{id: [(onset, offset, class name), ...]}`` and durations (s).

    Over the classes with at least one test event (``sed_scores_eval`` refuses a class without any: its
    true-positive rate is undefined); the others are reported as None. With one such class, PSDS2 has no
    other class to count cross-triggers with: its cross-trigger term is 0 (the library cannot compute it
    for a single class). Each of the three is computed on its own (:class:`Guard`)."""
    guard = Guard(errors)
    per_none = {c: None for c in classes}
    none = dict(psds1=None, psds2=None, event_f1=None, event_f1_per_class=per_none)
    sse = guard("psds1", import_sed_scores_eval)
    if sse is None:  # not installed: the error is psds1's, and the other two cannot run either
        if errors is not None:
            errors["psds2"] = errors["event_f1"] = errors["psds1"]
        return none
    from sed_scores_eval.base_modules.scores import create_score_dataframe

    seen = {str(c) for cid in scores for _, _, c in ground_truth[cid]}
    present = [j for j, c in enumerate(classes) if c in seen]
    if not present:  # no event in the test set: PSDS is undefined
        return none
    # The library sees ids, never the names (see the module docstring).
    ids = {classes[j]: f"class{j}" for j in present}
    gt = {
        cid: [(float(a), float(b), ids[str(c)]) for a, b, c in ground_truth[cid] if str(c) in ids]
        for cid in scores
    }
    frames = {
        cid: create_score_dataframe(
            np.asarray(s, np.float64)[:, present], np.arange(len(s) + 1) * step_s, list(ids.values())
        )
        for cid, s in scores.items()
    }
    dur = {cid: float(durations[cid]) for cid in frames}

    def psds(settings):
        if len(present) == 1:
            settings = {**settings, "cttc_threshold": None, "alpha_ct": 0.0}
        value, *_ = sse.intersection_based.psds(
            scores=frames,
            ground_truth=gt,
            audio_durations=dur,
            max_efpr=MAX_EFPR,
            unit_of_time="hour",
            **settings,
        )
        return float(value)

    out = {"psds1": guard("psds1", lambda: psds(PSDS1)), "psds2": guard("psds2", lambda: psds(PSDS2))}
    f = guard(
        "event_f1",
        lambda: sse.collar_based.fscore(scores=frames, ground_truth=gt, threshold=THRESHOLD, **COLLAR)[0],
    )
    out["event_f1"] = None if f is None else json_num(f["macro_average"])
    out["event_f1_per_class"] = {
        c: (json_num(f[ids[c]]) if f is not None and c in ids else None) for c in classes
    }
    return out


def merge_events(events) -> list[tuple[float, float, str]]:
    """Events of one clip with those of a class that overlap or touch merged into one (``sed_scores_eval``
    refuses overlapping ground truth of a class; the union is what a frame-level view of the clip shows);
    empty events (offset <= onset) dropped. Sorted by class, then onset."""
    out = []
    for cls in sorted({c for _, _, c in events}):
        spans = sorted((a, b) for a, b, c in events if c == cls and b > a)
        for a, b in spans:
            if out and out[-1][2] == cls and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b), cls)
            else:
                out.append((a, b, cls))
    return out


def event_inputs(data: LabelledSet, posteriors: list[np.ndarray], step_s: float) -> tuple[dict, dict, dict]:
    """``(scores, ground truth, durations)`` by clip id, as the event metrics take them: each clip's
    posteriors ``[T, K]``, its events clipped to the ``T · step_s`` seconds scored (overlaps of a class
    merged), and that length. Clips with no scored step are left out."""
    scores, gt, durations = {}, {}, {}
    for cid, ev, p in zip(data.ids, data.events, posteriors, strict=True):
        if not len(p):
            continue
        end = len(p) * step_s
        scores[cid] = p
        gt[cid] = merge_events(
            [(max(0.0, float(a)), min(end, float(b)), data.classes[int(c)]) for a, b, c in ev]
        )
        durations[cid] = end
    return scores, gt, durations


def audio_id(clip_id: str) -> str:
    """The id DCASE's tables and ``sed_scores_eval`` give a clip: its file name without the extension."""
    name = clip_id.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def write_score_tables(
    directory, name: str, data: LabelledSet, posteriors: list[np.ndarray], step_s: float, median: int
) -> None:
    """The tables DCASE task 4 scores and ``sed_scores_eval`` reads, for the posteriors PSDS was computed on
    (median-filtered as :func:`sed_metrics` filters them):

    - ``DIRECTORY/NAME/<audio id>.tsv``: one row per step of ``step_s`` seconds, gapless — ``onset``,
      ``offset``, then one score column per class;
    - ``DIRECTORY/ground_truth.tsv`` (``filename onset offset event_label``; a clip without events has one
      row with empty fields) and ``DIRECTORY/durations.tsv`` (``filename duration``), the lengths scored.

    Read back with ``sed_scores_eval.io.read_sed_scores`` / ``read_ground_truth_events`` /
    ``read_audio_durations``, they give the PSDS ``RESULTS.json`` reports."""
    from pathlib import Path

    bad = [c for c in data.classes if any(ch in c for ch in "\t\n\r")]
    if bad:
        raise EvalError(
            f"--scores_dir: class name {bad[0]!r} holds a tab or a line break (a TSV column name)"
        )
    ids = [audio_id(c) for c in data.ids]
    if len(set(ids)) != len(ids):
        raise EvalError("--scores_dir: two clips share a file name, which names their score table")
    filtered = [median_filter(p, median) for p in posteriors]
    scores, gt, durations = event_inputs(data, filtered, step_s)
    root = Path(directory)
    (root / name).mkdir(parents=True, exist_ok=True)
    header = "onset\toffset\t" + "\t".join(data.classes) + "\n"
    for cid, p in scores.items():
        edges = np.arange(len(p) + 1) * step_s
        rows = [
            f"{edges[t]:.6f}\t{edges[t + 1]:.6f}\t" + "\t".join(f"{v:.7g}" for v in p[t]) + "\n"
            for t in range(len(p))
        ]
        (root / name / f"{audio_id(cid)}.tsv").write_text(header + "".join(rows))
    lines = ["filename\tonset\toffset\tevent_label\n"]
    for cid, events in gt.items():
        lines += [f"{audio_id(cid)}.wav\t{a:.6f}\t{b:.6f}\t{c}\n" for a, b, c in events] or [
            f"{audio_id(cid)}.wav\t\t\t\n"
        ]
    (root / "ground_truth.tsv").write_text("".join(lines))
    (root / "durations.tsv").write_text(
        "filename\tduration\n" + "".join(f"{audio_id(c)}.wav\t{d:.6f}\n" for c, d in durations.items())
    )


def sed_metrics(
    data: LabelledSet, posteriors: list[np.ndarray], step_s: float, median: int, errors: dict | None = None
) -> tuple[dict, dict]:
    """``(metrics, per-class)`` of SED posteriors (one ``[T, K]`` per clip of ``data``); a metric that fails is
    None, its error in ``errors`` (:class:`Guard`)."""
    guard = Guard(errors)
    k = len(data.classes)
    filtered = [median_filter(p, median) for p in posteriors]
    ys = [frame_targets(ev, len(p), step_s, k) for ev, p in zip(data.events, filtered, strict=True)]
    y_all = np.concatenate(ys) if ys else np.zeros((0, k))
    p_all = np.concatenate(filtered) if filtered else np.zeros((0, k))
    nan = np.full(k, np.nan)
    f1, f1_per = guard("frame_macro_f1", lambda: frame_f1(y_all, p_all), (None, nan))
    m, ap = guard("frame_mAP", lambda: mean_ap(y_all, p_all), (None, nan))
    scores, gt, durations = event_inputs(data, filtered, step_s)
    ev_metrics = event_metrics(scores, gt, durations, step_s, data.classes, errors)
    per_event = ev_metrics.pop("event_f1_per_class")
    metrics = {"frame_macro_f1": f1, "psds1": ev_metrics["psds1"], "psds2": ev_metrics["psds2"]}
    metrics.update(event_f1=ev_metrics["event_f1"], frame_mAP=m)
    per = {
        c: {"frame_f1": json_num(f1_per[j]), "event_f1": per_event[c], "frame_ap": json_num(ap[j])}
        for j, c in enumerate(data.classes)
    }
    return metrics, per


def json_num(v):
    """JSON-friendly: NaN/None → None, NumPy scalars → float."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v
