"""The mixup bank of ATST-Frame / ATST-Clip (official BYOL-A ``Mixup(n_memory=2000)``): an empty bank leaves
examples unmixed, the ring is a FIFO of whole global batches (the same whatever the microbatches), partners
come only from its filled slots, the methods carry it in their state from one loss call to the next, and a
train step with it (and ATST-Frame's per-group BatchNorm and loss means) stays finite."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import CONFIG, config_path

from atst_jax import sharding as shd
from atst_jax.checkpoint import to_pure
from atst_jax.data import views
from atst_jax.methods import atst_frame, build
from atst_jax.models.stems import make_stem
from atst_jax.train import Trainer, load_config

F, T = 3, 5


def _bank(size, batch):
    return views.mixup_bank_init(size, batch, {"spec": (F, T)})


def _write(state, x):
    return views.mixup_bank_update(state, {"spec": jnp.asarray(x)})


def _spec(state):
    return np.asarray(state["mixup_bank"]["spec"][...])


def test_empty_bank_leaves_examples_unmixed_and_mixes_with_the_given_partner():
    state = _bank(6, 4)
    assert _spec(state).shape == (4, 2, F, T)  # ⌈6 / 4⌉ = 2 whole batches
    x = jax.random.normal(jax.random.key(0), (8, F, T))
    z, use = views.mixup_bank_partners(jax.random.key(1), state, ("spec",), 8)[0]
    assert not np.asarray(use).any()
    np.testing.assert_array_equal(np.asarray(views.mixup(jax.random.key(2), x, 0.4, z, use)), np.asarray(x))

    # With a partner: y = log((1 − λ)·e^x + λ·e^z + eps), λ ~ U(0, 0.4) per row, the in-batch path's λ draw.
    partner = jax.random.normal(jax.random.key(3), (8, F, T))
    use = jnp.arange(8) < 6
    y = np.asarray(views.mixup(jax.random.key(2), x, 0.4, partner, use), np.float64)
    xn, zn = np.asarray(x, np.float64), np.asarray(partner, np.float64)
    np.testing.assert_array_equal(y[6:], xn[6:])  # rows without a partner: untouched
    lam = 0.4 * np.asarray(jax.random.uniform(jax.random.split(jax.random.key(2))[0], (8, 1, 1)))
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(y[:6], np.log((1 - lam) * np.exp(xn) + lam * np.exp(zn) + eps)[:6], atol=1e-5)
    assert 0 <= lam.min() and lam.max() <= 0.4 and lam.std() > 0.05


def test_bank_is_a_fifo_of_whole_batches_whatever_the_microbatches():
    batches = [
        (np.full((4, F, T), i + 1.0) + np.arange(4)[:, None, None] / 10).astype(np.float32) for i in range(3)
    ]
    state = _bank(6, 4)
    for i, x in enumerate(batches):
        state = _write(state, x)
        assert int(state["mixup_filled"]) == min(i + 1, 2)
    bank = _spec(state)
    # Three batches into two slots: the third overwrote the first (the oldest); the second is next to go.
    np.testing.assert_array_equal(bank[:, 0], batches[2])
    np.testing.assert_array_equal(bank[:, 1], batches[1])
    assert int(state["mixup_pos"]) == 4  # slot 1 (rows written, modulo 2 slots × 4)

    # Gradient accumulation: microbatch j holds rows j, j+k, … (train.py) and writes exactly those rows.
    for k in (2, 4):
        acc = _bank(6, 4)
        for i, x in enumerate(batches):
            for j in range(k):
                acc = _write(acc, x[j::k])
                # A slot is filled once its last microbatch is in: nothing half-written is ever drawn.
                assert int(acc["mixup_filled"]) == min(i + (j == k - 1), 2)
        np.testing.assert_array_equal(_spec(acc), bank)
        assert int(acc["mixup_pos"]) == int(state["mixup_pos"])


def test_partners_are_drawn_uniformly_from_the_filled_slots_only():
    state = _write(_bank(8, 4), np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, F, T)))
    # Slot 1 is not filled yet: put a sentinel there that must never be drawn.
    sentinel = _spec(state).copy()
    sentinel[:, 1] = -1.0
    state["mixup_bank"]["spec"] = state["mixup_bank"]["spec"].replace(jnp.asarray(sentinel))
    z, use = views.mixup_bank_partners(jax.random.key(0), state, ("spec",), 400)[0]
    z = np.asarray(z)[:, 0, 0]
    assert np.asarray(use).all() and set(np.unique(z)) == {0.0, 1.0, 2.0, 3.0}
    assert np.bincount(z.astype(int)).min() > 60  # uniform over the 4 filled entries (100 expected each)

    full = _write(state, 10 + np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, F, T)))
    z = np.asarray(views.mixup_bank_partners(jax.random.key(1), full, ("spec",), 800)[0][0])[:, 0, 0]
    values, counts = np.unique(z, return_counts=True)
    assert set(values) == {0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0} and counts.min() > 60
    # Two draws from one bank (ATST-Frame's two views) are independent.
    a, b = views.mixup_bank_partners(jax.random.key(2), full, ("spec", "spec"), 64)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def _frame(**fields):
    config = load_config(CONFIG + ":tiny")
    config.model.update(width=64, depth=1, heads=1, drop_path=0.0)
    config.train.global_batch = 4
    config.atst_frame.update(proj_hidden=32, proj_dim=16, crop_seconds=1.0, mixup_bank=6, **fields)
    return build(config)


def _frame_batch(seed):
    rng = np.random.default_rng(seed)
    spec = rng.uniform(-1, 0.5, (4, 64, 101)).astype(np.float32)
    return {"spec": jnp.asarray(spec), "spec_length": jnp.asarray([101, 101, 101, 70], jnp.int32)}


def test_frame_first_step_is_unmixed_and_the_views_mix_from_the_bank():
    method, plain = _frame(), _frame(mixup_ratio=0.0)  # plain never mixes: no bank
    assert jax.eval_shape(lambda: plain.init(jax.random.key(0))[2]) == {}
    state = views.mixup_bank_init(6, 4, {"spec": (64, 101)})
    abstract = jax.eval_shape(lambda: method.init(jax.random.key(0))[2])
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state
    )
    assert _spec(state).shape == (4, 2, 64, 101)
    stem = make_stem(method.enc_cfg)
    b1, key = _frame_batch(1), jax.random.key(5)

    @jax.jit
    def view2(state):  # the step's view 2 (the augmented one), with its partners drawn as the loss does
        partners = views.mixup_bank_partners(jax.random.fold_in(key, 3), state, ("spec", "spec"), 4)
        return atst_frame.prepare_inputs(jax.random.split(key, 3)[0], b1, method.cfg, stem, partners)[0][4:]

    unmixed = jax.jit(
        lambda: atst_frame.prepare_inputs(jax.random.split(key, 3)[0], b1, plain.cfg, stem)[0]
    )()
    np.testing.assert_array_equal(np.asarray(view2(state)), np.asarray(unmixed[4:]))  # empty bank: warp only
    state = views.mixup_bank_update(state, {"spec": _frame_batch(2)["spec"]})
    assert np.abs(np.asarray(view2(state)) - np.asarray(unmixed[4:])).mean() > 1e-3  # now mixed


def test_clip_keeps_one_bank_per_crop():
    config = load_config(config_path("atst_clip") + ":tiny")
    config.train.global_batch = 4
    config.atst_clip.update(anchor_seconds=1.0, positive_seconds=0.5, mixup_bank=4)
    state = jax.eval_shape(lambda: build(config).init(jax.random.key(0))[2])
    shapes = {k: v.shape for k, v in to_pure(state)["mixup_bank"].items()}
    assert shapes == {"anchor": (4, 1, 64, 101), "positive": (4, 1, 64, 51)}


def test_train_step_with_the_bank_and_per_group_means_is_finite():
    """ATST-Frame on 8 devices with gradient accumulation (the bank written microbatch by microbatch), the
    mixup bank, and per-group BatchNorm and loss means."""
    config = load_config(CONFIG + ":tiny")
    config.model.update(depth=1, width=64, heads=2)
    config.atst_frame.update(crop_seconds=1.0, proj_hidden=32, proj_dim=16, mixup_bank=20)
    config.atst_frame.update(bn_groups=2, loss_groups=4)
    config.train.update(global_batch=16, grad_accum_steps=2)
    trainer = Trainer(config, shd.make_mesh({"data": 8}))
    state, step = trainer.init(0), trainer.jit_train_step()
    rng = np.random.default_rng(0)
    specs = []
    for _ in range(2):
        host = {
            "spec": rng.uniform(-1, 0.5, (16, 64, 101)).astype(np.float32),
            "spec_length": rng.integers(60, 102, (16,)).astype(np.int32),
        }
        specs.append(host["spec"])
        state, metrics = step(
            state, {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in host.items()}
        )
        assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
        filled = int(state["method"]["mixup_filled"])
        assert filled == len(specs) and int(state["method"]["mixup_pos"]) == 16 * len(specs) % 32
    method = jax.device_get(to_pure(state["method"]))
    np.testing.assert_array_equal(method["mixup_bank"]["spec"][:, 0], specs[0])  # whole batches, in order
    np.testing.assert_array_equal(method["mixup_bank"]["spec"][:, 1], specs[1])
    assert (int(method["mixup_pos"]), int(method["mixup_filled"])) == (0, 2)
