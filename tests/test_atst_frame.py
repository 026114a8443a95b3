"""ATST-Frame's inputs (views and masks), masked BatchNorm and the loss against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atst_jax.methods import atst_frame
from atst_jax.models.encoder import EncoderConfig
from atst_jax.models.layers import MaskedBatchNorm

ENC = EncoderConfig(width=64, depth=2, heads=1, drop_path=0.0)
CFG = atst_frame.AtstFrameConfig(proj_hidden=32, proj_dim=16)


def _batch(b=6, frames=401):
    rng = np.random.default_rng(0)
    spec = rng.uniform(-1, 0.5, (b, 64, frames)).astype(np.float32)
    length = np.array([frames] * (b - 1) + [frames - 120], np.int32)
    return {"spec": jnp.asarray(spec), "length": jnp.asarray(length)}


def test_views_share_one_mask_and_only_view_2_is_augmented():
    student, _, _ = atst_frame.init(jax.random.key(0), ENC, CFG)
    batch = _batch()
    b = batch["spec"].shape[0]
    x, lengths, mask2, idx, valid = atst_frame.prepare_inputs(jax.random.key(3), batch, CFG, student.encoder)
    x, mask2, idx, valid = map(np.asarray, (x, mask2, idx, valid))
    np.testing.assert_array_equal(mask2[:b], mask2[b:])  # the same mask for both views of a clip
    np.testing.assert_array_equal(x[:b], np.asarray(batch["spec"]))  # view 1 clean (official aug_tea=False)
    assert np.abs(x[b:] - x[:b]).mean() > 1e-3  # view 2 = mixup + frequency warp
    np.testing.assert_array_equal(np.asarray(lengths), np.concatenate([batch["length"]] * 2))
    # No masked token beyond the valid length of the short clip (120 frames = 30 tokens of padding).
    assert not mask2[b - 1, 100 - 30 :].any()
    # The gathered indices are exactly the masked positions.
    for row in range(2 * b):
        np.testing.assert_array_equal(np.sort(idx[row][valid[row]]), np.flatnonzero(mask2[row]))
    frac = mask2[: b - 1].mean()
    assert 0.35 < frac < 0.65


def test_masked_batchnorm_uses_only_valid_tokens_and_torch_running_stats():
    bn = MaskedBatchNorm(5)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7, 5)).astype(np.float32)
    w = rng.random((3, 7)) < 0.6
    x_pad = np.where(w[..., None], x, 1e3)  # padding values must not leak into the statistics
    y = np.asarray(bn(jnp.asarray(x_pad), jnp.asarray(w)))
    v = x[w]
    mean, var = v.mean(0), v.var(0)
    np.testing.assert_allclose(y[w], (v - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.running_mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var[...], 0.9 + 0.1 * v.var(0, ddof=1), rtol=1e-5)
    assert int(bn.num_batches_tracked[...]) == 1


def test_loss_is_the_symmetric_byol_loss_on_masked_tokens():
    student, teacher, _ = atst_frame.init(jax.random.key(0), ENC, CFG)
    # Perturb the teacher so that student and teacher differ.
    tparams = nnx.state(teacher, nnx.Param)
    nnx.update(teacher, jax.tree.map(lambda a: a + 0.01 * jnp.sin(a * 100.0), tparams))
    batch = _batch()
    key = jax.random.key(5)
    loss, metrics = atst_frame.loss(student, teacher, batch, key, CFG)

    # Recompute from the networks' outputs with plain NumPy.
    student2, teacher2, _ = atst_frame.init(jax.random.key(0), ENC, CFG)
    nnx.update(teacher2, nnx.state(teacher, nnx.Param))
    k_in, k_stu, k_tea = jax.random.split(key, 3)
    x, lengths, mask2, idx, valid = atst_frame.prepare_inputs(k_in, batch, CFG, student2.encoder)
    t_tok = np.asarray(teacher2.encoder(x, lengths, None, train=True, key=k_tea))
    s_tok = np.asarray(student2.encoder(x, lengths, mask2, train=True, key=k_stu))
    m = np.asarray(mask2)
    tz = np.asarray(teacher2.projector(jnp.asarray(t_tok[m]), jnp.ones(m.sum())))
    sp = np.asarray(
        student2.predictor(student2.projector(jnp.asarray(s_tok[m]), jnp.ones(m.sum())), jnp.ones(m.sum()))
    )
    half = m[: len(m) // 2].sum()  # tokens of view 1 come first, then the same positions of view 2

    def byol(p, z):
        p = p / np.linalg.norm(p, axis=-1, keepdims=True)
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        return 2 - 2 * (p * z).sum(-1).mean()

    expected = 0.5 * (byol(sp[half:], tz[:half]) + byol(sp[:half], tz[half:]))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    assert 0.0 < float(metrics["std_frm_stu"]) < 1.0 and 0.0 < float(metrics["std_frm_tea"]) < 1.0
