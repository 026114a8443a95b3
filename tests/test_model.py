"""FrameAST encoder: sizes, token layout, masking, padding, parity with an independent NumPy reference, the
frozen ATST parameter tree, the trunk on gathered tokens, and the cross-attention block."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from atst_jax.models.attention import CrossBlock
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


def _np_frame_embed(p, spec):
    """PatchEmbed_v2 ('b c (h p1) (w p2) -> b (w h) (p1 p2 c)'), projection, positions slots 1..N."""
    bsz, f, t = spec.shape
    n = t // 4
    tokens = np.stack([spec[:, :, 4 * i : 4 * i + 4].reshape(bsz, f * 4) for i in range(n)], axis=1)
    x = tokens @ p["patch_embed"]["kernel"] + p["patch_embed"]["bias"]
    return x + p["pos_embed"][:, 1 : n + 1]


def _np_trunk(p, x, bias, cfg):
    """The blocks and the final norm on tokens ``x [B, K, D]`` with an additive key bias ``[B, K]``."""
    bsz, n, _ = x.shape
    h, hd = cfg.heads, cfg.width // cfg.heads
    blk = p["blocks"]
    for layer in range(cfg.depth):
        g = jax.tree.map(lambda a, layer=layer: a[layer], blk)
        y = _np_layernorm(x, g["norm1"]["scale"], g["norm1"]["bias"])
        wqkv = g["attn"]["qkv"]["kernel"].reshape(cfg.width, 3 * cfg.width)  # columns [q; k; v], head-major
        qkv = y @ wqkv
        if "bias" in g["attn"]["qkv"]:
            qkv = qkv + g["attn"]["qkv"]["bias"].reshape(3 * cfg.width)
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


def _np_reference(params, spec, length, cfg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = _np_frame_embed(p, spec)
    n = x.shape[1]
    plen = (length - length % 4) // 4
    bias = np.where(np.arange(n)[None, :] >= plen[:, None], -10000.0, 0.0)
    return _np_trunk(p, x, bias, cfg)


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


# --- the ATST parameter tree is frozen: paths, shapes and values for a given key ---------------------
def _state_digest(model) -> str:
    h = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(model)), key=lambda pv: tuple(map(str, pv[0]))):
        a = np.asarray(var.get_value())
        h.update(("/".join(map(str, path)) + f"|{type(var).__name__}|{a.dtype}|{a.shape}").encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# Recorded from the encoder before it was split into stem + trunk (jax/flax as pinned in requirements.txt).
# If these change while test_frame_init_follows_the_atst_draw_order still passes, JAX's random numbers
# changed, not the model; if both fail, the model's parameter tree or draw order changed — existing
# checkpoints, exports and recorded training digests would no longer match.
_GOLDEN_STATE = {
    "w128d4h2": (
        dict(width=128, depth=4, heads=2),
        "70d57ab340e52c4cd57fa6b400b7771899ca6a1140d60c91f90a7ad760e6ba34",
    ),
    "w128d4h2_cls": (
        dict(width=128, depth=4, heads=2, use_cls=True),
        "9108e783b7687b862817c70f7c0930b632bbc8515816dce0e68e48a20516ff67",
    ),
    "w128d4h2_noscan": (
        dict(width=128, depth=4, heads=2, scan_layers=False),
        "70d57ab340e52c4cd57fa6b400b7771899ca6a1140d60c91f90a7ad760e6ba34",
    ),
    "w64d2h2_cls_pos17": (
        dict(width=64, depth=2, heads=2, use_cls=True, num_pos=17),
        "795e2a8a0c4efc2d30e74a4c2ae4b85ad8aa9dc835569b6edc4d0d2ea72ddcff",
    ),
}


@pytest.mark.parametrize("name", sorted(_GOLDEN_STATE))
def test_frame_parameter_tree_matches_golden_hash(name):
    kwargs, expected = _GOLDEN_STATE[name]
    model = FrameAST(EncoderConfig(**kwargs), rngs=nnx.Rngs(params=jax.random.key(0)))
    assert _state_digest(model) == expected


@pytest.mark.parametrize("use_cls", [False, True])
def test_frame_init_follows_the_atst_draw_order(use_cls):
    """An independent statement of the init: draws from the params stream in the order patch kernel,
    mask token, positions, CLS, one key split into per-block keys (each block: qkv, proj, fc1, fc2)."""
    cfg = EncoderConfig(width=64, depth=3, heads=2, use_cls=use_cls)
    d, hd = cfg.width, cfg.head_dim

    def tn(k, shape):
        return jax.random.truncated_normal(k, -100.0, 100.0, shape, jnp.float32) * 0.02

    r = nnx.Rngs(params=jax.random.key(3))
    expected = {"patch_embed": {"kernel": tn(r.params(), (256, d)), "bias": jnp.zeros(d)}}
    expected["mask_embed"] = tn(r.params(), (1, 1, d))
    expected["pos_embed"] = tn(r.params(), (1, cfg.num_pos, d))
    if use_cls:
        expected["cls_token"] = tn(r.params(), (1, 1, d))
    blocks = []
    for k in jax.random.split(r.params(), cfg.depth):
        rb = nnx.Rngs(params=k)
        blocks.append(
            {
                "attn": {
                    "qkv": {"kernel": tn(rb.params(), (d, 3, 2, hd))},
                    "proj": {"kernel": tn(rb.params(), (2, hd, d)), "bias": jnp.zeros(d)},
                },
                "mlp": {
                    "fc1": {"kernel": tn(rb.params(), (d, 4 * d)), "bias": jnp.zeros(4 * d)},
                    "fc2": {"kernel": tn(rb.params(), (4 * d, d)), "bias": jnp.zeros(d)},
                },
                "norm1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
                "norm2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
            }
        )
    expected["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    expected["norm"] = {"scale": jnp.ones(d), "bias": jnp.zeros(d)}

    got = nnx.to_pure_dict(nnx.state(FrameAST(cfg, rngs=nnx.Rngs(params=jax.random.key(3)))))
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_patch2d_stem_init_is_pytorchs_conv2d_default():
    """ASiT's ``PatchEmbed.proj`` is an ``nn.Conv2d`` that the ViT's ``_init_weights`` (Linear / LayerNorm
    only) leaves at PyTorch's default: kernel and bias both U(±1/√fan_in), fan_in = 16·16 pixels. The bias is
    drawn from a key folded out of the kernel's, so the draws after it (positions, CLS, blocks) are those of a
    stem without a bias."""
    cfg = EncoderConfig(stem="patch2d", n_mels=32, width=64, depth=1, heads=2, use_cls=True, qkv_bias=True)
    enc = FrameAST(cfg, rngs=nnx.Rngs(params=jax.random.key(5)))
    bound = 1.0 / 16.0
    key = nnx.Rngs(params=jax.random.key(5)).params()
    kernel = jax.random.uniform(key, (256, 64), jnp.float32, -bound, bound)
    bias = jax.random.uniform(jax.random.fold_in(key, 1), (64,), jnp.float32, -bound, bound)
    np.testing.assert_array_equal(enc.patch_embed.kernel[...], kernel)
    np.testing.assert_array_equal(enc.patch_embed.bias[...], bias)
    b = np.asarray(enc.patch_embed.bias[...])
    assert np.all(np.abs(b) <= bound) and b.std() > 0.5 * bound / np.sqrt(3)  # uniform, not zeros
    # The frame stem (trunc-normal, the ATST draw order above) keeps a zero bias.
    frame = FrameAST(EncoderConfig(width=64, depth=1, heads=2), rngs=nnx.Rngs(params=jax.random.key(5)))
    assert not np.any(np.asarray(frame.patch_embed.bias[...]))


def test_unknown_stem_or_positions_raise_one_clear_error():
    with pytest.raises(ValueError, match="model.stem must be one of frame|patch2d"):
        EncoderConfig(stem="conv")
    with pytest.raises(ValueError, match="model.pos_embed must be one of"):
        EncoderConfig(stem="patch2d", n_mels=128, pos_embed="rope")
    with pytest.raises(ValueError, match="needs stem='patch2d'"):
        EncoderConfig(pos_embed="sincos2d")
    # from_config: lists (as configs and saved JSON hold them) become a hashable tuple.
    cfg = EncoderConfig.from_config({"stem": "patch2d", "n_mels": 128, "patch_size": [16, 8], "lr": 1.0})
    assert cfg.patch_size == (16, 8) and hash(cfg)


# --- the trunk on a gathered subset of tokens -----------------------------------------------------------
@pytest.mark.parametrize("use_cls", [False, True])
def test_trunk_on_all_tokens_is_the_encoder(use_cls):
    cfg = EncoderConfig(**{**TINY.__dict__, "use_cls": use_cls})
    model = FrameAST(cfg, rngs=nnx.Rngs(0))
    spec = jax.random.normal(jax.random.key(0), (2, 64, 48))
    length = jnp.array([48, 30])
    mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 12))
    x = model.embed(spec, mask)
    idx = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # identity gather
    gathered = jnp.take_along_axis(x, idx[..., None], axis=1)
    valid = jnp.take_along_axis(model.valid_mask(length, x.shape[1]), idx, axis=1)
    np.testing.assert_array_equal(model.trunk(gathered, valid), model(spec, length, mask))


def test_trunk_on_gathered_subset_matches_numpy_reference():
    """Visible tokens gathered with their positions (different ones per example, some of them padding)
    run through the blocks alone: attention sees exactly the gathered set."""
    model = FrameAST(TINY, rngs=nnx.Rngs(5))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    spec = np.random.default_rng(1).normal(size=(2, 64, 80)).astype(np.float32)
    length = np.array([80, 44])  # 20 and 11 valid tokens
    x = model.embed(jnp.asarray(spec))
    rng = np.random.default_rng(2)
    idx = np.stack([np.sort(rng.choice(20, size=7, replace=False)) for _ in range(2)])  # [2, 7]
    gathered = jnp.take_along_axis(x, jnp.asarray(idx)[..., None], axis=1)
    valid = idx < (length // 4)[:, None]
    assert not valid.all() and valid.any()
    ours, layers = model.trunk(gathered, jnp.asarray(valid), collect_layers=True)
    assert layers.shape == (TINY.depth, 2, 7, TINY.width)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x_ref = np.take_along_axis(_np_frame_embed(p, spec.astype(np.float64)), idx[..., None], axis=1)
    ref = _np_trunk(p, x_ref, np.where(valid, 0.0, -10000.0), TINY)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-4, atol=2e-4)


def test_qkv_bias_forward_matches_numpy_reference():
    cfg = EncoderConfig(**{**TINY.__dict__, "qkv_bias": True})
    model = FrameAST(cfg, rngs=nnx.Rngs(7))
    bias = model.blocks.attn.qkv.bias
    bias[...] = jax.random.normal(jax.random.key(9), bias[...].shape)  # zero-initialised: make it count
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    spec = np.random.default_rng(0).normal(size=(2, 64, 64)).astype(np.float32)
    length = np.array([64, 40])
    ours = np.asarray(model(jnp.asarray(spec), jnp.asarray(length)))
    ref = _np_reference(params, spec.astype(np.float64), length, cfg)
    np.testing.assert_allclose(ours[:, :10], ref[:, :10], rtol=2e-4, atol=2e-4)


# --- cross-attention block ----------------------------------------------------------------------------
def _np_cross_block(p, q, kv, bias, heads):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    b, nq, d = q.shape
    hd = d // heads
    qn = _np_layernorm(q, p["norm_q"]["scale"], p["norm_q"]["bias"])
    kvn = _np_layernorm(kv, p["norm_kv"]["scale"], p["norm_kv"]["bias"])
    qh = (qn @ p["attn"]["q"]["kernel"].reshape(d, d)).reshape(b, nq, heads, hd)
    kvp = kvn @ p["attn"]["kv"]["kernel"].reshape(kv.shape[-1], 2 * d)
    kh, vh = (kvp[..., i * d : (i + 1) * d].reshape(b, kv.shape[1], heads, hd) for i in range(2))
    att = np.einsum("bqhd,bkhd->bhqk", qh, kh) / np.sqrt(hd) + bias[:, None, None, :]
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", att, vh).reshape(b, nq, d)
    x = q + o @ p["attn"]["proj"]["kernel"].reshape(d, d) + p["attn"]["proj"]["bias"]
    y = _np_layernorm(x, p["norm2"]["scale"], p["norm2"]["bias"])
    hid = y @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    hid = 0.5 * hid * (1 + erf(hid / np.sqrt(2)))
    return x + hid @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def _cross_block(seed=0):
    block = CrossBlock(32, 48, 8, rngs=nnx.Rngs(seed))  # Dq=32 (head dim 4), Dkv=48, 8 heads
    # Non-trivial norms and biases, so the reference checks that each is used where it should be.
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(block, nnx.Param))):
        if var.get_value().ndim == 1:
            var.set_value(jax.random.normal(jax.random.key(100 + i), var.get_value().shape) * 0.3 + 0.5)
    return block


def test_cross_block_matches_numpy_reference_and_ignores_padded_keys():
    block = _cross_block()
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 32)).astype(np.float32)
    kv = rng.normal(size=(2, 9, 48)).astype(np.float32)
    valid = np.ones((2, 9), bool)
    valid[1, 6:] = False
    ours = np.asarray(block(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(valid)))
    params = nnx.to_pure_dict(nnx.state(block, nnx.Param))
    ref = _np_cross_block(
        params, q.astype(np.float64), kv.astype(np.float64), np.where(valid, 0.0, -10000.0), 8
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

    kv2 = kv.copy()
    kv2[1, 6:] = rng.normal(size=(3, 48)) * 10  # padded keys changed: no output may move
    out2 = np.asarray(block(jnp.asarray(q), jnp.asarray(kv2), jnp.asarray(valid)))
    np.testing.assert_array_equal(out2[1], ours[1])
    # Same as dropping the padded keys altogether.
    dropped = np.asarray(block(jnp.asarray(q[1:]), jnp.asarray(kv[1:, :6])))
    np.testing.assert_allclose(dropped[0], ours[1], rtol=1e-5, atol=1e-5)


def test_cross_block_queries_do_not_attend_to_each_other():
    block = _cross_block(1)
    q = jax.random.normal(jax.random.key(0), (1, 6, 32))
    kv = jax.random.normal(jax.random.key(1), (1, 9, 48))
    full = block(q, kv)
    one = block(q[:, 2:3], kv)  # a query alone gives the output it has among the others
    np.testing.assert_allclose(one[0, 0], full[0, 2], rtol=1e-5, atol=1e-5)
    moved = block(q.at[:, 0].set(5.0), kv)
    np.testing.assert_array_equal(moved[:, 1:], full[:, 1:])


def test_cross_block_params_axes_dtypes():
    block = CrossBlock(32, 48, 8, qkv_bias=True, rngs=nnx.Rngs(0))
    names = set()
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        axes = var.get_metadata().get("axes")
        assert axes is not None and len(axes) == var.get_value().ndim, (path, axes)
        assert var.get_value().dtype == jnp.float32, path
        names.update(a for a in axes if a is not None)
    assert names == {"embed", "heads", "kv", "mlp"}
    assert block.attn.kv.kernel[...].shape == (48, 2, 8, 4) and block.attn.q.bias is not None
    out = block(jnp.ones((2, 3, 32), jnp.bfloat16), jnp.ones((2, 4, 48), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3, 32)


# --- EAT's post-norm trunk (norm_style="post") ------------------------------------------------------------
def _np_eat_trunk(p, x, bias, cfg):
    """EAT's encoder from its stated order (data2vec 2.0 ``AltBlock`` with ``layer_norm_first=False``): a
    LayerNorm on the embedded tokens, then per block ``x = x + attn(x); r = x = norm1(x); t = mlp(x);
    x = norm2(r + t)``, and no final norm. Returns ``(output, block outputs [L, ...], t [L, ...])``."""
    bsz, n, d = x.shape
    h, hd = cfg.heads, d // cfg.heads
    x = _np_layernorm(x, p["embed_norm"]["scale"], p["embed_norm"]["bias"])
    outs, ts = [], []
    for layer in range(cfg.depth):
        g = jax.tree.map(lambda a, layer=layer: a[layer], p["blocks"])
        qkv = x @ g["attn"]["qkv"]["kernel"].reshape(d, 3 * d) + g["attn"]["qkv"]["bias"].reshape(3 * d)
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(bsz, n, h, hd) for i in range(3))
        att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + bias[:, None, None, :]
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(bsz, n, d)
        x = x + o @ g["attn"]["proj"]["kernel"].reshape(d, d) + g["attn"]["proj"]["bias"]
        r = x = _np_layernorm(x, g["norm1"]["scale"], g["norm1"]["bias"])
        hid = x @ g["mlp"]["fc1"]["kernel"] + g["mlp"]["fc1"]["bias"]
        t = 0.5 * hid * (1 + erf(hid / np.sqrt(2))) @ g["mlp"]["fc2"]["kernel"] + g["mlp"]["fc2"]["bias"]
        x = _np_layernorm(r + t, g["norm2"]["scale"], g["norm2"]["bias"])
        outs.append(x), ts.append(t)
    return x, np.stack(outs), np.stack(ts)


def test_post_norm_trunk_is_eat_s_block_order():
    from atst_jax.inference import encoder_from_params

    cfg = EncoderConfig(**{**TINY.__dict__, "qkv_bias": True, "norm_style": "post"})
    # EAT's tree: an embed_norm, no final norm; the blocks keep their names.
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: FrameAST(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    assert sorted(shapes) == ["blocks", "embed_norm", "mask_embed", "patch_embed", "pos_embed"]
    assert sorted(shapes["blocks"]) == ["attn", "mlp", "norm1", "norm2"]
    # Random values everywhere (LayerNorm affines, biases included), so the reference checks each one's place;
    # drawn in NumPy, which keeps the test to one compile.
    rng = np.random.default_rng(3)

    def draw(path, a):
        noise = rng.normal(size=a.shape)
        return (1.0 + 0.2 * noise if path[-1].key == "scale" else 0.1 * noise).astype(np.float32)

    p = jax.tree_util.tree_map_with_path(draw, shapes)
    model = encoder_from_params(p, cfg)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    spec = np.random.default_rng(0).normal(size=(2, 64, 48)).astype(np.float32)
    length = np.array([48, 30])  # 12 and 7 valid tokens
    run = nnx.jit(  # one compile for every read
        lambda m, s, n: (
            m.embed(s),
            m(s, n, collect_layers="ffn"),
            m(s, n, collect_layers="block"),
            m.intermediate_features(s, n, n=2),
        )
    )
    x, (out, ffn), (out_b, blocks), feats = run(model, jnp.asarray(spec), jnp.asarray(length))
    bias = np.where(np.arange(12)[None, :] < (length // 4)[:, None], 0.0, -10000.0)
    want, want_blocks, want_t = _np_eat_trunk(p, np.asarray(x, np.float64), bias, cfg)
    tol = dict(rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(out), want, **tol)
    np.testing.assert_allclose(np.asarray(blocks), want_blocks, **tol)
    np.testing.assert_allclose(np.asarray(ffn), want_t, **tol)  # EAT's t: the MLP output before the add
    # No final norm: the encoder's output is the last block's, and so are the "final-normed" features.
    np.testing.assert_array_equal(np.asarray(out_b), np.asarray(blocks[-1]))
    np.testing.assert_array_equal(np.asarray(feats), np.concatenate(list(np.asarray(blocks)), axis=-1))

    with pytest.raises(ValueError, match=r"model.norm_style must be one of pre\|post, got 'sandwich'"):
        EncoderConfig(norm_style="sandwich")
