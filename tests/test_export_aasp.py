"""AaPE encoders in PyTorch (export/torch_aape.py): the ``aape.*`` key layout round-trips, our PyTorch AaPE / AaPE-ViT /
AaPE-FrameAST load ``strict=True`` and match the JAX encoders within 1e-4 (the AaPE branch made non-zero and
input-dependent first, so it really contributes). The trained-run exports (CLI → safetensors → HEAR / embed)
are checked in the CLI tests (tests/test_aasp.py, tests/test_aape.py)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from atst_jax.checkpoint import to_pure  # noqa: E402
from atst_jax.export import convert  # noqa: E402
from atst_jax.export.torch_aape import AaPEFrameAST, AaPEViT  # noqa: E402
from atst_jax.models.aape import AapeConfig  # noqa: E402
from atst_jax.models.encoder import EncoderConfig, FrameAST  # noqa: E402

AAPE = AapeConfig(kernels=2, taps=9, hidden=16, stat_bins=8)


def _live(model, seed=0):
    """Random non-zero AaPE fusion and lambda-encoder output weights (the init has them zero / small)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    a = model.aape
    a.fuse.kernel[...] = 0.1 * jax.random.normal(keys[0], a.fuse.kernel.shape)
    a.lambda_fc2.kernel[...] = 0.5 * jax.random.normal(keys[1], a.lambda_fc2.kernel.shape)
    a.gain_b[...] = 1.0 + 0.3 * jax.random.normal(keys[2], a.gain_b.shape)
    return model


def _pure(model):
    return jax.tree.map(np.asarray, to_pure(nnx.state(model, nnx.Param)))


def test_aape_vit_matches_jax():
    cfg = EncoderConfig(width=64, depth=2, heads=2, stem="patch2d", n_mels=128, use_cls=True, qkv_bias=True,
                        pos_embed="sincos2d", num_pos=65, drop_path=0.0, aape=AAPE)  # fmt: skip
    enc = _live(FrameAST(cfg, rngs=nnx.Rngs(params=1)))
    params = _pure(enc)
    n_t, n_f = 8, 8
    vit_params = dict(params, pos_embed=convert.sincos_pos_embed(n_t, n_f, 64))
    sd = convert.as_contiguous(convert.vit_to_torch(vit_params, (16, 16)))
    aape_sd = convert.aape_to_torch(params["aape"])
    assert sorted(aape_sd) == sorted(
        f"aape.{k}"
        for k in ("lambda_fc1.weight", "lambda_fc1.bias", "lambda_fc2.weight", "lambda_fc2.bias", "band_bias",
                  "gain_b", "gain_c", "norm.weight", "norm.bias", "fuse.weight", "fuse.bias")
    )  # fmt: skip
    assert aape_sd["aape.lambda_fc2.weight"].shape == (2 * 2, 16) and aape_sd["aape.fuse.weight"].shape == (
        64,
        4,
    )
    jax.tree.map(np.testing.assert_array_equal, convert.torch_to_aape(aape_sd), params["aape"])  # round trip
    sd.update(convert.as_contiguous(aape_sd))
    import dataclasses

    model = AaPEViT.from_state_dict(sd, dataclasses.asdict(AAPE), heads=2, n_mels=128, strict=True).eval()
    assert set(model.state_dict()) == set(sd)  # strict: nothing missing, nothing left over
    x = np.random.default_rng(0).normal(size=(2, 128, 112)).astype(np.float32)  # 7 of the 8 columns
    length = np.array([112, 80], np.int32)
    want = np.asarray(enc(jnp.asarray(x), jnp.asarray(length)))
    with torch.no_grad():
        got = model(torch.from_numpy(x.transpose(0, 2, 1).copy())[:, None], torch.from_numpy(length)).numpy()
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    valid = 1 + (80 // 16) * n_f
    np.testing.assert_allclose(got[1, :valid], want[1, :valid], atol=1e-4, rtol=1e-4)
    # The AaPE branch contributes: without it the outputs differ.
    with torch.no_grad():
        plain = model.aape
        del model.aape
        off = model(torch.from_numpy(x.transpose(0, 2, 1).copy())[:, None]).numpy()
        model.aape = plain
    assert np.abs(off[0] - want[0]).max() > 1e-2


def test_aape_frame_ast_matches_jax():
    aape = AapeConfig(subband_bins=8, kernels=2, taps=9, hidden=16, stat_bins=8)
    cfg = EncoderConfig(width=64, depth=2, heads=1, n_mels=64, num_pos=51, drop_path=0.0, aape=aape)
    enc = _live(FrameAST(cfg, rngs=nnx.Rngs(params=2)), seed=3)
    params = _pure(enc)
    sd = convert.as_contiguous(convert.encoder_to_torch(params))
    sd.update(convert.as_contiguous(convert.aape_to_torch(params["aape"])))
    assert len(sd) == 6 + 11 * 2 + 11
    import dataclasses

    model = AaPEFrameAST.from_state_dict(sd, dataclasses.asdict(aape), heads=1, strict=True).eval()
    x = np.random.default_rng(1).normal(size=(2, 64, 200)).astype(np.float32)
    length = np.array([200, 200], np.int32)
    want = np.asarray(enc(jnp.asarray(x), jnp.asarray(length)))
    with torch.no_grad():
        got = model(torch.from_numpy(x), torch.from_numpy(length)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_post_norm_vit_exports_loads_and_matches_jax(tmp_path):
    """A post-norm (EAT-trunk) 2-D encoder: the CLI's ViT writer puts ``embed_norm.*`` where ``norm.*`` was
    (``format=asit_encoder+postnorm``); the file reads back to the same JAX params and a post-norm JAX
    encoder, loads ``strict=True`` into torch_vit's post-norm ViT, and all three agree. The ATST FrameAST
    layout refuses such an encoder."""
    from safetensors import safe_open

    from atst_jax.export import __main__ as export_cli
    from atst_jax.export import load
    from atst_jax.export.torch_vit import VisionTransformer
    from atst_jax.inference import encoder_from_params

    model_cfg = dict(width=32, depth=2, heads=2, stem="patch2d", n_mels=32, use_cls=True, qkv_bias=True,
                     pos_embed="sincos2d", drop_path=0.0, norm_style="post")  # fmt: skip
    cfg = EncoderConfig(**model_cfg)
    # Random values everywhere (LayerNorm affines included), drawn in NumPy: no init compile.
    rng = np.random.default_rng(0)
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: FrameAST(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: ((path[-1].key == "scale") + 0.1 * rng.normal(size=a.shape)).astype(np.float32),
        shapes,
    )
    assert "embed_norm" in params and "norm" not in params
    with pytest.raises(ValueError, match="model.norm_style='post'"):
        convert.encoder_to_torch(params)

    out = tmp_path / "post.safetensors"
    export_cli._export_vit(
        {"model": model_cfg}, {"teacher": {"encoder": params}}, 7, "safetensors", out, "teacher"
    )
    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "asit_encoder+postnorm" and meta["norm_style"] == "post"
    file = load.read_encoder_file(out)
    assert file.vit and set(file.sd) == set(convert.vit_keys(2, "post")) and "norm.weight" not in file.sd
    loaded = load.load_encoder_params(out)
    assert list(convert.vit_to_torch(loaded)) == convert.vit_keys(2, "post")  # state_dict order
    for part in ("embed_norm", "blocks", "patch_embed", "cls_token"):
        jax.tree.map(np.testing.assert_array_equal, loaded[part], params[part])
    assert file.config().norm_style == "post"

    x = rng.normal(size=(2, 32, 64)).astype(np.float32)  # 4 columns of 2 patches
    length = np.array([64, 48], np.int32)
    want = np.asarray(encoder_from_params(params, cfg)(jnp.asarray(x), jnp.asarray(length)))
    from_file = np.asarray(file.jax_encoder()(jnp.asarray(x), jnp.asarray(length)))
    model = VisionTransformer.from_state_dict(file.sd, heads=2, n_mels=32, strict=True).eval()
    assert model.norm_style == "post" and list(model.state_dict()) == convert.vit_keys(2, "post")
    with torch.no_grad():
        got = model(torch.from_numpy(x.transpose(0, 2, 1).copy())[:, None], torch.from_numpy(length)).numpy()
    valid = 1 + (48 // 16) * 2  # CLS + the second clip's 3 valid columns
    for ours in (from_file, got):
        np.testing.assert_allclose(ours[0], want[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(ours[1, :valid], want[1, :valid], atol=1e-4, rtol=1e-4)
