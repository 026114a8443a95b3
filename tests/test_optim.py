"""Optimiser and schedules against independent NumPy versions of the official ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atst_jax import optim
from atst_jax.methods.atst_frame import AtstFrameConfig
from atst_jax.models.byol import Student
from atst_jax.models.encoder import EncoderConfig


def _cosine_scheduler_step(base, final, max_steps, warmup=0, start_warmup=0.0):
    """audiossl.utils.common.cosine_scheduler_step, as arrays."""
    warm = np.linspace(start_warmup, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(max_steps - warmup)
    sched = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warm, sched])


def test_schedules_match_official_arrays():
    total, warmup = 500, 37
    steps = np.arange(total)
    lr = np.asarray(jax.vmap(lambda s: optim.warmup_cosine(s, 1.6e-3, 1e-6, warmup, total))(steps))
    np.testing.assert_allclose(lr, _cosine_scheduler_step(1.6e-3, 1e-6, total, warmup), rtol=1e-5, atol=1e-10)
    wd = np.asarray(jax.vmap(lambda s: optim.cosine(s, 0.04, 0.4, total))(steps))
    np.testing.assert_allclose(wd, _cosine_scheduler_step(0.04, 0.4, total), rtol=1e-5)
    ema = np.asarray(jax.vmap(lambda s: optim.ema_momentum(s, 0.997, total))(steps))
    np.testing.assert_allclose(ema, _cosine_scheduler_step(0.997, 1.0, total), rtol=1e-6)
    assert optim.peak_lr(4e-4, 1024) == 1.6e-3


def _hf_adamw_numpy(params, grads_seq, lrs, wds, decay, b1=0.9, b2=0.999, eps=1e-6, decay_first=False):
    """transformers.AdamW.step (correct_bias=True), weight decay added at the end, per parameter.
    ``decay_first``: fairseq's ``adam`` (``p -= lr·wd·p`` before the same Adam step)."""
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr, wd) in enumerate(zip(grads_seq, lrs, wds, strict=True), start=1):
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(v[k]) + eps
            step_size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            if decay[k] and decay_first:
                p[k] = p[k] - lr * wd * p[k]
            p[k] = p[k] - step_size * m[k] / denom
            if decay[k] and not decay_first:
                p[k] = p[k] - lr * wd * p[k]
    return p


@pytest.mark.parametrize("flavour", ["transformers", "fairseq"])
def test_hf_adamw_matches_transformers_and_fairseq_algorithms(flavour):
    """transformers.AdamW (ATST) and fairseq's adam (EAT, AaSP's anchor) step by step; the two place the decay
    differently, so each flavour must also be off the other's reference."""
    rng = np.random.default_rng(0)
    raw = {
        "kernel": rng.normal(size=(3, 4)).astype(np.float32),
        "bias": rng.normal(size=(4,)).astype(np.float32),
    }
    params = nnx.State(
        {
            "kernel": nnx.Param(jnp.asarray(raw["kernel"]), axes=("embed", "mlp")),
            "bias": nnx.Param(jnp.asarray(raw["bias"]), axes=("mlp",)),
        }
    )
    lrs = [0.0, 1e-2, 5e-3, 2e-2, 1e-3]
    wds = [0.04, 0.1, 0.2, 0.3, 0.4]
    tx = optim.hf_adamw(
        lambda s: jnp.asarray(lrs)[s],
        lambda s: jnp.asarray(wds)[s],
        mask=optim.decay_mask(params),
        flavour=flavour,
    )
    state = tx.init(params)
    grads_seq = []
    for _ in range(5):
        g = {k: rng.normal(size=v.shape).astype(np.float32) * 1e-3 for k, v in raw.items()}
        grads_seq.append(g)
        grads = nnx.State({k: params.raw_mapping[k].replace(jnp.asarray(g[k])) for k in g})
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    decay = {"kernel": True, "bias": False}
    ref = _hf_adamw_numpy(raw, grads_seq, lrs, wds, decay, decay_first=flavour == "fairseq")
    other = _hf_adamw_numpy(raw, grads_seq, lrs, wds, decay, decay_first=flavour != "fairseq")
    for k in raw:
        np.testing.assert_allclose(np.asarray(params[k].get_value()), ref[k], rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(params["kernel"].get_value()) - other["kernel"]).max() > 1e-6


def test_weight_decay_groups():
    enc = EncoderConfig(width=32, depth=2, heads=2)
    student = Student(enc, AtstFrameConfig(proj_hidden=16, proj_dim=8), rngs=nnx.Rngs(0))
    mask = nnx.to_flat_state(optim.decay_mask(nnx.state(student, nnx.Param)))
    flat = {"/".join(map(str, path)): v.get_value() for path, v in mask}
    assert flat["encoder/pos_embed"] and flat["encoder/mask_embed"]
    assert flat["encoder/patch_embed/kernel"] and flat["encoder/blocks/attn/qkv/kernel"]
    assert flat["projector/fc1/kernel"] and flat["predictor/fc2/kernel"]
    assert not flat["encoder/patch_embed/bias"] and not flat["encoder/blocks/mlp/fc1/bias"]
    assert not flat["encoder/blocks/norm1/scale"]  # stacked [L, D] but 1-D per layer
    assert not flat["encoder/norm/scale"] and not flat["projector/bn/scale"]


def test_gradient_clipping_matches_the_pytorch_recipes():
    """global_norm = torch clip_grad_norm_ (one factor for the tree); per_param = DINO/ASiT clip_gradients (a
    factor per parameter); both leave small gradients untouched."""
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.3, 0.4]])}  # norms 5 and 0.5; total √25.25
    total = np.sqrt(25.25)
    g = optim.clip_gradients(grads, "global_norm", 1.0)
    np.testing.assert_allclose(g["a"], np.array([3.0, 4.0]) / (total + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(g["b"], np.array([[0.3, 0.4]]) / (total + 1e-6), rtol=1e-6)
    p = optim.clip_gradients(grads, "per_param", 1.0)
    np.testing.assert_allclose(p["a"], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(p["b"], [[0.3, 0.4]], rtol=1e-6)  # under the bound: unchanged
    big = optim.clip_gradients(grads, "global_norm", 10.0)
    np.testing.assert_allclose(big["a"], [3.0, 4.0], rtol=1e-6)
    assert optim.clip_gradients(grads, "none", 1.0) is grads


def test_per_param_clipping_clips_each_layer_of_a_stacked_leaf():
    """The blocks' parameters are stacked ``[L, …]``; DINO/ASiT ``clip_gradients`` sees one tensor per layer, so
    each layer slice is clipped by its own norm: a layer under the bound is untouched, one over it is scaled to
    the bound, whatever the other layers hold. Unstacked leaves are clipped on their own."""
    rng = np.random.default_rng(0)
    layer = rng.normal(size=(3, 4)).astype(np.float32)
    layer /= np.linalg.norm(layer)
    g_stacked = np.stack([0.5 * layer, 7.0 * layer, 2.0 * layer])  # norms 0.5, 7, 2 at max_norm 1
    g_flat = (3.0 * layer[0]).astype(np.float32)  # norm 3·|row 0|
    params = nnx.State(
        {
            "blocks": nnx.Param(
                jnp.zeros((3, 3, 4)), axes=("embed", "mlp")
            ),  # stacked: axes name 2 of 3 dims
            "head": nnx.Param(jnp.zeros((4,)), axes=("mlp",)),
        }
    )
    layers = optim.layer_dims(params)
    assert layers["blocks"].get_value() == 1 and layers["head"].get_value() == 0
    grads = nnx.State(
        {
            "blocks": params["blocks"].replace(jnp.asarray(g_stacked)),
            "head": params["head"].replace(jnp.asarray(g_flat)),
        }
    )
    out = optim.clip_gradients(grads, "per_param", 1.0, layers=layers)
    got = np.asarray(out["blocks"].get_value())
    np.testing.assert_array_equal(got[0], g_stacked[0])  # under the bound: left untouched
    np.testing.assert_allclose(got[1], layer / (1.0 + 1e-6 / 7.0), rtol=1e-6)  # scaled to the bound
    np.testing.assert_allclose(got[2], layer / (1.0 + 1e-6 / 2.0), rtol=1e-6)
    n = np.linalg.norm(g_flat)
    want = g_flat * min(1.0, 1.0 / (n + 1e-6))
    np.testing.assert_allclose(np.asarray(out["head"].get_value()), want, rtol=1e-6)

    # The optimizer reads the layers from its params: two steps (Adam's first step alone does not see a
    # gradient's scale) give the same parameters as AdamW fed the gradients clipped layer by layer above.
    lr, wd = (lambda s: jnp.asarray(1e-2)), (lambda s: jnp.asarray(0.0))
    tx, ref_tx = optim.hf_adamw(lr, wd, grad_clip="per_param", clip_norm=1.0), optim.hf_adamw(lr, wd)
    p, q, st, ref_st = params, params, tx.init(params), ref_tx.init(params)
    for scale in (1.0, 0.1):
        g = jax.tree.map(lambda x, s=scale: x * s, grads)
        u, st = tx.update(g, st, p)
        p = optax.apply_updates(p, u)
        v, ref_st = ref_tx.update(optim.clip_gradients(g, "per_param", 1.0, layers=layers), ref_st, q)
        q = optax.apply_updates(q, v)
    np.testing.assert_allclose(
        np.asarray(p["blocks"].get_value()), np.asarray(q["blocks"].get_value()), rtol=1e-6
    )
    unclipped = optim.hf_adamw(lr, wd)
    r, r_st = params, unclipped.init(params)
    for scale in (1.0, 0.1):
        u, r_st = unclipped.update(jax.tree.map(lambda x, s=scale: x * s, grads), r_st, r)
        r = optax.apply_updates(r, u)
    assert not np.allclose(np.asarray(p["blocks"].get_value())[1], np.asarray(r["blocks"].get_value())[1])


def test_weight_decay_schedules():
    import ml_collections

    o = ml_collections.ConfigDict({"wd_start": 0.05, "wd_end": 0.4, "wd_schedule": "constant"})
    np.testing.assert_allclose([float(optim.weight_decay_schedule(o, 100)(s)) for s in (0, 50, 99)], 0.05)
    o.wd_schedule = "cosine"
    cos = optim.weight_decay_schedule(o, 100)
    np.testing.assert_allclose(float(cos(0)), 0.05, rtol=1e-6)
    assert float(cos(99)) > 0.39
