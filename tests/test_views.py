"""On-device masks and augmentations against independent NumPy references of the official algorithms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atst_jax.data import views


def _fairseq_static_mask(rng, n, ratio=0.65, span=5, min_spans=2):
    """fairseq compute_mask_indices(mask_type='static', no_overlap=False) for one unpadded example."""
    num = max(min_spans, int(ratio * n / span + rng.random()))
    starts = rng.choice(n - span, num, replace=False)
    idx = np.unique(np.concatenate([starts + o for o in range(span)]))
    m = np.zeros(n, bool)
    m[idx[idx < n]] = True
    return m


def test_span_mask_fraction_over_10000_samples():
    mask = np.asarray(views.span_mask(jax.random.key(0), 10_000, 250, ratio=0.65, span=5, min_spans=2))
    frac = mask.mean()
    assert 0.45 <= frac <= 0.55, frac
    rng = np.random.default_rng(0)
    ref = np.mean([_fairseq_static_mask(rng, 250).mean() for _ in range(10_000)])
    assert abs(frac - ref) < 0.005, (frac, ref)  # same distribution as the official sampler
    # Every masked run is at least one span long (spans may overlap/merge but never shrink).
    for row in mask[:200]:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        runs = edges[1::2] - edges[::2]
        assert runs.min() >= 5 and len(runs) >= 1
    assert mask.sum(1).min() >= 5 * 1 and mask.sum(1).max() <= views.mask_capacity(250, 0.65, 5, 2)


def test_span_mask_respects_min_spans_on_short_inputs():
    mask = np.asarray(views.span_mask(jax.random.key(1), 500, 12, ratio=0.65, span=5, min_spans=2))
    assert (mask.sum(1) >= 5).all()  # two spans, possibly overlapping: at least 5 tokens


def test_gather_masked_returns_all_masked_tokens_in_order():
    mask = jnp.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 1]], bool)
    idx, valid = views.gather_masked(mask, 4)
    assert idx.tolist()[0][:3] == [1, 2, 4] and valid.tolist()[0] == [True, True, True, False]
    assert idx.tolist()[1][:2] == [0, 5] and valid.tolist()[1] == [True, True, False, False]


def _torch_bicubic_rows(crop, out_rows):
    """F.interpolate(mode='bicubic', align_corners=True) along rows only, written per output pixel."""
    a = -0.75
    h = crop.shape[0]

    def w(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    out = np.zeros((out_rows, crop.shape[1]))
    scale = (h - 1) / (out_rows - 1) if out_rows > 1 else 0.0
    for i in range(out_rows):
        s = scale * i
        i0 = int(np.floor(s))
        t = s - i0
        for k in range(-1, 3):
            src = min(max(i0 + k, 0), h - 1)
            out[i] += w(k - t) * crop[src]
    return out


@pytest.mark.parametrize("height,offset", [(64, 0), (40, 10), (63, 1), (1, 30), (38, 26), (17, 0)])
def test_freq_warp_matrix_matches_torch_bicubic(height, offset):
    x = np.random.default_rng(height).normal(size=(64, 7))
    mat = views.freq_warp_matrix(jnp.array([height]), jnp.array([offset]), 64)[0]
    ours = np.asarray(mat) @ x
    ref = _torch_bicubic_rows(x[offset : offset + height], 64)
    np.testing.assert_allclose(ours, ref, atol=5e-5)  # float32 source coordinates vs float64


def test_freq_warp_leaves_time_untouched_and_samples_the_official_range():
    x = jnp.tile(jnp.arange(64, dtype=jnp.float32)[None, :, None], (2000, 1, 3))
    y = np.asarray(views.freq_warp(jax.random.key(0), x))
    np.testing.assert_allclose(y[..., 0], y[..., 2])  # identical in every frame
    # On a linear ramp, bicubic resize is exact: slope = (h-1)/63 with h = clip(int(U(0.6,1.5)*64), 1, 64).
    slopes = (y[:, -1, 0] - y[:, 0, 0]) / 63
    heights = np.round(slopes * 63 + 1).astype(int)
    assert heights.min() >= int(0.6 * 64) and heights.max() == 64
    assert 0.50 < (heights == 64).mean() < 0.61  # P(U(0.6, 1.5) >= 1) = 0.5/0.9 ≈ 0.556
    offsets = y[:, 0, 0]
    assert (offsets >= 0).all() and (offsets + heights - 1 <= 63 + 1e-4).all()


@pytest.mark.parametrize(
    "h,i,w,j", [(64, 0, 40, 0), (40, 10, 55, 5), (30, 34, 60, 0), (64, 0, 1, 59), (50, 7, 33, 20)]
)
def test_resize_crop_matches_torch_bicubic_on_the_virtual_canvas(h, i, w, j):
    """ATST-Clip's RandomResizeCrop: the input centred on a zero canvas of 1.5× its frames, the crop resized
    back with bicubic (align_corners=True) on both axes — the same numbers as doing that literally."""
    f, t = 64, 40
    canvas_t = int(t * 1.5)
    x = np.random.default_rng(h + w).normal(size=(f, t))
    canvas = np.zeros((f, canvas_t))
    start = (canvas_t - t) // 2
    canvas[:, start : start + t] = x
    crop = canvas[i : i + h, j : j + w]
    ref = _torch_bicubic_rows(_torch_bicubic_rows(crop, f).T, t).T  # separable: rows, then columns
    ours = views.resize_crop(
        jnp.asarray(x[None], jnp.float32),
        jnp.array([h]),
        jnp.array([i]),
        jnp.array([w]),
        jnp.array([j]),
        canvas_t,
    )
    np.testing.assert_allclose(np.asarray(ours[0]), ref, atol=1e-4)


def test_random_resize_crop_samples_the_official_ranges():
    """Sizes clip(int(U(0.6, 1.5)·size), 1, canvas) per axis; identity is reachable; time may zoom out."""
    x = jnp.ones((512, 64, 40), jnp.float32)
    y = np.asarray(views.random_resize_crop(jax.random.key(1), x))
    assert y.shape == x.shape and np.isfinite(y).all()
    # A zero canvas around a constant input: zoomed-out crops (time size > 40) show zeros at some frames.
    zoomed_out = (y.min(axis=(1, 2)) < 0.5).mean()
    assert 0.2 < zoomed_out < 0.95


def test_mixup_formula_and_partner():
    b = 64
    x = jax.random.normal(jax.random.key(0), (b, 4, 5))
    y = np.asarray(views.mixup(jax.random.key(1), x, 0.4))
    xn = np.asarray(x, np.float64)
    # Recover λ and the partner: y = log((1-λ)e^x + λ e^z + eps) for some shift s ∈ [1, b).
    found = False
    for s in range(1, b):
        z = np.roll(xn, s, axis=0)
        lam = (np.exp(y) - np.exp(xn) - np.finfo(np.float32).eps) / (np.exp(z) - np.exp(xn))
        lam_ex = np.median(lam.reshape(b, -1), axis=1)
        recon = np.log((1 - lam_ex[:, None, None]) * np.exp(xn) + lam_ex[:, None, None] * np.exp(z) + 1.19e-7)
        if np.allclose(recon, y, atol=1e-4):
            found = True
            assert (lam_ex >= -1e-4).all() and (lam_ex <= 0.4 + 1e-4).all()
            assert lam_ex.std() > 0.05  # λ drawn per example
    assert found
