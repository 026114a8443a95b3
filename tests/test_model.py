"""FrameAST encoder: sizes, token layout, masking, padding, and parity with an independent NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from atst_jax.models.encoder import EncoderConfig, FrameAST, count_params

TINY = EncoderConfig(width=64, depth=2, heads=2, drop_path=0.0)


@pytest.mark.parametrize(
    "width,depth,heads,expected",
    [(768, 12, 12, 85_419_264), (384, 12, 6, 21_475_968)],
)
def test_official_parameter_counts(width, depth, heads, expected):
    cfg = EncoderConfig(width=width, depth=depth, heads=heads)
    model = nnx.eval_shape(lambda: FrameAST(cfg, rngs=nnx.Rngs(0)))
    assert count_params(model) == expected


def test_every_parameter_has_logical_axes():
    model = FrameAST(TINY, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("axes")
        assert axes is not None, path
        ndim = var.get_value().ndim
        assert len(axes) in (ndim, ndim - 1), (path, axes, ndim)  # stacked layers add the 'layers' dim


def test_patch_index_is_mel_major():
    """Token n, feature m*4+t must be spec[mel m, frame 4n+t] (official PatchEmbed_v2 layout)."""
    model = FrameAST(TINY, rngs=nnx.Rngs(0))
    spec = np.arange(64 * 12, dtype=np.float32).reshape(1, 64, 12)
    patches = np.asarray(model.patchify(jnp.asarray(spec)))
    assert patches.shape == (1, 3, 256)
    for n in range(3):
        for m in (0, 5, 63):
            for t in range(4):
                assert patches[0, n, m * 4 + t] == spec[0, m, 4 * n + t]


def test_mask_token_replaces_masked_patches_before_positions():
    model = FrameAST(TINY, rngs=nnx.Rngs(0))
    spec = jax.random.normal(jax.random.key(0), (1, 64, 40))
    mask = jnp.zeros((1, 10), bool).at[0, 3].set(True)
    x = model.embed(spec, mask)
    expected = model.mask_embed[...][0, 0] + model.pos_embed[...][0, 4]  # token 3 uses slot 4 (slot 0 unused)
    np.testing.assert_allclose(x[0, 3], expected, rtol=1e-6, atol=1e-6)
    unmasked = model.embed(spec, None)
    np.testing.assert_allclose(x[0, 4], unmasked[0, 4], rtol=1e-6)


def test_padding_does_not_leak_into_valid_tokens():
    model = FrameAST(TINY, rngs=nnx.Rngs(0))
    spec = jax.random.normal(jax.random.key(0), (1, 64, 80))
    noise = jax.random.normal(jax.random.key(1), (1, 64, 40)) * 5
    spec2 = spec.at[:, :, 40:].set(noise)
    length = jnp.array([40])
    a = model(spec, length)
    b = model(spec2, length)
    # -10000 on padded keys: softmax weight exp(-10000) is exactly 0 in fp32.
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)


def test_scan_and_unrolled_layers_agree():
    rngs_a, rngs_b = nnx.Rngs(0), nnx.Rngs(0)
    a = FrameAST(TINY, rngs=rngs_a)
    cfg_b = EncoderConfig(**{**TINY.__dict__, "scan_layers": False})
    b = FrameAST(cfg_b, rngs=rngs_b)
    nnx.update(b, nnx.state(a))
    spec = jax.random.normal(jax.random.key(3), (2, 64, 64))
    length = jnp.array([64, 50])
    np.testing.assert_allclose(a(spec, length), b(spec, length), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_remat_policies_give_the_same_gradients(scan):
    """Rematerialisation trades memory for recompute; values and gradients (with drop-path on, so the
    recomputed forward must replay the same random keys) must not change."""
    spec = jax.random.normal(jax.random.key(3), (2, 64, 64))
    length = jnp.array([64, 50])
    base = FrameAST(
        EncoderConfig(**{**TINY.__dict__, "drop_path": 0.2, "scan_layers": scan}), rngs=nnx.Rngs(0)
    )
    state = nnx.state(base, nnx.Param)

    def grads(remat):
        cfg = EncoderConfig(**{**TINY.__dict__, "drop_path": 0.2, "scan_layers": scan, "remat": remat})
        graphdef, _ = nnx.split(FrameAST(cfg, rngs=nnx.Rngs(1)), nnx.Param)

        def loss(params):
            out = nnx.merge(graphdef, params)(spec, length, train=True, key=jax.random.key(7))
            return jnp.mean(jnp.square(out - 0.3))

        return jax.jit(jax.value_and_grad(loss))(state)

    ref_loss, ref = grads("none")
    for policy in ("full", "save_dots"):
        got_loss, got = grads(policy)
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


# --- an independent reference: the FrameAST forward pass written directly in NumPy (float64) ---------
def _np_layernorm(x, g, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _np_reference(params, spec, length, cfg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    bsz, f, t = spec.shape
    n = t // 4
    # PatchEmbed_v2: 'b c (h p1) (w p2) -> b (w h) (p1 p2 c)'
    tokens = np.stack([spec[:, :, 4 * i : 4 * i + 4].reshape(bsz, f * 4) for i in range(n)], axis=1)
    x = tokens @ p["patch_embed"]["kernel"] + p["patch_embed"]["bias"]
    x = x + p["pos_embed"][:, 1 : n + 1]
    plen = (length - length % 4) // 4
    bias = np.where(np.arange(n)[None, :] >= plen[:, None], -10000.0, 0.0)
    h, hd = cfg.heads, cfg.width // cfg.heads
    blk = p["blocks"]
    for layer in range(cfg.depth):
        g = jax.tree.map(lambda a, layer=layer: a[layer], blk)
        y = _np_layernorm(x, g["norm1"]["scale"], g["norm1"]["bias"])
        wqkv = g["attn"]["qkv"]["kernel"].reshape(cfg.width, 3 * cfg.width)  # columns [q; k; v], head-major
        qkv = y @ wqkv
        q, k, v = (qkv[..., i * cfg.width : (i + 1) * cfg.width].reshape(bsz, n, h, hd) for i in range(3))
        att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + bias[:, None, None, :]
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(bsz, n, cfg.width)
        x = x + o @ g["attn"]["proj"]["kernel"].reshape(cfg.width, cfg.width) + g["attn"]["proj"]["bias"]
        y = _np_layernorm(x, g["norm2"]["scale"], g["norm2"]["bias"])
        hid = y @ g["mlp"]["fc1"]["kernel"] + g["mlp"]["fc1"]["bias"]
        hid = 0.5 * hid * (1 + erf(hid / np.sqrt(2)))  # exact GELU
        x = x + hid @ g["mlp"]["fc2"]["kernel"] + g["mlp"]["fc2"]["bias"]
    return _np_layernorm(x, p["norm"]["scale"], p["norm"]["bias"])


def test_forward_matches_numpy_reference():
    model = FrameAST(TINY, rngs=nnx.Rngs(7))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    spec = np.random.default_rng(0).normal(size=(2, 64, 101)).astype(np.float32)
    length = np.array([101, 70])
    ours = np.asarray(model(jnp.asarray(spec), jnp.asarray(length)))
    ref = _np_reference(params, spec.astype(np.float64), length, TINY)
    valid = 17  # tokens valid in both examples; padded queries differ only in what they attend to
    np.testing.assert_allclose(ours[:, :valid], ref[:, :valid], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(ours[0], ref[0], rtol=2e-4, atol=2e-4)


def test_gelu_is_exact_not_tanh():
    from atst_jax.models.layers import gelu_exact

    x = jnp.linspace(-4, 4, 101)
    ref = 0.5 * np.asarray(x) * (1 + erf(np.asarray(x) / np.sqrt(2)))
    np.testing.assert_allclose(gelu_exact(x), ref, atol=1e-6)
    assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - ref).max() > 1e-4


def test_drop_path_is_per_sample_and_rescaled():
    from atst_jax.models.encoder import drop_path

    x = jnp.ones((4000, 3, 2))
    y = np.asarray(drop_path(x, 0.25, jax.random.key(0)))
    per_sample = y.reshape(4000, -1)
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03


def test_intermediate_features_concatenate_last_blocks():
    model = FrameAST(TINY, rngs=nnx.Rngs(0))
    spec = jax.random.normal(jax.random.key(0), (1, 64, 40))
    feats = model.intermediate_features(spec, jnp.array([40]), n=2)
    assert feats.shape == (1, 10, 2 * TINY.width)
    np.testing.assert_allclose(feats[..., TINY.width :], model(spec, jnp.array([40])), rtol=1e-5, atol=1e-5)
