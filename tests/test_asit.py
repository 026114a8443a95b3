"""ASiT's parts against hand-computed cases and the official PyTorch algorithms: the DINO cross-entropy with
centring and both temperatures, the centre update, the L1 over corrupted pixels only, GMML coverage and the
paste share, the weight-normalised prototypes, torch-flavour AdamW with per-parameter clipping, the τ_t
schedule. The method-level checks (1 = 8 devices, golden shardings, FLOPs, resume) are in test_methods.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT
from flax import nnx

from atst_jax import optim
from atst_jax.data import views
from atst_jax.methods.asit import Asit, reconstruction_l1
from atst_jax.models.dino import WeightNormLinear, centre_update, dino_cross_entropy, entropy
from atst_jax.sharding import ConfigError
from atst_jax.train import load_config


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dino_cross_entropy_by_hand():
    s = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = np.array([[0.2, 0.1, 0.0], [0.0, 0.3, 0.1]])
    c = np.array([0.1, 0.0, -0.1])
    tau_s, tau_t = 0.1, 0.04
    # By hand: q = softmax((t − c) / τ_t), log p = log softmax(s / τ_s), loss = mean over rows of −Σ q log p.
    q = _softmax((t - c) / tau_t)
    log_p = np.log(_softmax(s / tau_s))
    want = np.mean(-(q * log_p).sum(-1))
    got = dino_cross_entropy(
        jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), student_temp=tau_s, teacher_temp=tau_t
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # The centre and the sharper teacher temperature matter (the case is not degenerate) ...
    plain = dino_cross_entropy(
        jnp.asarray(s), jnp.asarray(t), jnp.zeros(3), student_temp=tau_s, teacher_temp=1.0
    )
    assert abs(float(plain) - want) > 0.1
    # ... weights select rows, and the teacher side carries no gradient.
    w = jnp.array([1.0, 0.0])
    one = dino_cross_entropy(
        jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), student_temp=tau_s, teacher_temp=tau_t, weights=w
    )
    np.testing.assert_allclose(float(one), -(q[0] * log_p[0]).sum(), rtol=1e-5)
    g = jax.grad(
        lambda tt: dino_cross_entropy(
            jnp.asarray(s), tt, jnp.asarray(c), student_temp=tau_s, teacher_temp=tau_t
        )
    )(jnp.asarray(t))
    assert not np.any(np.asarray(g))


def test_centre_update_by_hand():
    c = jnp.array([1.0, -1.0])
    t = jnp.array([[[2.0, 0.0], [4.0, 2.0]], [[0.0, 0.0], [100.0, 100.0]]])  # [B=2, N=2, K=2]
    # Mean of all four rows = [26.5, 25.5]; c ← 0.9 c + 0.1 mean.
    np.testing.assert_allclose(centre_update(c, t, 0.9), [0.9 + 2.65, -0.9 + 2.55], rtol=1e-6)
    # With the last token padded: mean of three rows = [2, 2/3].
    w = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(centre_update(c, t, 0.9, w), [0.9 + 0.2, -0.9 + 0.2 / 3], rtol=1e-6)


def test_reconstruction_l1_counts_corrupted_pixels_only():
    clean = jnp.zeros((2, 4, 8))
    rec = jnp.full((2, 4, 8), 1000.0).at[:, :2, :].set(3.0)  # huge error where nothing was corrupted
    mask = jnp.zeros((2, 4, 8), bool).at[:, :2, :4].set(True)
    length = jnp.array([8, 8])
    np.testing.assert_allclose(float(reconstruction_l1(rec, clean, mask, length, patch_t=4)), 3.0)
    # Frames past a clip's whole patches count as padding, never as corrupted pixels.
    rec = rec.at[1, :2, :4].set(7.0)
    short = jnp.array([8, 3])  # the second clip has no whole 4-frame patch: only clip 0 counts
    np.testing.assert_allclose(float(reconstruction_l1(rec, clean, mask, short, patch_t=4)), 3.0)
    np.testing.assert_allclose(float(reconstruction_l1(rec, clean, mask, length, patch_t=4)), 5.0)


def test_paste_partners_come_from_the_same_crop_of_the_rows_pool():
    """The official collate pastes within one loader batch, crop by crop: with ``paste_pool`` P a crop-1 row
    takes its partner from the crop-1 rows of its own pool of P clips, never from crop 2 (the step stacks
    [crop 1 of every clip; crop 2 of every clip]); ``paste_pool = 0`` pools each crop's whole batch."""
    config = load_config(str(ROOT / "configs" / "asit.py") + ":tiny")
    b, n_f, n_t = 16, 16, 32
    x = jnp.broadcast_to(jnp.arange(2 * b, dtype=jnp.float32)[:, None, None] + 1.0, (2 * b, n_f, n_t))

    def partners(pool):
        config.asit.paste_prob, config.asit.paste_pool = 1.0, pool
        method = Asit(config)
        found = []
        for seed in range(8):
            out, mask = method.corrupt(jax.random.key(seed), x)
            out, mask = np.asarray(out), np.asarray(mask)
            found += [(row, int(out[row][mask[row]][0]) - 1) for row in range(2 * b)]
        return np.array(found)

    for pool, size in ((4, 4), (0, b), (64, b)):  # a pool larger than the batch is the batch
        rows, src = partners(pool).T
        assert np.all(src // size == rows // size), pool  # same pool, so same crop
        assert len(set(src[rows == 0])) > 1  # a random member, not a fixed one
    rows, src = partners(4).T
    assert len({(r // 4, s) for r, s in zip(rows, src, strict=True)}) > 24  # the pools' members all occur
    config.train.global_batch = 12
    config.asit.paste_pool = 8
    with pytest.raises(ConfigError, match="paste_pool=8 must be 0"):
        Asit(config).check()


def test_gmml_coverage_and_paste_share():
    """Over many draws: drop masks cover U(0.5, 0.7) (overshooting only by the last block), paste masks ≈ 30 %,
    half of the crops pasted, pasted pixels come from the batch's clean crops, dropped pixels are zero."""
    b, n_f, n_t = 256, 128, 592
    base = jnp.arange(b, dtype=jnp.float32)[:, None, None] + 1.0  # clip i is constant i + 1
    x = jnp.broadcast_to(base, (b, n_f, n_t))
    out, mask = jax.jit(lambda k: views.gmml_corrupt(k, x))(jax.random.key(3))
    out, mask = np.asarray(out), np.asarray(mask)
    cover = mask.mean(axis=(1, 2))
    replaced = np.where(mask, out, np.nan)
    pasted = np.array([np.nanmax(replaced[i]) > 0 for i in range(b)])
    # A pasted crop holds another clip's constant (or its own, which the official draw also allows).
    assert 0.4 < pasted.mean() < 0.6, pasted.mean()
    drop = cover[~pasted]
    assert drop.min() >= 0.5 and drop.max() <= 0.7 + 0.09, (drop.min(), drop.max())  # one block ≤ 0.3 × 0.3
    assert 0.585 < drop.mean() < 0.63, drop.mean()  # U(0.5, 0.7) + ≈0.01 overshoot, ±3σ of ~128 draws
    assert np.all(np.nan_to_num(replaced[~pasted]) == 0)
    paste = cover[pasted]
    assert paste.min() >= 0.3 and abs(paste.mean() - 0.30) < 0.02, (paste.min(), paste.mean())
    assert np.all(out[~mask] == x[~mask])  # clean pixels untouched
    # Blocks, not scattered pixels: most masked pixels have a masked neighbour along time.
    assert (mask[:, :, 1:] & mask[:, :, :-1]).sum() > 0.95 * mask[:, :, 1:].sum()


def test_weight_norm_gain_is_fixed_at_one():
    layer = WeightNormLinear(8, 5, axes=(None, None), rngs=nnx.Rngs(0))
    assert [path for path, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))] == [("kernel",)]  # no gain
    np.testing.assert_allclose(np.linalg.norm(np.asarray(layer.weight()), axis=0), 1.0, rtol=1e-6)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    y = layer(x)
    layer.kernel[...] = layer.kernel[...] * jnp.array([2.0, 0.5, 3.0, 1.0, 10.0])  # scale each direction
    np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-6)
    # The gradient of a direction is orthogonal to it (only the direction can change).
    v = layer.kernel[...]
    g = jax.grad(lambda v: jnp.sum(jnp.sin(x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True)))))(v)
    np.testing.assert_allclose(np.sum(np.asarray(g) * np.asarray(v), axis=0), 0.0, atol=1e-5)


def test_entropy_bounds():
    np.testing.assert_allclose(float(entropy(jnp.ones(8) / 8)), np.log(8), rtol=1e-6)
    assert float(entropy(jnp.eye(4)[0])) == 0.0


def test_torch_adamw_with_per_parameter_clipping_matches_pytorch():
    """ASiT's optimizer = torch.optim.AdamW (eps 1e-8, decay before the step) after DINO's per-parameter
    clip_gradients, on two parameter groups (biases undecayed), with per-step LR and WD."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    raw = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))}
    lrs, wds = [1e-2, 5e-3, 2e-2, 1e-3], [0.04, 0.1, 0.3, 0.4]
    grads_seq = [{k: rng.normal(size=v.shape) * s for k, v in raw.items()} for s in (1.0, 5.0, 0.01, 3.0)]

    tk = torch.nn.Parameter(torch.tensor(raw["kernel"], dtype=torch.float64))
    tb = torch.nn.Parameter(torch.tensor(raw["bias"], dtype=torch.float64))
    opt = torch.optim.AdamW([{"params": [tk]}, {"params": [tb], "weight_decay": 0.0}], eps=1e-8)
    for g, lr, wd in zip(grads_seq, lrs, wds, strict=True):
        tk.grad, tb.grad = torch.tensor(g["kernel"]), torch.tensor(g["bias"])
        for p in (tk, tb):  # DINO utils.clip_gradients
            coef = 3.0 / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
        for i, group in enumerate(opt.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        opt.step()

    config = load_config(str(ROOT / "configs" / "asit.py") + ":tiny")
    params = nnx.State(
        {
            "kernel": nnx.Param(jnp.asarray(raw["kernel"], jnp.float32), axes=("embed", "mlp")),
            "bias": nnx.Param(jnp.asarray(raw["bias"], jnp.float32), axes=("mlp",)),
        }
    )
    tx = optim.make_optimizer(
        config.optim, lambda s: jnp.asarray(lrs)[s], lambda s: jnp.asarray(wds)[s], optim.decay_mask(params)
    )
    state = tx.init(params)
    for g in grads_seq:
        grads = nnx.State({k: params.raw_mapping[k].replace(jnp.asarray(g[k], jnp.float32)) for k in g})
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(
        np.asarray(params["kernel"].get_value()), tk.detach().numpy(), rtol=2e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(params["bias"].get_value()), tb.detach().numpy(), rtol=2e-5, atol=1e-6
    )


def test_teacher_temperature_schedule_is_the_official_linspace():
    config = load_config(str(ROOT / "configs" / "asit.py") + ":tiny")
    config.asit.teacher_temp_warmup_steps = 30
    method = Asit(config)
    want = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(10, 0.07)])
    got = [float(method.teacher_temp(s)) for s in range(40)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
