"""What an evaluation hands a person: ``RESULTS.json`` (``write_results``), the metrics table (``table``) and
the pictures a person looks at instead of the numbers: SED posteriors against the ground truth, per-class
results of every encoder side by side (``write_plots``), and a spectrogram with what a method hides or
corrupts in it.

Rendering uses matplotlib's Agg backend (no display needed); every function writes one PNG atomically and
returns its path. ``spectrogram_image`` returns an RGB array for TensorBoard instead. Class names and clip ids
are data, drawn as they are: matplotlib's mathtext (``$...$`` in any label) is off while drawing
(:func:`_pyplot`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np

from atst_jax.eval.data import LabelledSet

# One colour per encoder, the same in every picture.
ENCODER_COLOURS = {"checkpoint": "#1f77b4", "random_init": "#ff7f0e", "logmel": "#2ca02c"}
_FALLBACK = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


@contextlib.contextmanager
def _pyplot():
    """pyplot on Agg with mathtext off: a class named ``$^$`` (or ``50$ and 60$``) would otherwise be parsed as
    a formula when the figure is drawn, and fail or show something else. TeX rendering is off too."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with plt.rc_context({"text.parse_math": False, "text.usetex": False}):
        yield plt


def _render(path, draw) -> Path:
    """``draw(plt) -> figure``, saved as a PNG at ``path`` atomically; the figures it opened are closed even
    when drawing or saving fails (a trainer draws its final probe's pictures and goes on)."""
    path = Path(path)
    with _pyplot() as plt:
        before = set(plt.get_fignums())
        try:
            fig = draw(plt)
            fig.tight_layout()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            for num in set(plt.get_fignums()) - before:
                plt.close(num)
    return path


def _colour(name: str, i: int) -> str:
    return ENCODER_COLOURS.get(name, _FALLBACK[i % len(_FALLBACK)])


def sed_posteriors_png(
    path,
    clips: list[dict],
    classes: list[str],
    step_s: float,
) -> Path:
    """One row per clip: the ground-truth events (a piano roll over the classes) above the posteriors of each
    encoder (``clips[i] = {"id", "events": [(onset, offset, class index)], "posteriors": {encoder: [T, K]}}``)
    on the same time axis (0 → 1 on one colour scale for all)."""

    def draw(plt):
        names = list(clips[0]["posteriors"]) if clips else []
        rows = len(clips) * (1 + len(names))
        k = len(classes)
        fig, axes = plt.subplots(rows, 1, figsize=(11, 0.22 * k * rows + 1.0), squeeze=False, sharex=True)
        r = 0
        for clip in clips:
            steps = max((len(p) for p in clip["posteriors"].values()), default=0)
            truth = np.zeros((k, steps))
            for onset, offset, c in clip["events"]:
                a, b = int(round(onset / step_s)), int(round(offset / step_s))
                truth[int(c), max(a, 0) : min(b, steps)] = 1.0
            panels = [("ground truth", truth)] + [(n, np.asarray(p).T) for n, p in clip["posteriors"].items()]
            for title, img in panels:
                ax = axes[r, 0]
                ax.imshow(
                    img,
                    aspect="auto",
                    origin="lower",
                    vmin=0.0,
                    vmax=1.0,
                    cmap="Greys" if title == "ground truth" else "viridis",
                    extent=(0, steps * step_s, -0.5, k - 0.5),
                    interpolation="nearest",
                )
                ax.set_yticks(range(k))
                ax.set_yticklabels(classes, fontsize=6)
                ax.set_title(f"{clip['id']}: {title}", fontsize=8, loc="left")
                r += 1
        axes[-1, 0].set_xlabel("time (s)")
        return fig

    return _render(path, draw)


def per_class_png(path, results: dict) -> Path:
    """Grouped bars: per class, the score of every encoder (clip tasks: AP; SED: frame-level AP), with each
    encoder's mean in the legend."""

    def draw(plt):
        encoders = results["encoders"]
        classes = results["classes"]
        key = "frame_ap" if results["task"] == "sed" else "ap"
        names = list(encoders)
        width = 0.8 / max(len(names), 1)
        x = np.arange(len(classes))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(classes) + 2), 3.6))
        for i, name in enumerate(names):
            per = encoders[name]["per_class"]
            vals = np.array([np.nan if per[c].get(key) is None else per[c][key] for c in classes], float)
            mean = np.nanmean(vals) if np.isfinite(vals).any() else float("nan")
            ax.bar(
                x + (i - (len(names) - 1) / 2) * width,
                np.nan_to_num(vals),
                width,
                color=_colour(name, i),
                label=f"{name} (mean {mean:.3f})",
            )
        ax.set_xticks(x)
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("frame-level AP" if key == "frame_ap" else "AP")
        ax.set_title(f"per-class results ({results['task']})", fontsize=9, pad=22)
        # Above the axes, one row: inside them it hid the bars of the last classes (scores near 1).
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(names), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        return fig

    return _render(path, draw)


def spectrogram_image(
    panels: list[tuple[str, np.ndarray, np.ndarray | None]], width_px: int = 600
) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]``: the panels stacked top to bottom, each a spectrogram ``[F, T]`` (low
    frequencies at the bottom, grey scale from its own min to max) with an optional overlay ``[F, T]`` in
    [0, 1] (masked / corrupted pixels) tinted red. For TensorBoard's ``add_image(..., dataformats="HWC")``."""
    rows = []
    for _, spec, overlay in panels:
        s = np.asarray(spec, np.float32)
        lo, hi = float(np.min(s)), float(np.max(s))
        g = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
        rgb = np.repeat(g[::-1, :, None], 3, axis=2)
        if overlay is not None:
            o = np.clip(np.asarray(overlay, np.float32), 0, 1)[::-1, :, None]
            tint = np.array([1.0, 0.15, 0.15], np.float32)
            rgb = rgb * (1 - 0.55 * o) + 0.55 * o * tint
        # Nearest-neighbour resize of the time axis to a common width, so panels of other lengths stack.
        t = rgb.shape[1]
        cols = np.minimum((np.arange(width_px) * t) // width_px, t - 1)
        rgb = rgb[:, cols]
        reps = max(1, 128 // rgb.shape[0])
        rows.append(np.repeat(rgb, reps, axis=0))
        rows.append(np.ones((3, width_px, 3), np.float32))  # a white separator
    img = np.concatenate(rows[:-1], axis=0) if rows else np.zeros((1, width_px, 3), np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# RESULTS.json, its table and its pictures
# ----------------------------------------------------------------------------------------------------------


PLOT_CLIPS = 3  # test clips drawn in the SED picture


def write_plots(
    results: dict, test: LabelledSet, posteriors: dict, step_s: float, prefix
) -> tuple[list[str], dict]:
    """``(written paths, {picture: error})``: ``<prefix>_per_class.png`` (every encoder's per-class score) and,
    for SED, ``<prefix>_sed.png``: the posteriors of every encoder against the ground truth on the first test
    clips with the most events. Each picture is drawn on its own: one that fails is an error entry (one
    line), not the loss of the other or of the metrics already written."""
    from atst_jax.eval.metrics import Guard

    prefix = str(prefix)
    errors: dict = {}
    guard = Guard(errors)
    written = [guard("per_class.png", lambda: str(per_class_png(prefix + "_per_class.png", results)))]
    if results["task"] == "sed" and test.events is not None:
        busiest = sorted(range(len(test)), key=lambda i: (-len(test.events[i]), test.ids[i]))[:PLOT_CLIPS]
        clips = [
            {
                "id": test.ids[i],
                "events": [tuple(e) for e in test.events[i]],
                "posteriors": {n: p[i] for n, p in posteriors.items() if p is not None},
            }
            for i in sorted(busiest)
        ]
        sed = lambda: str(sed_posteriors_png(prefix + "_sed.png", clips, test.classes, step_s))  # noqa: E731
        written.append(guard("sed.png", sed))
    return [w for w in written if w is not None], errors


def fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def table(results: dict) -> str:
    """The metrics table: one row per metric, one column per encoder."""
    names = list(results["encoders"])
    metrics = list(next(iter(results["encoders"].values()))["metrics"])
    w = max(len(m) for m in metrics + ["metric"]) + 2
    cols = [max(12, len(n) + 2) for n in names]
    lines = ["metric".ljust(w) + "".join(n.rjust(c) for n, c in zip(names, cols, strict=True))]
    for m in metrics:
        row = m.ljust(w)
        for n, c in zip(names, cols, strict=True):
            row += fmt(results["encoders"][n]["metrics"].get(m)).rjust(c)
        lines.append(row)
    return "\n".join(lines)


def error_lines(results: dict) -> list[str]:
    """One warning line per metric that could not be computed and per picture that could not be drawn
    (``RESULTS.json``'s ``"errors"``, per encoder and for the whole evaluation)."""
    lines = [
        f"warning: {name}: {metric} not computed ({message})"
        for name, r in results["encoders"].items()
        for metric, message in r.get("errors", {}).items()
    ]
    lines += [
        f"warning: {picture} not drawn ({message})" for picture, message in results.get("errors", {}).items()
    ]
    return lines


def write_results(out: Path, results: dict) -> None:
    """``results`` as indented JSON at ``out``, written atomically (a temporary file, then a rename)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out)
