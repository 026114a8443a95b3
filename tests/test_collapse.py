"""Encoder-level collapse monitors and the within-clip variance / covariance regulariser
(atst_jax/models/collapse.py), against NumPy written from their definitions."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_train

from atst_jax.models import collapse


def _tokens(seed=0, b=5, n=12, d=6, lengths=(12, 9, 12, 1, 4)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, d)).astype(np.float32) * rng.uniform(0.2, 2.0, d).astype(np.float32)
    x += rng.standard_normal((b, 1, d)).astype(np.float32)  # a clip constant, as real features have
    valid = np.arange(n)[None, :] < np.asarray(lengths)[:, None]
    x[~valid] = 1e3  # padding must not count
    return x, valid


def _np_spread(x, valid, target):
    d = x.shape[-1]
    hinges, stds, centred = [], [], []
    for xi, vi in zip(x, valid, strict=True):
        t = xi[vi].astype(np.float64)
        if len(t) == 0:
            continue
        c = t - t.mean(axis=0)
        centred.append(c)
        if len(t) >= 2:
            std = np.sqrt(c.var(axis=0, ddof=1) + 1e-4)
            hinges.append(np.maximum(target - std, 0.0))
            stds.append(std)
    c = np.concatenate(centred)
    cov = c.T @ c / (len(c) - len(centred))
    off = cov - np.diag(np.diag(cov))
    return np.mean(hinges), np.sum(off**2) / d, np.mean(stds)


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0])
def test_spread_terms_match_their_definition(target):
    x, valid = _tokens()
    var_loss, cov_loss, within_std = collapse.spread_terms(jnp.asarray(x), jnp.asarray(valid), target)
    want = _np_spread(x, valid, target)
    np.testing.assert_allclose([var_loss, cov_loss, within_std], want, rtol=2e-5, atol=1e-7)


def test_spread_terms_vanish_for_spread_out_decorrelated_tokens():
    # Within each clip: ±1 on one dimension at a time (orthogonal, equal spread): std >= target, no covariance.
    eye = np.eye(4, dtype=np.float32)
    clip = np.concatenate([eye, -eye])  # [8, 4], zero mean, per-dimension std sqrt(2 / 7) ≈ 0.53
    x = np.stack([clip + 5.0, clip - 3.0])
    valid = np.ones(x.shape[:2], bool)
    var_loss, cov_loss, _ = collapse.spread_terms(jnp.asarray(x), jnp.asarray(valid), 0.5)
    assert float(var_loss) == 0.0 and float(cov_loss) == pytest.approx(0.0, abs=1e-12)
    # A clip collapsed to one vector pays the whole target on every dimension.
    flat = np.stack([np.full((8, 4), 2.0, np.float32)] * 2)
    var_loss, _, within = collapse.spread_terms(jnp.asarray(flat), jnp.asarray(valid), 0.7)
    assert float(var_loss) == pytest.approx(0.7 - 0.01, rel=1e-5) and float(within) == pytest.approx(0.01)


def test_within_clip_share():
    x, valid = _tokens(1)
    got = float(collapse.within_clip_share(jnp.asarray(x), jnp.asarray(valid)))
    rows = [xi[vi].astype(np.float64) for xi, vi in zip(x, valid, strict=True)]
    everything = np.concatenate(rows)
    within = sum(((r - r.mean(0)) ** 2).sum() for r in rows)
    assert got == pytest.approx(within / ((everything - everything.mean(0)) ** 2).sum(), rel=1e-5)
    # One vector per clip: nothing varies within clips. Equal clip means: everything does.
    const = np.repeat(np.random.default_rng(2).standard_normal((3, 1, 5)), 7, axis=1)
    ones = np.ones(const.shape[:2], bool)
    assert float(collapse.within_clip_share(jnp.asarray(const), jnp.asarray(ones))) == pytest.approx(
        0.0, abs=1e-6
    )
    centred = (
        const - const.mean(axis=1, keepdims=True) + np.random.default_rng(3).standard_normal(const.shape)
    )
    centred -= centred.mean(axis=1, keepdims=True)
    assert float(collapse.within_clip_share(jnp.asarray(centred), jnp.asarray(ones))) == pytest.approx(1.0)


def test_effective_dim_is_the_participation_ratio():
    x, valid = _tokens(4)
    got = float(collapse.effective_dim(jnp.asarray(x), jnp.asarray(valid)))
    t = x[valid].astype(np.float64)
    lam = np.linalg.eigvalsh(np.cov(t.T, bias=True))
    assert got == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-4)
    # One direction → 1; an isotropic cloud in D dimensions → D.
    rng = np.random.default_rng(5)
    line = rng.standard_normal((4, 50, 1)) * rng.standard_normal((1, 1, 8))
    full = np.ones((4, 50), bool)
    assert float(collapse.effective_dim(jnp.asarray(line), jnp.asarray(full))) == pytest.approx(1.0, rel=1e-4)
    iso = rng.standard_normal((40, 500, 8))
    assert float(collapse.effective_dim(jnp.asarray(iso), jnp.ones((40, 500), bool))) == pytest.approx(
        8, rel=0.01
    )


def test_health_warning_needs_the_whole_patience_under_the_floor(capsys):
    """The progress line warns only once a monitor has been under its floor at every logged step for
    ``health_patience`` steps; a recovery starts the count again; a floor of 0 is off; TensorBoard gets
    ``health/warning``."""
    from atst_jax.metrics import Progress

    class Sink:
        rows = []

        def write(self, step, scalars):
            self.rows.append(dict(scalars))

    progress = Progress(
        100,
        4,
        0,
        monitors=collapse.HEALTH_MONITORS,
        health_min={"within_tea": 0.1, "dim_tea": 0},
        health_patience=20,
    )
    sink = Sink()
    within = {10: 0.3, 20: 0.05, 30: 0.05, 40: 0.2, 50: 0.05, 60: 0.04, 70: 0.03, 80: 0.02}
    lines = {}
    for step, value in within.items():
        metrics = {"loss": 1.0, "lr": 1e-4, "within_tea": value, "dim_tea": 0.5}
        progress.maybe_log(step, metrics, sink, log_every=10)
        lines[step] = capsys.readouterr().out
    warned = [step for step, out in lines.items() if "| WARNING within_tea" in out]
    assert warned == [70, 80]  # under since 50 (the dip at 20-30 recovered at 40); dim_tea's floor is off
    assert "since step 50" in lines[70] and "warning: within_tea has stayed under 0.1" in lines[70]
    assert "warning: within_tea" not in lines[80]  # the explanation once; the progress-line tag every time
    assert [r["health/warning"] for r in sink.rows] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert "within_tea 0.0200 | dim_tea 0.5000" in lines[80]  # both monitors on the progress line


# ----------------------------------------------------------------------------------------------------------
# In training: ATST-Frame's features collapse within clips, and the terms keep them apart
# ----------------------------------------------------------------------------------------------------------
def _demo_run(workdir, cache, *overrides):
    """100 steps of the CPU demo's recipe (configs/atst_frame.py:demo) at batch 16 (peak LR unchanged), no
    probe; returns the mean within_tea and dim_tea over steps 1-20 and over steps 60-100."""
    args = [
        "--workdir", str(workdir), f"--config.data.cache_dir={cache}", "--config.data.num_clips=64",
        "--config.probe.train=", "--config.train.steps=100", "--config.train.global_batch=16",
        "--config.optim.base_lr=4e-3", "--config.train.ckpt_every=1000", "--config.train.image_every=0",
        *overrides,
    ]  # fmt: skip
    proc = run_train(args, optimized=True, variant="demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "within_tea" in proc.stdout and "dim_tea" in proc.stdout  # on the progress line
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    early = [r for r in rows if r["step"] <= 20]
    late = [r for r in rows if r["step"] >= 60]
    return {
        k: (np.mean([r[k] for r in early]), np.mean([r[k] for r in late])) for k in ("within_tea", "dim_tea")
    }


def test_frame_byol_collapses_within_clips_and_the_spread_terms_prevent_it(tmp_path, embedded_cache):
    """The monitors see what the projector-side std_frm_* cannot: plain frame BYOL takes variation out of each
    clip's teacher tokens and out of their dimensions; the demo's within-clip variance / covariance terms keep
    both. (Measured on seeds 0 and 1, 64 clips: within_tea late 0.18 / 0.15 without the terms, 0.28 / 0.27
    with; dim_tea 3.9 / 4.0 against 6.5 / 7.0.)"""
    off = _demo_run(tmp_path / "off", embedded_cache, "--config.atst_frame.var_weight=0",
                    "--config.atst_frame.cov_weight=0")  # fmt: skip
    on = _demo_run(tmp_path / "on", embedded_cache)
    assert off["within_tea"][1] < off["within_tea"][0], off
    assert on["within_tea"][1] > 0.9 * on["within_tea"][0], on
    assert on["within_tea"][1] > 1.3 * off["within_tea"][1], (on, off)
    assert on["dim_tea"][1] > 1.3 * off["dim_tea"][1], (on, off)


def test_a_collapsing_encoder_raises_the_health_warning(tmp_path, embedded_cache):
    """A run whose encoder collapses (every weight decayed towards zero: AdamW decay 5e3 at peak LR 1e-4 takes
    up to half of each weight per step, so the teacher's tokens fall onto about one direction) is flagged on
    the progress line once dim_tea has stayed under its floor (2) for health_patience steps, and not before.
    (within_tea falls too, from 0.54 to under 0.06, but batch to batch it is too noisy for an exact step.)"""
    args = [
        "--workdir", str(tmp_path / "run"), f"--config.data.cache_dir={embedded_cache}",
        "--config.data.num_clips=64", "--config.probe.train=", "--config.train.steps=30",
        "--config.train.global_batch=8", "--config.train.log_every=5", "--config.train.ckpt_every=1000",
        "--config.train.image_every=0", "--config.model.depth=1", "--config.atst_frame.crop_seconds=1.0",
        "--config.optim.warmup_steps=1", "--config.optim.base_lr=3.2e-3", "--config.optim.wd_start=5e3",
        "--config.optim.wd_end=5e3",
        "--config.optim.ema=0", "--config.train.health_patience=10",
    ]  # fmt: skip
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {
        int(line.split()[1].split("/")[0]): line
        for line in proc.stdout.splitlines()
        if line.startswith("step ")
    }
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["within_tea"] > 0.1 and rows[0]["dim_tea"] > 4.0, rows[0]  # healthy at initialisation
    # Collapsed onto about one direction from step 10 on (measured: 7.1, 7.3, then 1.15 … 1.02).
    since = min(r["step"] for r in rows if all(q["dim_tea"] < 1.5 for q in rows if q["step"] >= r["step"]))
    assert since <= 15, rows
    warned = [step for step, line in lines.items() if "| WARNING dim_tea" in line]
    assert warned == [s for s in sorted(lines) if s >= since + 10], (warned, since)  # only after the patience
    assert proc.stdout.count("warning: dim_tea has stayed under 2") == 1  # the explanation once
