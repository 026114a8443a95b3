"""Scaling analysis of a sweep (``python -m atst_jax.sweep``): a table, power-law fits and plots of the SSL loss
(and a downstream probe's error) against compute, parameters and clips seen.

    python -m atst_jax.scaling DIR [--out DIR/scaling] [--window 0.1] [--probe-train DATA --probe-test DATA]
        [--probe-metric mAP] [--probe-args '--epochs 20'] [--level 0.95]
    python -m atst_jax.scaling ladder [--configs configs/a.py,configs/b.py] [--variants tiny,...,xxl]
        [--mesh fsdp=16] [--chips v5p,h100] [--mfu 0.5] [--json FILE] [--config.FIELD=VALUE ...]

Per run of the sweep (``DIR/sweep.json``): the trainable parameter count (the student, from the method's
abstract init: exact, nothing allocated), the steps done (the last step in ``metrics.jsonl``), clips seen
(steps × global batch), the analytic step FLOPs (the method's ``step_flops``, as the trainer's MFU) and the
total training FLOPs (step FLOPs × steps), the final SSL loss (the mean of the logged loss over the last
``--window`` of the run's steps) and, with a probe task (``--probe-train/--probe-test`` here, or recorded by
the sweep), the probe score of the final checkpoint from ``python -m atst_jax.evaluate`` (cached in
``RUN/probe.json``; error = 1 − score; ``--probe-metric`` default: ``mAP`` for clips, ``frame_mAP`` for SED).
A run that probed itself at its end (``config.probe``: ``RUN/probe/RESULTS.json``, evaluate's format) is
scored from that file instead. A run whose checkpoint was trained with another config than the sweep plans
(the sweep's ownership check, ``sweep.foreign_differences``) is tabled as ``foreign`` with a warning line and
none of its numbers are read.

Fits (runs that reached their ``train.steps`` only: an unfinished cosine schedule is not a final loss):

* vs compute — on the compute-efficient frontier: runs whose final loss is below that of every run with less
  or equal total compute (the lower envelope of the final points);
* vs parameters — on the lowest final loss at each parameter count (compute not the bottleneck);
* vs clips — on the lowest final loss at each clip count.

Each is ``y = a · x^b`` fitted by ordinary least squares in log space, ``log10 y = log10 a + b · log10 x``,
with confidence intervals from the covariance of that fit: ``s² (XᵀX)⁻¹`` with ``s²`` the residual variance
on ``n − 2`` degrees of freedom, times the Student-t quantile of ``--level`` (two-sided). With exactly 2
points the fit is exact and the intervals are undefined (nan); fewer points than the 2 parameters are
refused with one line. The band drawn around a fit is the same interval for the mean of ``log10 y``.

Output in ``--out`` (default ``DIR/scaling``): ``scaling.csv`` (one row per run), ``fits.json``, and PNGs:
``loss_vs_compute.png`` (every run's loss curve against its cumulative compute, the final points, the
frontier and its fit), ``loss_vs_params.png``, ``loss_vs_clips.png`` and, with probes,
``probe_vs_compute.png``. The table and the fits are printed. An ``--out`` that cannot be written is one line
before any work.

``ladder`` plans the size ladder (``configs/common.py`` ``MODELS``) of every method config with the planner's
machinery (``atst_jax.plan``: the real train step compiled for ``--mesh`` on simulated CPU devices) and prints
a Markdown table of per-device memory and step time on each ``--chips`` chip (one compile per row: the chip
only changes the peak and the HBM check), with the equivalent ``python -m atst_jax.plan`` command per row.
Every row's config is loaded and checked before the first compile: a missing file, an unknown variant, a bad
override or an unwritable ``--json`` is one line (exit 2); a row that cannot run on the mesh is skipped with a
line, and a ladder left with no row is an error.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

from atst_jax.cli import ArgumentParser, check_output, fail
from atst_jax.errors import UserError

FIT_PARAMETERS = 2  # a and b of y = a·x^b


class FitError(UserError):
    """A fit that cannot be made (too few or non-positive points): one line."""


# ======================================================================================================
# Power-law fits
# ======================================================================================================
@dataclasses.dataclass
class PowerLaw:
    """``y = a · x^b`` with ``level`` confidence intervals (``*_ci = (low, high)``) from the log-space fit."""

    a: float
    b: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    n: int
    r2: float
    level: float
    cov: list[list[float]]  # covariance of (log10 a, b)
    t: float  # the Student-t quantile used for the intervals (nan with 0 residual degrees of freedom)

    def __call__(self, x):
        import numpy as np

        return self.a * np.asarray(x, dtype=float) ** self.b

    def band(self, x):
        """``(low, high)`` of the confidence interval for the fitted mean at ``x`` (nan without dof)."""
        import numpy as np

        lx = np.log10(np.asarray(x, dtype=float))
        cov = np.asarray(self.cov)
        var = cov[0, 0] + 2 * lx * cov[0, 1] + lx**2 * cov[1, 1]
        centre = math.log10(self.a) + self.b * lx
        half = self.t * np.sqrt(np.maximum(var, 0.0))
        return 10 ** (centre - half), 10 ** (centre + half)

    def describe(self, x_sym: str = "x", y_sym: str = "y") -> str:
        pct = f"{self.level * 100:g}%"
        if math.isnan(self.b_ci[0]):
            ci = "no CI: 2 points, exact fit"
        else:
            ci = f"{pct} CI [{self.b_ci[0]:.3f}, {self.b_ci[1]:.3f}]"
        return f"{y_sym} = {self.a:.3g} · {x_sym}^{self.b:.3f} (exponent {ci}; {self.n} points, R² {self.r2:.3f})"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fit_power_law(x, y, level: float = 0.95) -> PowerLaw:
    """Fits ``y = a · x^b`` by ordinary least squares on ``log10 y = log10 a + b · log10 x``.

    Confidence intervals come from the covariance of the least-squares estimate, ``s² (XᵀX)⁻¹`` with ``s²`` the
    residual variance on ``n − 2`` degrees of freedom, times the two-sided Student-t quantile of ``level``; the
    interval of ``a`` is the transformed interval of ``log10 a``. Raises ``FitError`` (one line) for fewer points
    than the two parameters, non-positive values, or a single distinct ``x``."""
    import numpy as np
    from scipy import special  # stdtrit = the Student-t quantile (scipy.stats takes seconds to import)

    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise FitError(f"x and y differ in length ({x.size} vs {y.size})")
    n = x.size
    if n < FIT_PARAMETERS:
        raise FitError(f"cannot fit a power law ({FIT_PARAMETERS} parameters) to {n} point{'s' * (n != 1)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x <= 0).any() or (y <= 0).any():
        raise FitError("a power law needs positive, finite x and y (log space)")
    if np.unique(x).size < FIT_PARAMETERS:
        raise FitError(f"cannot fit a power law: all {n} points have the same x")
    if not 0 < level < 1:
        raise FitError(f"confidence level {level} must be in (0, 1)")
    lx, ly = np.log10(x), np.log10(y)
    design = np.stack([np.ones_like(lx), lx], axis=1)
    coef, *_ = np.linalg.lstsq(design, ly, rcond=None)
    resid = ly - design @ coef
    dof = n - FIT_PARAMETERS
    xtx_inv = np.linalg.inv(design.T @ design)
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    if dof > 0:
        s2 = float((resid**2).sum()) / dof
        cov = s2 * xtx_inv
        t = float(special.stdtrit(dof, 0.5 + level / 2))
        se = np.sqrt(np.diag(cov))
        la_ci = (coef[0] - t * se[0], coef[0] + t * se[0])
        b_ci = (float(coef[1] - t * se[1]), float(coef[1] + t * se[1]))
    else:  # exactly determined: no residuals to estimate the noise from
        cov, t = np.full((2, 2), np.nan), float("nan")
        la_ci, b_ci = (float("nan"), float("nan")), (float("nan"), float("nan"))
    return PowerLaw(
        a=float(10 ** coef[0]),
        b=float(coef[1]),
        a_ci=(float(10 ** la_ci[0]), float(10 ** la_ci[1])),
        b_ci=b_ci,
        n=int(n),
        r2=r2,
        level=level,
        cov=[[float(v) for v in row] for row in np.asarray(cov)],
        t=t,
    )


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the compute-efficient frontier: points whose y is below that of every point with less or
    equal x (ties in x: the lowest y), in increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    keep, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            keep.append(i)
            best = points[i][1]
    return keep


def best_per_x(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the lowest y at each distinct x, in increasing x."""
    best: dict[float, int] = {}
    for i, (x, y) in enumerate(points):
        if x not in best or y < points[best[x]][1]:
            best[x] = i
    return [best[x] for x in sorted(best)]


# ======================================================================================================
# Collect
# ======================================================================================================
def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a crash mid-write
            continue
    return rows


def model_facts(config) -> dict:
    """Trainable parameters (student), encoder parameters and the analytic FLOPs of one step, from the method
    contract alone (abstract init: nothing allocated)."""
    import jax
    import numpy as np
    from flax import nnx

    from atst_jax import methods

    method = methods.build(config)
    student, _, _ = nnx.eval_shape(lambda: method.init(jax.random.key(0)))
    params = nnx.state(student, nnx.Param)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    encoder = params["encoder"] if "encoder" in params else params
    return {
        "params": count(params),
        "encoder_params": count(encoder),
        "step_flops": float(method.step_flops(int(config.train.global_batch))),
    }


def final_loss(metrics: list[dict], steps_done: int, window: float) -> float:
    """Mean logged loss over the last ``window`` (a fraction) of the run's steps, at least the last point."""
    rows = [m for m in metrics if isinstance(m.get("loss"), (int, float)) and math.isfinite(m["loss"])]
    if not rows:
        return float("nan")
    start = steps_done - window * steps_done
    tail = [m["loss"] for m in rows if m["step"] > start] or [rows[-1]["loss"]]
    return float(sum(tail) / len(tail))


def probe_score(workdir: Path, step: int, probe: dict, metric: str | None, extra: list[str]) -> dict:
    """Runs ``python -m atst_jax.evaluate`` on the run's final checkpoint and returns ``{"metric", "score",
    "error"}``. The result is cached in ``RUN/probe.json`` under every input of the probe (the step, the train
    and test sets, the extra evaluate arguments): another step, set or argument runs the probe again."""
    out = Path(workdir) / "probe.json"
    inputs = {
        "step": int(step),
        "train": str(probe["train"]),
        "test": str(probe["test"]),
        "args": list(extra),
    }
    cached = None
    if out.exists():
        try:
            cached = json.loads(out.read_text())
        except ValueError:
            cached = None
    if not cached or cached.get("_inputs") != inputs:  # none yet, or made from other inputs
        cmd = [
            sys.executable,
            "-m",
            "atst_jax.evaluate",
            "--workdir",
            str(workdir),
            "--step",
            str(step),
            "--train",
            probe["train"],
            "--test",
            probe["test"],
            "--out",
            str(out),
            "--baselines",
            "none",
            "--no_progress",
            *extra,
        ]
        print(f"[scaling] probe: {shlex.join(cmd)}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
            raise FitError(f"evaluate failed on {workdir} (exit {done.returncode}): {lines[-1]}")
        cached = json.loads(out.read_text())
        cached["_inputs"] = inputs
        out.write_text(json.dumps(cached, indent=1) + "\n")
    return _score(cached, metric, workdir)


def _own_final_probe(workdir: Path) -> dict | None:
    """The run's final probe (``RUN/probe/RESULTS.json``), or None while it is missing or partial: evaluate
    writes that file as its results come in, and a probe cut short is produced again by rerunning the run."""
    path = workdir / "probe" / "RESULTS.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    return results if results.get("complete", True) else None


def _score(results: dict, metric: str | None, workdir) -> dict:
    """``{"metric", "score", "error"}`` of the pretrained encoder in an ``evaluate`` RESULTS dict."""
    metrics = results["encoders"]["checkpoint"]["metrics"]
    name = metric or ("frame_mAP" if results["task"] == "sed" else "mAP")
    if name not in metrics:
        raise FitError(f"--probe-metric {name}: the probe of {workdir} has {', '.join(metrics)}")
    if metrics[name] is None:  # evaluate records a metric that failed as null, with its error beside it
        why = (results["encoders"]["checkpoint"].get("errors") or {}).get(name, "no reason recorded")
        raise FitError(f"--probe-metric {name}: the probe of {workdir} could not compute it ({why})")
    score = float(metrics[name])
    return {"metric": name, "score": score, "error": 1.0 - score}


def collect(
    root, window: float = 0.1, probe: dict | None = None, probe_metric=None, probe_args=()
) -> list[dict]:
    """One dict per run of the sweep in ``root``: grid values, state, sizes, compute, final loss, probe, curve."""
    from atst_jax.tools import sweep

    plan = sweep.load_plan(root)
    probe = probe or plan.probe
    rows, facts_of = [], {}
    for run in plan.runs:
        wd = Path(plan.workdir(run))
        config = sweep.run_config(plan.config, {**plan.fixed, **run.overrides})
        # Sizes and step FLOPs do not depend on the run's length: one abstract init per model.
        key = json.dumps(
            {
                **json.loads(config.to_json_best_effort()),
                "train": {"global_batch": config.train.global_batch},
            },
            sort_keys=True,
        )
        if key not in facts_of:
            facts_of[key] = model_facts(config)
        facts = facts_of[key]
        # A run trained with another config (the sweep's ownership check) is not this plan's: none of its
        # numbers are read, so it can neither enter a fit nor be drawn as this run.
        foreign = sweep.foreign_differences(plan, run)
        metrics = [] if foreign else read_metrics(wd)
        steps_done = max((int(m["step"]) for m in metrics), default=0)
        done = not foreign and sweep.is_done(plan, run)
        gb = int(config.train.global_batch)
        state = "done" if done else ("partial" if steps_done else "pending")
        row = {
            "run": run.name,
            **{f"grid.{k}": v for k, v in run.overrides.items()},
            "state": "foreign" if foreign else state,
            "foreign": foreign,
            "method": config.method,
            "width": int(config.model.width),
            "depth": int(config.model.depth),
            "params": facts["params"],
            "encoder_params": facts["encoder_params"],
            "global_batch": gb,
            "steps": steps_done,
            "target_steps": run.steps,
            "clips": steps_done * gb,
            "step_flops": facts["step_flops"],
            "flops": facts["step_flops"] * steps_done,
            "final_loss": final_loss(metrics, steps_done, window),
            "probe_metric": "",
            "probe_score": float("nan"),
            "probe_error": float("nan"),
            "curve": [
                (int(m["step"]), float(m["loss"])) for m in metrics if isinstance(m.get("loss"), (int, float))
            ],
        }
        own = _own_final_probe(wd) if done else None  # the trainer's own final probe (config.probe)
        if own is not None:
            p = _score(own, probe_metric, wd)
            row.update(probe_metric=p["metric"], probe_score=p["score"], probe_error=p["error"])
        elif probe and done:
            p = probe_score(wd, sweep.committed_steps(wd)[-1], probe, probe_metric, list(probe_args))
            row.update(probe_metric=p["metric"], probe_score=p["score"], probe_error=p["error"])
        rows.append(row)
    return rows


# ======================================================================================================
# Fits over the runs
# ======================================================================================================
FITS = (
    # name, y column, x column, which points, symbol of x
    ("loss_vs_compute", "final_loss", "flops", "frontier", "C"),
    ("loss_vs_params", "final_loss", "params", "best", "N"),
    ("loss_vs_clips", "final_loss", "clips", "best", "D"),
    ("probe_error_vs_compute", "probe_error", "flops", "frontier", "C"),
    ("probe_error_vs_params", "probe_error", "params", "best", "N"),
    ("probe_error_vs_clips", "probe_error", "clips", "best", "D"),
)


def fit_all(rows: list[dict], level: float = 0.95) -> tuple[dict, list[str]]:
    """``({name: {"fit", "runs"}}, [one-line refusals])`` over the finished runs."""
    done = [r for r in rows if r["state"] == "done"]
    fits, refused = {}, []
    for name, ycol, xcol, which, _ in FITS:
        pts = [(r[xcol], r[ycol]) for r in done if math.isfinite(r[ycol])]
        if ycol == "probe_error" and not pts:
            continue  # no probe configured
        runs = [r for r in done if math.isfinite(r[ycol])]
        idx = frontier(pts) if which == "frontier" else best_per_x(pts)
        try:
            fit = fit_power_law([pts[i][0] for i in idx], [pts[i][1] for i in idx], level)
        except FitError as e:
            refused.append(f"{name}: {e}")
            continue
        fits[name] = {"fit": fit, "runs": [runs[i]["run"] for i in idx]}
    return fits, refused


# ======================================================================================================
# Output
# ======================================================================================================
CSV_COLUMNS = (
    "run",
    "state",
    "method",
    "width",
    "depth",
    "params",
    "encoder_params",
    "global_batch",
    "steps",
    "target_steps",
    "clips",
    "step_flops",
    "flops",
    "final_loss",
    "probe_metric",
    "probe_score",
    "probe_error",
)


def write_csv(rows: list[dict], path: Path) -> None:
    grid = sorted({k for r in rows for k in r if k.startswith("grid.")})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*CSV_COLUMNS[:1], *grid, *CSV_COLUMNS[1:]], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _si(v: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def table(rows: list[dict], fits: dict, refused: list[str]) -> str:
    probe = any(math.isfinite(r["probe_score"]) for r in rows)
    width = max(len("run"), *(len(r["run"]) for r in rows))
    head = f"  {'run':<{width}}  {'state':<7} {'params':>8} {'steps':>11} {'clips':>8} {'FLOPs':>8} {'final loss':>10}"
    if probe:
        head += f" {'probe':>12}"
    lines = [head]
    for r in rows:
        line = (
            f"  {r['run']:<{width}}  {r['state']:<7} {_si(r['params']):>8} "
            f"{r['steps']:>5}/{r['target_steps']:<5} {_si(r['clips']):>8} {_si(r['flops']):>8} "
            f"{r['final_loss']:>10.4f}"
        )
        if probe:
            line += f" {r['probe_metric'] + ' ' + format(r['probe_score'], '.3f'):>12}"
        lines.append(line)
    lines.append("")
    syms = {"final_loss": "L", "probe_error": "E"}
    for name, ycol, _, which, xsym in FITS:
        if name in fits:
            where = "frontier" if which == "frontier" else "best per value"
            lines.append(f"  {name} ({where}: {', '.join(fits[name]['runs'])}):")
            lines.append(f"    {fits[name]['fit'].describe(xsym, syms[ycol])}")
    lines += [f"  fit refused: {m}" for m in refused]
    return "\n".join(lines)


def _colours(rows):
    import matplotlib

    params = sorted({r["params"] for r in rows})
    cmap = matplotlib.colormaps["viridis"]
    return {p: cmap(0.15 + 0.7 * (i / max(len(params) - 1, 1))) for i, p in enumerate(params)}


def _smooth(values, k: int):
    import numpy as np

    if len(values) < 3 or k <= 1:
        return np.asarray(values)
    k = min(k, len(values))
    kernel = np.ones(k) / k
    padded = np.concatenate([np.full(k - 1, values[0]), values])  # causal: the curve never leads the data
    return np.convolve(padded, kernel, mode="valid")


def _draw_fit(ax, fit: PowerLaw, xs, label: str, colour="crimson"):
    import numpy as np

    lo, hi = min(xs), max(xs)
    grid = np.logspace(math.log10(lo) - 0.15, math.log10(hi) + 0.15, 100)
    ax.plot(grid, fit(grid), "--", color=colour, lw=2, label=label, zorder=4)
    if not math.isnan(fit.t):
        low, high = fit.band(grid)
        ax.fill_between(
            grid, low, high, color=colour, alpha=0.15, lw=0, label=f"{fit.level * 100:g}% CI of the fit"
        )


def plot_compute(rows, fits, path: Path, ycol="final_loss", fit_name="loss_vs_compute") -> None:
    import matplotlib.pyplot as plt

    colours = _colours(rows)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    curves = ycol == "final_loss"
    for r in rows:
        c = colours[r["params"]]
        if curves and r["curve"]:
            steps = [s for s, _ in r["curve"]]
            loss = _smooth([v for _, v in r["curve"]], 5)
            ax.plot([s * r["step_flops"] for s in steps], loss, color=c, lw=1.3, alpha=0.85)
        if math.isfinite(r[ycol]) and r["flops"] > 0:
            marker = "o" if r["state"] == "done" else "x"
            edge = "k" if r["state"] == "done" else c  # "x" (unfinished) is an unfilled marker
            ax.scatter(
                [r["flops"]], [r[ycol]], color=c, marker=marker, s=40, zorder=3, edgecolor=edge, lw=0.8
            )
    for p, c in colours.items():
        ax.plot([], [], color=c, lw=3, label=f"{_si(p)} params")
    if fit_name in fits:
        names = fits[fit_name]["runs"]
        front = sorted((r["flops"], r[ycol]) for r in rows if r["run"] in names)
        ax.plot(
            *zip(*front, strict=True),
            "k-",
            lw=1,
            marker="*",
            ms=12,
            label="compute-efficient frontier",
            zorder=5,
        )
        f = fits[fit_name]["fit"]
        sym = "L" if curves else "E"
        _draw_fit(ax, f, [x for x, _ in front], f"fit ${sym} = {f.a:.3g}\\,C^{{{f.b:.3f}}}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs, analytic)")
    ax.set_ylabel("SSL loss (smoothed)" if curves else f"probe error (1 − {rows[0]['probe_metric']})")
    ax.set_title(
        "SSL loss against compute: every run's curve, final points (o)"
        if curves
        else "probe error against compute"
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_against(rows, fits, path: Path, xcol: str, fit_name: str, xlabel: str, xsym: str) -> None:
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "done" and math.isfinite(r["final_loss"])]
    other = "clips" if xcol == "params" else "params"
    values = sorted({r[other] for r in done})
    import matplotlib

    cmap = matplotlib.colormaps["plasma"]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for i, v in enumerate(values):
        pts = sorted((r[xcol], r["final_loss"]) for r in done if r[other] == v)
        c = cmap(0.1 + 0.75 * i / max(len(values) - 1, 1))
        ax.plot(*zip(*pts, strict=True), "o-", color=c, lw=1, label=f"{_si(v)} {other}")
    if fit_name in fits:
        names = set(fits[fit_name]["runs"])
        best = sorted((r[xcol], r["final_loss"]) for r in done if r["run"] in names)
        ax.scatter(
            *zip(*best, strict=True),
            s=140,
            facecolor="none",
            edgecolor="k",
            lw=1.5,
            label="best per value (fitted)",
            zorder=5,
        )
        f = fits[fit_name]["fit"]
        _draw_fit(ax, f, [x for x, _ in best], f"fit $L = {f.a:.3g}\\,{xsym}^{{{f.b:.3f}}}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final SSL loss")
    ax.set_title(f"final SSL loss against {xlabel.split(' (')[0]}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(rows, fits, refused, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "scaling.csv")
    (out / "fits.json").write_text(
        json.dumps(
            {k: {"fit": v["fit"].to_json(), "runs": v["runs"]} for k, v in fits.items()}
            | {"refused": refused},
            indent=1,
        )
        + "\n"
    )
    pngs = [out / "loss_vs_compute.png", out / "loss_vs_params.png", out / "loss_vs_clips.png"]
    plot_compute(rows, fits, pngs[0])
    plot_against(rows, fits, pngs[1], "params", "loss_vs_params", "trainable parameters N", "N")
    plot_against(rows, fits, pngs[2], "clips", "loss_vs_clips", "clips seen D (steps × batch)", "D")
    if any(math.isfinite(r["probe_error"]) for r in rows):
        pngs.append(out / "probe_vs_compute.png")
        plot_compute(rows, fits, pngs[-1], "probe_error", "probe_error_vs_compute")
    return pngs


# ======================================================================================================
# Size ladder (the planner's machinery, one compile per method × size)
# ======================================================================================================
DEFAULT_VARIANTS = "tiny,small,base,large,xl,xxl"


def method_configs(repo: Path) -> list[str]:
    """``configs/<name>.py`` of every registered method (``atst_jax.methods.names()``) that has one; configs that
    derive from a method's (e.g. another stem on the same method) are left to ``--configs``."""
    from atst_jax import methods

    return [f"configs/{name}.py" for name in methods.names() if (repo / "configs" / f"{name}.py").is_file()]


def ladder(args, overrides: list[str]) -> int:
    from atst_jax.tools import plan as planner

    try:
        mesh = planner.parse_mesh(args.mesh)
        devices = planner.device_count(mesh, None)
        if args.json:  # before the compiles: a path that cannot be written fails now, not after them
            check_output(args.json, "--json", directory=False)
    except UserError as e:
        return fail(e)
    planner._force_cpu_devices(devices)  # before JAX starts: the simulated device count

    import logging

    from absl import logging as absl_logging

    from atst_jax.config import check_config, load_config
    from atst_jax.flops import CHIPS
    from atst_jax.sharding import ConfigError
    from atst_jax.tools import sweep

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    repo = sweep.REPO
    configs = (
        [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else method_configs(repo)
    )
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    chips = [c.strip() for c in args.chips.split(",") if c.strip()]
    bad = [c for c in chips if c not in CHIPS]
    if bad:
        return fail(f"--chips: unknown {bad[0]!r}; choose from {', '.join(CHIPS)}")
    if not configs or not variants or not chips:
        empty = "--configs" if not configs else "--variants" if not variants else "--chips"
        return fail(f"{empty} names nothing to plan")
    fixed = {}
    for o in overrides:
        field, _, value = o[len("--config.") :].partition("=")
        fixed[field] = value
    mesh_arg = ",".join(f"{k}={v}" for k, v in mesh.items() if v != 1) or "data=1"

    # Every row's config first, before any compile: a missing config file, an unknown variant or a mistyped
    # override is the user's to fix (one line, exit 2); a config that cannot run on this mesh is skipped with
    # a line (the ladder's other rows still tell something), and a ladder with no row left is an error.
    rows, skipped = [], []
    for cfg_path in configs:
        for variant in variants:
            spec = f"{cfg_path}:{variant}"
            full = f"{repo / cfg_path}:{variant}"
            try:
                config = sweep.apply_overrides(load_config(full), fixed)
            except (ConfigError, sweep.SweepError) as e:
                why = " ".join(str(e).split()).removeprefix(f"--config {full}: ")  # the row says which
                return fail(f"ladder row {spec}: {why}")
            try:
                for axis, size in mesh.items():
                    config.mesh[axis] = size
                check_config(config, devices)
            except ConfigError as e:
                skipped.append(f"{spec}: {' '.join(str(e).split())}")
                continue
            rows.append((cfg_path, variant, spec, config))
    if not rows:
        return fail(f"no row of the ladder can run on mesh {mesh_arg}; the first: {skipped[0]}")
    for line in skipped:
        print(f"[ladder] skipped {line}", file=sys.stderr, flush=True)

    results, lines = [], []
    head = "| config | size | D × depth | params | global batch | state / device | peak / device |"
    head += "".join(f" {c} step @ MFU {args.mfu:g} | fits {c} |" for c in chips)
    lines += [head, "|" + "---|" * (7 + 2 * len(chips))]
    commands = []
    for cfg_path, variant, spec, config in rows:
        print(
            f"[ladder] planning {spec} on mesh {mesh_arg} ({devices} simulated devices) ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            r = planner.plan(config, spec, devices, None, args.mfu)
        except ConfigError as e:
            print(f"[ladder] {spec}: skipped: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            continue
        pd = r["memory"]["per_device"]
        per_dev = r["flops"]["analytic_per_device"]
        row = (
            f"| {Path(cfg_path).stem} | {variant} | {config.model.width} × {config.model.depth} | "
            f"{r['num_params'] / 1e6:,.1f}M | {r['global_batch']} | {planner.human(pd['state'])} | "
            f"{planner.human(pd['peak'])} |"
        )
        r["chips"] = {}
        for c in chips:
            step = per_dev / (CHIPS[c]["peak_tflops"] * 1e12 * args.mfu)
            fits = pd["peak"] <= CHIPS[c]["hbm_bytes"]
            r["chips"][c] = {"step_time_s": step, "fits": fits}
            row += f" {planner.seconds(step)} | {'yes' if fits else '**no**'} |"
        lines.append(row)
        extra = "".join(f" {shlex.quote(o)}" for o in overrides)
        for c in chips:
            commands.append(
                f"python -m atst_jax.plan --config {spec} --mesh {mesh_arg} --chip {c} --mfu {args.mfu:g}{extra}"
            )
        r["commands"] = commands[-len(chips) :]
        results.append(r)
        print(f"[ladder] {lines[-1]}", file=sys.stderr, flush=True)  # progress; the table follows
    print("\n".join(lines))
    print("\nRows as single planner commands (the same compile; each also prints the full report):")
    for c in commands:
        print(f"    {c}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


# ======================================================================================================
# CLI
# ======================================================================================================
def _ladder_parser():
    p = ArgumentParser(prog="python -m atst_jax.scaling ladder")
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated config files (default: configs/<method>.py of each method)",
    )
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--mesh", default="fsdp=16", help="target mesh (simulated CPU devices), e.g. fsdp=16")
    p.add_argument("--chips", default="v5p,h100")
    p.add_argument("--mfu", type=float, default=0.5)
    p.add_argument("--json", default=None)
    return p


def _parser():
    p = ArgumentParser(
        prog="python -m atst_jax.scaling", description="Scaling table, fits and plots of a sweep."
    )
    p.add_argument("root", help="the sweep's --root (holds sweep.json)")
    p.add_argument("--out", default=None, help="output directory (default ROOT/scaling)")
    p.add_argument(
        "--window", type=float, default=0.1, help="final loss: mean over this last fraction of steps"
    )
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the fits' intervals")
    p.add_argument("--probe-train", default=None, help="prepared dataset for the probe (else the sweep's)")
    p.add_argument("--probe-test", default=None)
    p.add_argument("--probe-metric", default=None, help="evaluate metric to score (default mAP / frame_mAP)")
    p.add_argument("--probe-args", default="", help="more evaluate arguments, e.g. '--epochs 20'")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ladder":
        rest = [a for a in argv[1:] if not a.startswith("--config.")]
        return ladder(_ladder_parser().parse_args(rest), [a for a in argv[1:] if a.startswith("--config.")])
    args = _parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.root) / "scaling"
    try:
        if not 0 < args.window <= 1:
            raise FitError(f"--window {args.window} must be in (0, 1]")
        if not 0 < args.level < 1:
            raise FitError(f"--level {args.level} must be in (0, 1)")
        if (args.probe_train is None) != (args.probe_test is None):
            raise FitError("--probe-train and --probe-test go together")
        # Before any work (abstract inits, probes): an --out that cannot be written fails now, not at the end.
        check_output(out, "--out", directory=True)
        probe = {"train": args.probe_train, "test": args.probe_test} if args.probe_train else None
        import logging

        logging.getLogger("absl").setLevel(logging.ERROR)
        rows = collect(args.root, args.window, probe, args.probe_metric, shlex.split(args.probe_args))
    except (UserError, OSError) as e:
        return fail(e)
    from atst_jax.tools.sweep import shown_differences

    for r in rows:
        if r["foreign"]:
            print(
                f"warning: run {r['run']} was trained with another config than the sweep's "
                f"({shown_differences(r['foreign'])}): it is left out of the table's numbers, the fits and the "
                "plots",
                file=sys.stderr,
            )
    fits, refused = fit_all(rows, args.level)
    try:
        pngs = write_outputs(rows, fits, refused, out)
    except OSError as e:  # e.g. the disk filled up while writing
        return fail(f"cannot write --out {out} ({e.strerror or e})")
    print(table(rows, fits, refused))
    print(f"wrote {out / 'scaling.csv'}, {out / 'fits.json'}, " + ", ".join(p.name for p in pngs))
    return 0


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
