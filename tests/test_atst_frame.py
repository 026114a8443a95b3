"""ATST-Frame's inputs (views and masks), masked BatchNorm and the loss against direct NumPy computations,
and the recipe switches (single-pair path, eval-mode teacher)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIG
from flax import nnx

from atst_jax.methods import atst_frame, build
from atst_jax.models import collapse
from atst_jax.models.layers import MaskedBatchNorm
from atst_jax.train import load_config


def _method(**overrides):
    config = load_config(CONFIG + ":tiny")
    config.model.update(width=64, depth=2, heads=1, drop_path=0.0)
    config.atst_frame.update(proj_hidden=32, proj_dim=16, **overrides)
    return build(config)


def _batch(b=6, frames=401):
    rng = np.random.default_rng(0)
    spec = rng.uniform(-1, 0.5, (b, 64, frames)).astype(np.float32)
    length = np.array([frames] * (b - 1) + [frames - 120], np.int32)
    return {"spec": jnp.asarray(spec), "spec_length": jnp.asarray(length)}


def test_views_share_one_mask_and_only_view_2_is_augmented():
    method = _method()
    student, _, _ = method.init(jax.random.key(0))
    batch = _batch()
    b = batch["spec"].shape[0]
    x, lengths, mask2, idx, valid = atst_frame.prepare_inputs(
        jax.random.key(3), batch, method.cfg, student.encoder
    )
    x, mask2, idx, valid = map(np.asarray, (x, mask2, idx, valid))
    np.testing.assert_array_equal(mask2[:b], mask2[b:])  # the same mask for both views of a clip
    np.testing.assert_array_equal(x[:b], np.asarray(batch["spec"]))  # view 1 clean (official aug_tea=False)
    assert np.abs(x[b:] - x[:b]).mean() > 1e-3  # view 2 = mixup + frequency warp
    np.testing.assert_array_equal(np.asarray(lengths), np.concatenate([batch["spec_length"]] * 2))
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


def _byol(p, z):
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    return 2 - 2 * (p * z).sum(-1).mean()


def _perturbed(method):
    student, teacher, _ = method.init(jax.random.key(0))
    tparams = nnx.state(teacher, nnx.Param)
    nnx.update(teacher, jax.tree.map(lambda a: a + 0.01 * jnp.sin(a * 100.0), tparams))
    return student, teacher


@pytest.mark.parametrize("symmetric", [True, False])
def test_loss_is_the_byol_loss_on_masked_tokens(symmetric):
    """Symmetric: both views through both networks, two pairs. Single pair (official symmetric=False): the
    teacher sees view 1 only and the student view 2 only, so each network's BatchNorm covers that view alone.
    The batch's short clip is masked by its length (``pad_is_signal=False``; tests/test_short_clips.py has the
    official default)."""
    method = _method(symmetric=symmetric, pad_is_signal=False)
    student, teacher = _perturbed(method)
    batch = _batch()
    key = jax.random.key(5)
    loss, metrics, state = method.loss(student, teacher, {}, batch, key, 0)
    assert state == {}

    # Recompute from the networks' outputs with plain NumPy.
    student2, teacher2 = _perturbed(method)
    k_in, k_stu, k_tea = jax.random.split(key, 3)
    x, lengths, mask2, idx, valid = atst_frame.prepare_inputs(k_in, batch, method.cfg, student2.encoder)
    b = batch["spec"].shape[0]
    t_rows = slice(None) if symmetric else slice(0, b)
    s_rows = slice(None) if symmetric else slice(b, 2 * b)
    t_tok = np.asarray(teacher2.encoder(x[t_rows], lengths[t_rows], None, train=True, key=k_tea))
    s_tok = np.asarray(student2.encoder(x[s_rows], lengths[s_rows], mask2[s_rows], train=True, key=k_stu))
    mt, ms = np.asarray(mask2[t_rows]), np.asarray(mask2[s_rows])
    tz = np.asarray(teacher2.projector(jnp.asarray(t_tok[mt]), jnp.ones(mt.sum())))
    ones = jnp.ones(ms.sum())
    sp = np.asarray(student2.predictor(student2.projector(jnp.asarray(s_tok[ms]), ones), ones))
    if symmetric:
        half = mt[:b].sum()  # tokens of view 1 come first, then the same positions of view 2
        expected = 0.5 * (_byol(sp[half:], tz[:half]) + _byol(sp[:half], tz[half:]))
    else:
        expected = _byol(sp, tz)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    assert 0.0 < float(metrics["std_frm_stu"]) < 1.0 and 0.0 < float(metrics["std_frm_tea"]) < 1.0

    # Encoder-level monitors on the teacher's valid tokens (the short clip's padding left out).
    tv = np.arange(t_tok.shape[1])[None, :] < np.asarray(lengths[t_rows])[:, None] // 4
    rows = [t[v].astype(np.float64) for t, v in zip(t_tok, tv, strict=True)]
    allv = np.concatenate(rows)
    within = sum(((r - r.mean(0)) ** 2).sum() for r in rows) / ((allv - allv.mean(0)) ** 2).sum()
    lam = np.linalg.eigvalsh(np.cov(allv.T, bias=True))
    np.testing.assert_allclose(float(metrics["within_tea"]), within, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["dim_tea"]), lam.sum() ** 2 / (lam**2).sum(), rtol=1e-3)

    # The within-clip variance / covariance terms (ours, off above) add exactly their weighted values, computed
    # on the student's encoder tokens of the rows it encodes, valid tokens only.
    method_on = _method(
        symmetric=symmetric, var_weight=0.7, cov_weight=0.2, var_target=0.9, pad_is_signal=False
    )
    student3, teacher3 = _perturbed(method_on)
    loss_on, metrics_on, _ = method_on.loss(student3, teacher3, {}, batch, key, 0)
    sv = np.arange(s_tok.shape[1])[None, :] < np.asarray(lengths[s_rows])[:, None] // 4
    var_loss, cov_loss, _ = collapse.spread_terms(jnp.asarray(s_tok), jnp.asarray(sv), 0.9)
    np.testing.assert_allclose(float(metrics_on["loss_byol"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics_on["loss_var"]), float(var_loss), rtol=1e-4)
    np.testing.assert_allclose(float(metrics_on["loss_cov"]), float(cov_loss), rtol=1e-4)
    np.testing.assert_allclose(
        float(loss_on), float(loss) + 0.7 * float(var_loss) + 0.2 * float(cov_loss), rtol=1e-5
    )
    assert float(var_loss) > 0 and float(cov_loss) > 0


def test_eval_mode_teacher_uses_running_statistics_and_no_drop_path():
    """teacher_train_mode=False: no drop-path, and the teacher projector normalises with the student
    projector's running statistics (the stated source) instead of batch statistics; it updates none."""
    method = _method(teacher_train_mode=False)
    student, teacher = _perturbed(method)
    # Distinct running statistics on the student, so using them (and not batch statistics) is visible.
    bn = student.projector.bn
    bn.running_mean[...] = jnp.linspace(-0.5, 0.5, bn.running_mean.shape[0])
    bn.running_var[...] = jnp.linspace(0.5, 2.0, bn.running_var.shape[0])
    batch = _batch()
    key = jax.random.key(5)
    loss_a, _, _ = method.loss(student, teacher, {}, batch, key, 0)
    np.testing.assert_allclose(teacher.projector.bn.running_mean[...], np.linspace(-0.5, 0.5, 32), rtol=1e-6)
    assert int(teacher.projector.bn.num_batches_tracked[...]) == 0  # eval mode: buffers not updated

    # The same teacher output from an explicit eval-mode computation.
    k_in, _, k_tea = jax.random.split(key, 3)
    x, lengths, mask2, idx, valid = atst_frame.prepare_inputs(k_in, batch, method.cfg, student.encoder)
    tok = teacher.encoder(x, lengths, None, train=False)
    m = np.asarray(mask2)
    h = np.asarray(tok)[m] @ np.asarray(teacher.projector.fc1.kernel[...])
    mean, var = np.linspace(-0.5, 0.5, 32), np.linspace(0.5, 2.0, 32)
    h = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(teacher.projector.bn.scale[...]) + np.asarray(
        teacher.projector.bn.bias[...]
    )
    z_ref = np.maximum(h, 0) @ np.asarray(teacher.projector.fc2.kernel[...])
    z = np.asarray(
        teacher.projector(jnp.asarray(np.asarray(tok)[m]), jnp.ones(m.sum()), use_running_average=True)
    )
    np.testing.assert_allclose(z, z_ref, rtol=2e-4, atol=2e-5)
    # Drop-path off: the teacher's tokens do not depend on its key.
    t1 = teacher.encoder(x, lengths, None, train=False, key=k_tea)
    t2 = teacher.encoder(x, lengths, None, train=False, key=jax.random.key(99))
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))
    assert np.isfinite(float(loss_a))


def test_per_group_batchnorm_and_loss_equal_the_mean_over_groups_of_each_alone(monkeypatch):
    """``bn_groups = loss_groups = G``: the loss is the mean over G equal blocks of clips of the loss each
    block gives alone (DDP without SyncBN), and the running statistics move by the mean of the blocks' moves.
    ``loss_groups`` alone averages per-block token means."""
    # One fixed span pattern for every clip (the same on a slice as on the batch), no view randomness.
    fixed = lambda key, batch, n, **kw: jnp.broadcast_to((jnp.arange(n) // 5) % 2 == 0, (batch, n))
    monkeypatch.setattr(atst_frame.views, "span_mask", fixed)
    fields = dict(aug_view2=False, mixup_bank=0)
    grouped, alone = _method(bn_groups=2, loss_groups=2, **fields), _method(**fields)
    batch = _batch(b=4, frames=101)  # clip 3 is 30 frames short: the blocks have unequal token counts
    key = jax.random.key(5)
    loss = jax.jit(lambda m, s, t, b: m.loss(s, t, {}, b, key, 0)[0], static_argnums=0)

    student, teacher = _perturbed(grouped)
    got = float(loss(grouped, student, teacher, batch))
    bn = student.projector.bn
    ref, running = [], []
    for g in (slice(0, 2), slice(2, 4)):
        s_g, t_g = _perturbed(alone)
        ref.append(float(loss(alone, s_g, t_g, {k: v[g] for k, v in batch.items()})))
        running.append(np.asarray(s_g.projector.bn.running_mean[...]))
    np.testing.assert_allclose(got, np.mean(ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.running_mean[...]), np.mean(running, 0), rtol=1e-5, atol=1e-7)

    # loss_groups alone: 2 − 2·(mean over blocks of each block's mean cosine).
    from atst_jax.models.byol import byol_pair, cosine

    rng = np.random.default_rng(0)
    p, z = rng.normal(size=(2, 4, 6, 8)).astype(np.float32)
    w = (rng.random((4, 6)) < 0.7).astype(np.float32)
    cos = np.asarray(cosine(jnp.asarray(p), jnp.asarray(z)))
    blocks = [(cos[i : i + 2] * w[i : i + 2]).sum() / w[i : i + 2].sum() for i in (0, 2)]
    np.testing.assert_allclose(float(byol_pair(p, z, w, 2)), 2 - 2 * np.mean(blocks), rtol=1e-6)
    # Groups that do not divide the clips (the official 7 GPUs, a batch of 4 here): row i in block i·G // R,
    # blocks of 1 or 2 clips, each its own token mean.
    p, z = rng.normal(size=(2, 10, 6, 8)).astype(np.float32)
    w = (rng.random((10, 6)) < 0.7).astype(np.float32)
    w[:, 0] = 1  # no empty clip
    cos = np.asarray(cosine(jnp.asarray(p), jnp.asarray(z)))
    block = np.arange(10) * 7 // 10
    assert np.bincount(block).tolist() == [2, 1, 2, 1, 2, 1, 1]
    means = [(cos[block == g] * w[block == g]).sum() / w[block == g].sum() for g in range(7)]
    np.testing.assert_allclose(float(byol_pair(p, z, w, 7)), 2 - 2 * np.mean(means), rtol=1e-6)


def test_official_gpu_counts_and_groups_that_fit_the_clips_of_a_loss_call():
    from atst_jax.sharding import ConfigError

    groups = {
        v: load_config(f"{CONFIG}:{v}").atst_frame.loss_groups for v in ("tiny", "small", "base", "xxl")
    }
    assert groups == {"tiny": 1, "small": 4, "base": 7, "xxl": 7}
    config = load_config(f"{CONFIG}:base")
    config.train.global_batch = 256  # 7 blocks of 36 or 37 clips: fine
    build(config).check()
    config = load_config(CONFIG + ":tiny")  # global batch 16
    config.train.grad_accum_steps = 2
    config.atst_frame.loss_groups = 9
    with pytest.raises(ConfigError, match=r"atst_frame.loss_groups=9 is more than the 8 clips"):
        build(config).check()
    config.atst_frame.update(loss_groups=7, bn_groups=3)
    with pytest.raises(ConfigError, match=r"atst_frame.bn_groups=3"):
        build(config).check()
