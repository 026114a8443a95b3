"""Patch stems: the 2-D (ViT-style) stem's token order, projection, positions, CLS/mask tokens, token rule,
qkv bias, and a jitted forward + grad; the frame stem's unpatchify."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atst_jax.models.encoder import EncoderConfig, FrameAST, count_params
from atst_jax.models.stems import PatchStem2D, sincos_2d

# ASiT's geometry (128 mel bins, 16×16 patches) on a narrow trunk.
ASIT_TINY = EncoderConfig(
    stem="patch2d",
    n_mels=128,
    width=64,
    depth=2,
    heads=2,
    num_pos=297,
    use_cls=True,
    qkv_bias=True,
    drop_path=0.1,
)


def _cfg(**kw):
    return EncoderConfig(**{**ASIT_TINY.__dict__, **kw})


def _position_coded_spec(frames, n_mels=128):
    """``spec[0, mel, frame] = mel * 10000 + frame``: every value says where it came from."""
    mel, frame = np.meshgrid(np.arange(n_mels), np.arange(frames), indexing="ij")
    return (mel * 10000 + frame).astype(np.float32)[None]


def test_tokens_are_time_major_16x16_patches():
    model = FrameAST(ASIT_TINY, rngs=nnx.Rngs(0))
    spec = _position_coded_spec(600)  # 600 frames: cut to 592 = 37 whole time patches
    assert model.num_tokens(600) == 296 and model.stem.grid(600) == (37, 8)
    patches = np.asarray(model.patchify(jnp.asarray(spec)))
    assert patches.shape == (1, 296, 256)
    for t_p in (0, 1, 36):
        for f_p in (0, 3, 7):
            token = patches[0, t_p * 8 + f_p]  # time-major: t_patch * n_freq_patches + f_patch
            for dt in (0, 5, 15):
                for df in (0, 9, 15):
                    mel, frame = divmod(int(token[dt * 16 + df]), 10000)
                    assert (mel, frame) == (f_p * 16 + df, t_p * 16 + dt)
    np.testing.assert_array_equal(model.unpatchify(jnp.asarray(patches)), spec[:, :, :592])


def test_frame_stem_unpatchify_inverts_patchify():
    model = FrameAST(EncoderConfig(width=64, depth=1, heads=2), rngs=nnx.Rngs(0))
    spec = _position_coded_spec(42, n_mels=64)
    np.testing.assert_array_equal(model.unpatchify(model.patchify(jnp.asarray(spec))), spec[:, :, :40])


def test_matmul_projection_equals_a_stride_16_convolution():
    model = FrameAST(ASIT_TINY, rngs=nnx.Rngs(1))
    spec = jax.random.normal(jax.random.key(0), (2, 128, 70))  # 70 frames: 4 time patches, 6 frames dropped
    ours = model.patch_embed(model.patchify(spec))
    kernel, bias = model.patch_embed.kernel[...], model.patch_embed.bias[...]
    d = kernel.shape[1]
    # The same weights as a PyTorch-style Conv2d(1, D, 16, stride=16) over an image [B, 1, time, mel].
    w = kernel.T.reshape(d, 1, 16, 16)  # OIHW, H = time, W = mel
    image = jnp.swapaxes(spec, 1, 2)[:, None]  # [B, 1, T, F]
    conv = jax.lax.conv_general_dilated(
        image, w, window_strides=(16, 16), padding="VALID", precision=jax.lax.Precision.HIGHEST
    )  # [B, D, n_t, n_f]
    conv = conv.transpose(0, 2, 3, 1).reshape(2, -1, d) + bias
    assert conv.shape == ours.shape == (2, 4 * 8, d)
    np.testing.assert_allclose(ours, conv, rtol=1e-5, atol=1e-5)


def test_sincos_positions_are_fixed_and_standard():
    cfg = _cfg(pos_embed="sincos2d")
    model = FrameAST(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model))
    assert "pos_embed" not in params  # not a parameter: nothing to train, decay or checkpoint

    # The standard 2-D form, written out per channel: first half the freq-patch index, second half time.
    d, n_t, n_f = cfg.width, 3, 8
    quarter = d // 4
    expected = np.zeros((n_t * n_f, d))
    for t in range(n_t):
        for f in range(n_f):
            for i in range(quarter):
                w = 1.0 / 10000 ** (i / quarter)
                expected[t * n_f + f, [i, quarter + i, 2 * quarter + i, 3 * quarter + i]] = (
                    np.sin(f * w),
                    np.cos(f * w),
                    np.sin(t * w),
                    np.cos(t * w),
                )
    np.testing.assert_allclose(sincos_2d(n_t, n_f, d), expected, atol=1e-6)

    spec = jax.random.normal(jax.random.key(0), (1, 128, 48))
    x = model.embed(spec)
    tokens = model.patch_embed(model.patchify(spec))
    np.testing.assert_allclose(x[0, 1:] - tokens[0], expected, atol=1e-5)
    np.testing.assert_allclose(x[0, 0], model.cls_token[...][0, 0], atol=1e-7)  # no position on the CLS
    other = FrameAST(cfg, rngs=nnx.Rngs(5))  # another init: the same positions
    np.testing.assert_allclose(other.token_positions(24), model.token_positions(24))


def test_learned_positions_cls_and_mask_tokens():
    model = FrameAST(ASIT_TINY, rngs=nnx.Rngs(2))
    spec = jax.random.normal(jax.random.key(0), (2, 128, 64))  # 4 × 8 = 32 tokens
    mask = jnp.zeros((2, 32), bool).at[1, 9].set(True)
    x = model.embed(spec, mask)
    assert x.shape == (2, 33, ASIT_TINY.width)
    pos = model.pos_embed[...][0]
    np.testing.assert_allclose(
        x[:, 0], jnp.broadcast_to(model.cls_token[...][0, 0] + pos[0], (2, 64)), atol=1e-6
    )
    np.testing.assert_allclose(x[1, 1 + 9], model.mask_embed[...][0, 0] + pos[1 + 9], atol=1e-6)
    tokens = model.patch_embed(model.patchify(spec))
    np.testing.assert_allclose(x[0, 1:], tokens[0] + pos[1:33], atol=1e-6)  # patch token i takes slot i + 1
    with pytest.raises(ValueError, match="positional slots"):
        model.embed(jax.random.normal(jax.random.key(0), (1, 128, 16 * 38)))  # 304 tokens > 296 slots


def test_token_lengths_count_whole_time_patches():
    model = FrameAST(ASIT_TINY, rngs=nnx.Rngs(0))
    length = jnp.array([592, 600, 40, 15, 16])
    np.testing.assert_array_equal(model.token_lengths(length), [296, 296, 16, 0, 8])
    valid = np.asarray(model.valid_mask(jnp.array([40, 592]), 1 + 296))  # CLS counts as valid
    assert valid[0].sum() == 17 and valid[0, :17].all() and valid[1].all()


def test_qkv_bias_is_one_bias_per_block_qkv():
    with_bias = FrameAST(ASIT_TINY, rngs=nnx.Rngs(0))
    without = FrameAST(_cfg(qkv_bias=False), rngs=nnx.Rngs(0))
    flat_with = {p: v for p, v in nnx.to_flat_state(nnx.state(with_bias, nnx.Param))}
    flat_without = {p: v for p, v in nnx.to_flat_state(nnx.state(without, nnx.Param))}
    assert set(flat_with) - set(flat_without) == {("blocks", "attn", "qkv", "bias")}
    bias = flat_with[("blocks", "attn", "qkv", "bias")]
    assert bias.get_value().shape == (ASIT_TINY.depth, 3, 2, 32)
    assert bias.get_metadata()["axes"] == (None, "heads", "kv")
    assert count_params(with_bias) - count_params(without) == ASIT_TINY.depth * 3 * ASIT_TINY.width


def test_vit_base_parameter_count():
    """ViT-B/16 without its classifier has 85,798,656 parameters (3-channel 16×16 patches, 197 positions);
    ours takes 1-channel patches, 297 positions (ASiT's 296 tokens + CLS) and adds the mask token."""
    cfg = EncoderConfig(
        stem="patch2d", n_mels=128, width=768, depth=12, heads=12, num_pos=297, use_cls=True, qkv_bias=True
    )
    model = nnx.eval_shape(lambda: FrameAST(cfg, rngs=nnx.Rngs(0)))
    vit_b16 = 85_798_656
    expected = vit_b16 - 768 * 768 + 256 * 768 - 197 * 768 + 297 * 768 + 768
    assert count_params(model) == expected


def test_patch2d_parameters_use_only_existing_logical_axes():
    """The sharding rules in the configs already cover every name the 2-D stem uses."""

    def names(model):
        out = set()
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata().get("axes")
            assert axes is not None and len(axes) in (var.get_value().ndim, var.get_value().ndim - 1), path
            out.update(a for a in axes if a is not None)
        return out

    frame = FrameAST(EncoderConfig(width=64, depth=1, heads=2), rngs=nnx.Rngs(0))
    patch = FrameAST(ASIT_TINY, rngs=nnx.Rngs(0))
    assert names(patch) <= names(frame)
    assert patch.patch_embed.kernel.get_metadata()["axes"] == ("patch", "embed")


@pytest.mark.parametrize("pos", ["learned", "sincos2d"])
def test_patch2d_encoder_jitted_forward_and_grad(pos):
    cfg = _cfg(pos_embed=pos)
    graphdef, params = nnx.split(FrameAST(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    spec = jax.random.normal(jax.random.key(0), (2, 128, 100))  # 6 × 8 = 48 tokens
    length = jnp.array([100, 40])
    mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, 48))

    @jax.jit
    def loss_and_grad(params, key):
        def loss(params):
            out = nnx.merge(graphdef, params)(spec, length, mask, train=True, key=key)
            return jnp.mean(jnp.square(out - 0.1)), out

        return jax.value_and_grad(loss, has_aux=True)(params)

    (value, out), grads = loss_and_grad(params, jax.random.key(3))
    assert out.shape == (2, 49, cfg.width) and np.isfinite(value)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert all(np.isfinite(g).all() for g in flat.values())
    for name in [
        ("patch_embed", "kernel"),
        ("cls_token",),
        ("mask_embed",),
        ("blocks", "attn", "qkv", "bias"),
    ]:
        assert np.abs(flat[name]).max() > 0, name
    if pos == "learned":
        assert np.abs(flat[("pos_embed",)]).max() > 0

    # The padded example's valid tokens do not see its padding.
    model = nnx.merge(graphdef, params)
    spec2 = spec.at[1, :, 48:].set(7.0)
    a, b = model(spec, length), model(spec2, length)
    np.testing.assert_allclose(a[1, : 1 + 16], b[1, : 1 + 16], rtol=1e-5, atol=1e-5)


def test_patch2d_config_errors():
    with pytest.raises(ValueError, match="n_mels"):
        EncoderConfig(stem="patch2d", n_mels=120)
    assert isinstance(FrameAST(ASIT_TINY, rngs=nnx.Rngs(0)).stem, PatchStem2D)


def test_each_stem_answers_its_inference_geometry():
    """What code outside ``models/`` asks a stem instead of branching on its name: the chunk inference runs it
    in (the trained crop within the positional table, whole time steps), frames per step, tokens per step,
    the default feature set and the PyTorch layout it exports to."""
    from atst_jax.models.stems import export_layout, make_stem

    frame = make_stem(EncoderConfig())  # ATST-Frame: 251 slots, 4-frame tokens
    assert (
        frame.chunk_frames() == 1000 and frame.chunk_frames(1201) == 1000 and frame.chunk_frames(603) == 600
    )
    assert make_stem(EncoderConfig(use_cls=True)).chunk_frames() == 600  # ATST-Clip's official 6 s
    assert make_stem(EncoderConfig(num_pos=41)).chunk_frames() == 160  # what a 40-slot table holds
    assert (frame.time_patch, frame.freq_patches, frame.default_features) == (4, 1, "atst_logmel64")
    vit = make_stem(
        EncoderConfig(
            stem="patch2d", n_mels=128, patch_size=(16, 16), use_cls=True, qkv_bias=True, num_pos=297
        )
    )
    assert (
        vit.chunk_frames() == 592 and vit.chunk_frames(300) == 288
    )  # 37 columns of 8 patches; whole columns
    assert (vit.time_patch, vit.freq_patches, vit.default_features) == (16, 8, "kaldi_fbank128")
    assert export_layout(None) == export_layout({"stem": "frame"}) == "frameast"
    assert export_layout({"stem": "patch2d"}) == "vit"
    with pytest.raises(ValueError, match="not a stem"):
        export_layout({"stem": "conv"})
