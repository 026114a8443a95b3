"""python -m atst_jax.scaling: the power-law fit (known exponents recovered, interval coverage, refusals), the
frontier, and the CLI's table / CSV / fits / PNGs on a sweep whose runs follow a known power law (real plan and
model sizes, fabricated metrics and checkpoint markers: no training here; tests/test_sweep.py trains).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess

import numpy as np
import pytest

from atst_jax.tools import scaling, sweep

CONFIG = "configs/atst_frame.py:tiny"


# ------------------------------------------------------------------------------------------------------
# Fits
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b", [(5.0, -0.05), (40.0, -0.3), (0.01, 0.5)])
def test_fit_recovers_known_exponents_from_noisy_points(a, b):
    rng = np.random.default_rng(0)
    x = np.logspace(15, 20, 12)
    y = a * x**b * np.exp(rng.normal(0, 0.02, x.size))  # 2 % multiplicative noise
    fit = scaling.fit_power_law(x, y)
    # Tolerance: the exponent within 0.01 (the noise gives a standard error of ≈ 0.002 over 5 decades) and
    # inside its own 95 % interval; the prefactor within 10 %.
    assert abs(fit.b - b) < 0.01
    assert fit.b_ci[0] < b < fit.b_ci[1]
    assert abs(fit.a / a - 1) < 0.1
    assert fit.a_ci[0] < a < fit.a_ci[1]
    assert fit.n == 12 and fit.r2 > 0.95
    low, high = fit.band(x)
    assert np.all(low < fit(x)) and np.all(fit(x) < high)


def test_fit_intervals_cover_the_true_exponent_at_their_level():
    rng = np.random.default_rng(1)
    x = np.logspace(0, 3, 6)
    hits = 0
    for _ in range(400):
        y = 2.0 * x**-0.2 * np.exp(rng.normal(0, 0.1, x.size))
        lo, hi = scaling.fit_power_law(x, y, level=0.9).b_ci
        hits += lo < -0.2 < hi
    assert 0.86 < hits / 400 < 0.94  # 90 % intervals with 4 residual degrees of freedom (t, not normal)


def test_fit_refuses_fewer_points_than_parameters():
    for n in (0, 1):
        with pytest.raises(scaling.FitError) as e:
            scaling.fit_power_law(np.ones(n) * 10, np.ones(n))
        assert str(e.value) == f"cannot fit a power law (2 parameters) to {n} point{'s' * (n != 1)}"
    with pytest.raises(scaling.FitError, match="positive"):
        scaling.fit_power_law([1, 2, 3], [1, 0, 2])
    with pytest.raises(scaling.FitError, match="same x"):
        scaling.fit_power_law([2, 2, 2], [1, 2, 3])
    exact = scaling.fit_power_law([10, 1000], [1.0, 0.5])  # as many points as parameters: exact, no interval
    assert exact.b == pytest.approx(math.log10(0.5) / 2) and math.isnan(exact.b_ci[0])


def test_frontier_and_best_per_x():
    pts = [(1, 5.0), (2, 6.0), (2, 4.0), (4, 4.5), (8, 3.0), (8, 3.5)]
    assert scaling.frontier(pts) == [0, 2, 4]
    assert scaling.best_per_x(pts) == [0, 2, 3, 4]


# ------------------------------------------------------------------------------------------------------
# The CLI on a sweep with known scaling
# ------------------------------------------------------------------------------------------------------
TRUE_B = -0.12


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    """A real plan (3 widths × 2 step counts of tiny), each run "done" with a loss curve on
    ``L = 30 · C^-0.12`` of its cumulative compute and a cached probe result."""
    root = tmp_path_factory.mktemp("scaling") / "sweep"
    plan = sweep.make_plan(
        str(root), CONFIG, "model.width=32,64,128; train.steps=100,300", {"model.depth": "2"}
    )
    sweep.write_plan(plan)
    flops = {}  # per width: the step FLOPs do not depend on train.steps
    for run in plan.runs:
        width = run.overrides["model.width"]
        if width not in flops:
            flops[width] = scaling.model_facts(sweep.run_config(plan.config, {**plan.fixed, **run.overrides}))
        facts = flops[width]
        wd = root / run.name
        lines = []
        for step in range(5, run.steps + 1, 5):
            # Early in a run the loss is above the envelope (warm-up); at the end it reaches the power law.
            c = facts["step_flops"] * step
            over = 1 + 0.5 * (1 - step / run.steps) ** 2
            lines.append(json.dumps({"step": step, "loss": 30 * c**TRUE_B * over}))
        (wd / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (wd / "checkpoints" / str(run.steps)).mkdir(parents=True)
        (wd / "checkpoints" / str(run.steps) / "_CHECKPOINT_METADATA").touch()
        probe = {
            "task": "clip_multi",
            "encoders": {"checkpoint": {"metrics": {"mAP": 1 - 0.9 * (run.index + 1) ** -0.3}}},
        }
        inputs = {"step": run.steps, "train": "unused", "test": "unused", "args": []}
        (wd / "probe.json").write_text(json.dumps({**probe, "_inputs": inputs}))
    return root


def _png_is_a_real_plot(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= 600, img.shape
    rgb = img[..., :3].reshape(-1, 3)
    colours = np.unique((rgb * 255).astype(np.uint8), axis=0)
    assert len(colours) > 100  # lines, markers, text, a shaded band: not a blank or single-colour image
    assert (rgb.mean(axis=1) < 0.5).mean() > 0.005  # some dark ink (axes, labels, curves)


def test_scaling_cli_writes_table_csv_fits_and_plots(fake_sweep, capsys):
    out = fake_sweep / "scaling"
    assert scaling.main([str(fake_sweep), "--probe-train", "unused", "--probe-test", "unused"]) == 0
    printed = capsys.readouterr().out
    assert "loss_vs_compute (frontier:" in printed and "wrote " in printed
    rows = list(csv.DictReader(open(out / "scaling.csv")))
    assert [r["run"] for r in rows] == [r.name for r in sweep.load_plan(fake_sweep).runs]
    by = {r["run"]: r for r in rows}
    small, big = by["width32-steps300"], by["width128-steps300"]
    assert int(small["params"]) < int(big["params"])
    assert int(small["clips"]) == 300 * 16 and float(small["flops"]) == pytest.approx(
        300 * float(small["step_flops"]), rel=1e-5
    )
    assert small["grid.model.width"] == "32" and small["state"] == "done"
    # Final loss = the mean over the last 10 % of the steps: within the warm-up factor of the power law.
    c = float(small["flops"])
    assert 30 * c**TRUE_B < float(small["final_loss"]) < 30 * c**TRUE_B * 1.01
    assert float(small["probe_score"]) == pytest.approx(1 - 0.9 * 2**-0.3, rel=1e-5)

    fits = json.loads((out / "fits.json").read_text())
    # The final points all lie (up to the tail mean) on L = 30 C^-0.12: the frontier fit recovers it.
    assert fits["loss_vs_compute"]["fit"]["b"] == pytest.approx(TRUE_B, abs=0.005)
    assert set(fits) >= {"loss_vs_params", "loss_vs_clips", "probe_error_vs_compute", "refused"}
    for name in ("loss_vs_compute.png", "loss_vs_params.png", "loss_vs_clips.png", "probe_vs_compute.png"):
        _png_is_a_real_plot(out / name)


def test_scaling_cli_refuses_a_fit_in_one_line_and_bad_input(tmp_path, fake_sweep, capsys):
    # Only one run finished: every fit is refused with one line each; the table and files are still written.
    root = tmp_path / "one"
    plan = sweep.make_plan(str(root), CONFIG, "seed=0", {"model.depth": "2", "train.steps": "10"})
    sweep.write_plan(plan)
    wd = root / "seed0"
    (wd / "metrics.jsonl").write_text('{"step": 10, "loss": 1.5}\n')
    (wd / "checkpoints" / "10").mkdir(parents=True)
    (wd / "checkpoints" / "10" / "_CHECKPOINT_METADATA").touch()
    assert scaling.main([str(root)]) == 0
    out = capsys.readouterr().out
    refused = [line for line in out.splitlines() if "fit refused" in line]
    assert refused == [
        f"  fit refused: {name}: cannot fit a power law (2 parameters) to 1 point"
        for name in ("loss_vs_compute", "loss_vs_params", "loss_vs_clips")
    ]
    assert (root / "scaling" / "scaling.csv").exists()
    assert scaling.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sweep.json" in err
    assert scaling.main([str(fake_sweep), "--window", "0"]) == 2


@pytest.mark.parametrize("method", ["atst_frame", "atst_clip", "asit"])
def test_method_configs_accept_the_whole_size_ladder(method):
    import importlib.util

    from atst_jax.train import load_config

    spec = importlib.util.spec_from_file_location("_ladder_common", sweep.REPO / "configs" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    assert list(common.MODELS)[-2:] == ["xl", "xxl"] and common.MODELS["xxl"][:2] == (1280, 32)
    for variant, (width, depth, heads) in common.MODELS.items():
        c = load_config(f"{sweep.REPO}/configs/{method}.py:{variant}")
        assert (c.model.width, c.model.depth, c.model.heads) == (width, depth, heads)
        assert width % heads == 0


def test_the_probe_cache_is_keyed_by_every_input_of_the_probe(fake_sweep, monkeypatch):
    """A cached probe score is reused only for the same step, train / test sets and evaluate arguments;
    another of any of them runs the probe again (here a stand-in evaluate that fails, so reuse would pass)."""
    calls = []

    def fake_evaluate(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 2, "", "error: stand-in evaluate")

    monkeypatch.setattr(scaling.subprocess, "run", fake_evaluate)
    wd = sorted(p for p in fake_sweep.iterdir() if (p / "probe.json").exists())[0]
    step = json.loads((wd / "probe.json").read_text())["_inputs"]["step"]
    probe = {"train": "unused", "test": "unused"}
    assert scaling.probe_score(wd, step, probe, None, [])["score"] > 0 and not calls
    for args in [
        (step, {"train": "other", "test": "unused"}, []),
        (step, {"train": "unused", "test": "other"}, []),
        (step, probe, ["--epochs", "20"]),
        (step + 1, probe, []),
    ]:
        with pytest.raises(scaling.FitError, match="stand-in evaluate"):
            scaling.probe_score(wd, args[0], args[1], None, args[2])
    assert len(calls) == 4


def test_runs_trained_with_another_config_are_left_out_of_the_fits(tmp_path, capsys, monkeypatch):
    """The sweep's ownership check reaches the analysis: a run whose checkpoint was trained with another
    config (here another width, in a root whose config changed under it) is reported in one line and its
    numbers are neither tabled, fitted nor drawn as this run's."""
    root = tmp_path / "sweep"
    fixed = {"model.depth": "2"}
    plan = sweep.make_plan(str(root), CONFIG, "train.steps=10,20,40", fixed)
    sweep.write_plan(plan)
    for run in plan.runs:
        wd = root / run.name
        wd.joinpath("metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 10 * s**-0.1}) + "\n" for s in range(1, run.steps + 1))
        )
        ck = wd / "checkpoints" / str(run.steps)
        (ck / "config").mkdir(parents=True)
        (ck / "_CHECKPOINT_METADATA").touch()
        overrides = {**fixed, **run.overrides}
        if run.name == "steps40":
            overrides["model.width"] = "64"  # the tiny variant's is 128
        saved = sweep.run_config(CONFIG, overrides).to_json_best_effort()
        (ck / "config" / "metadata").write_text(saved)
    for plot in ("plot_compute", "plot_against"):  # drawn by the test above; the table and fits suffice here
        monkeypatch.setattr(scaling, plot, lambda *args, **kwargs: None)
    assert scaling.main([str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "warning: run steps40 was trained with another config than the sweep's (model.width: 64 -> 128): it "
        "is left out of the table's numbers, the fits and the plots"
    ]
    rows = {r["run"]: r for r in csv.DictReader(open(root / "scaling" / "scaling.csv"))}
    assert [rows[n]["state"] for n in ("steps10", "steps20", "steps40")] == ["done", "done", "foreign"]
    assert rows["steps40"]["steps"] == "0" and rows["steps40"]["final_loss"] == "nan"
    fits = json.loads((root / "scaling" / "fits.json").read_text())
    assert fits["loss_vs_compute"]["runs"] == ["steps10", "steps20"]


def test_a_failed_or_partial_probe_is_never_scored(tmp_path):
    """evaluate records a metric that failed as null (its error beside it) and writes RESULTS.json while it
    runs: a null is one line naming the cause, and a run's own probe still in progress is not scored."""
    from atst_jax.tools import scaling

    results = {
        "task": "clip",
        "encoders": {"checkpoint": {"metrics": {"mAP": None}, "errors": {"mAP": "boom"}}},
    }
    with pytest.raises(scaling.FitError, match=r"could not compute it \(boom\)"):
        scaling._score(results, None, tmp_path)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "RESULTS.json").write_text(json.dumps({**results, "complete": False}))
    assert scaling._own_final_probe(tmp_path) is None
    (tmp_path / "probe" / "RESULTS.json").write_text(json.dumps({**results, "complete": True}))
    assert scaling._own_final_probe(tmp_path)["complete"] is True
