"""Fine-tuning and ATST-C2F (``atst_jax.finetune``): the layer-wise LR factors (read off the optimizer's
actual update), the C2F loss against hand-computed values, and the C2F recipe end to end (Clip fine-tune →
Frame fine-tuned with and without distillation) on the embedded generator's weak labels, with one-block
checkpoints written directly (no pretraining: the path is the point, not the numbers)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import prepare_dcase
from flax import nnx

from atst_jax import finetune as ft
from atst_jax.models.encoder import EncoderConfig, FrameAST

N_TRAIN = 40


def test_layer_decay_gives_the_stated_per_block_factors():
    """Depth 3, d = 0.5, momentum and clipping off: every parameter moves by −lr · factor · grad, with the
    official indexing (stem d^3, blocks d^3, d^2, d, final norm d, head 1)."""
    d, depth, lr = 0.5, 3, 0.1
    cfg = EncoderConfig(width=16, depth=depth, heads=1, num_pos=9, drop_path=0.0)
    # Shapes are all the optimizer needs here (built abstractly: no initialiser runs).
    model = nnx.eval_shape(
        lambda: ft.FinetuneModel(FrameAST(cfg, rngs=nnx.Rngs(0)), 3, "clip", rngs=nnx.Rngs(1))
    )
    params = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    opts = ft.FinetuneOptions(lr=lr, layer_decay=d, momentum=0.0, clip_norm=0.0)
    tx, schedule = ft.make_optimizer(params, depth, opts, total_steps=10, warmup_steps=0)
    assert float(schedule(0)) == pytest.approx(lr)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    factor = jax.tree.map(lambda u: np.asarray(-u / lr), updates)
    enc = factor["encoder"]
    np.testing.assert_allclose(enc["patch_embed"]["kernel"], d**3, rtol=1e-6)
    np.testing.assert_allclose(enc["pos_embed"], d**3, rtol=1e-6)
    np.testing.assert_allclose(enc["mask_embed"], d**3, rtol=1e-6)
    qkv = enc["blocks"]["attn"]["qkv"]["kernel"]  # stacked [L, ...]
    for b, want in enumerate([d**3, d**2, d]):
        np.testing.assert_allclose(qkv[b], want, rtol=1e-6)
    np.testing.assert_allclose(enc["norm"]["scale"], d, rtol=1e-6)
    np.testing.assert_allclose(factor["linear"]["kernel"], 1.0, rtol=1e-6)
    # Clipping acts on the raw gradients, before the layer factors (torch's clip_grad_norm_ then per-group
    # LRs): a clipped update keeps the same ratios between layers.
    opts = ft.FinetuneOptions(lr=lr, layer_decay=d, momentum=0.0, clip_norm=1e-3)
    tx, _ = ft.make_optimizer(params, depth, opts, total_steps=10, warmup_steps=0)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    norm = float(optax.tree.norm(grads))
    got = np.asarray(updates["encoder"]["blocks"]["attn"]["qkv"]["kernel"][0]).ravel()[0]
    assert got == pytest.approx(-lr * d**3 * 1e-3 / norm, rel=1e-4)


def _bce(z, t):
    p = 1 / (1 + math.exp(-z))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_c2f_loss_matches_its_formula_on_hand_computed_logits():
    lam = 0.3
    # Single-label: soft-target CE with softmax(teacher), task CE with the one-hot target.
    s = np.array([[2.0, 0.0, -1.0]])
    t = np.array([[0.0, 1.0, 0.0]])
    y = np.array([[1.0, 0.0, 0.0]])
    log_p = s - np.log(np.exp(s).sum())
    q = np.exp(t) / np.exp(t).sum()
    want = lam * -(q * log_p).sum() + (1 - lam) * -log_p[0, 0]
    got = float(ft.c2f_loss(jnp.asarray(s), jnp.asarray(y), jnp.asarray(t), lam, softmax=True))
    assert got == pytest.approx(want, rel=1e-6)
    # Multi-label: BCE on sigmoid(teacher) and on the labels, mean over classes.
    s = np.array([[1.5, -0.5]])
    t = np.array([[-2.0, 0.7]])
    y = np.array([[1.0, 0.0]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    distill = (_bce(1.5, sig(-2.0)) + _bce(-0.5, sig(0.7))) / 2
    task = (_bce(1.5, 1.0) + _bce(-0.5, 0.0)) / 2
    got = float(ft.c2f_loss(jnp.asarray(s), jnp.asarray(y), jnp.asarray(t), lam, softmax=False))
    assert got == pytest.approx(lam * distill + (1 - lam) * task, rel=1e-6)
    # Frame level: per-step BCE over the valid steps only (the padded step is ignored whatever it holds).
    s = np.array([[[1.0], [-1.0], [50.0]]])
    t = np.array([[[0.0], [2.0], [-50.0]]])
    y = np.array([[[1.0], [1.0], [0.0]]])
    valid = np.array([[True, True, False]])
    distill = (_bce(1.0, 0.5) + _bce(-1.0, sig(2.0))) / 2
    task = (_bce(1.0, 1.0) + _bce(-1.0, 1.0)) / 2
    got = float(
        ft.c2f_loss(
            jnp.asarray(s), jnp.asarray(y), jnp.asarray(t), lam, softmax=False, valid=jnp.asarray(valid)
        )
    )
    assert got == pytest.approx(lam * distill + (1 - lam) * task, rel=1e-6)
    # λ = 0 is plain fine-tuning, λ = 1 pure distillation.
    assert float(
        ft.c2f_loss(jnp.asarray(s), jnp.asarray(y), jnp.asarray(t), 0.0, False, jnp.asarray(valid))
    ) == (pytest.approx(task, rel=1e-6))


# ----------------------------------------------------------------------------------------------------------
# End to end: C2F on the embedded data
# ----------------------------------------------------------------------------------------------------------


def _write_run(root, config_file, width=64, seed=0):
    """A one-block ``tiny`` checkpoint of the config's method at its initialisation (step 1)."""
    from atst_jax.checkpoint import Checkpointer
    from atst_jax.methods import build
    from atst_jax.train import load_config

    config = load_config(f"configs/{config_file}:tiny")
    config.model.width, config.model.depth, config.model.heads = width, 1, 1
    student, teacher, _ = build(config).init(jax.random.key(seed))
    state = {
        "step": np.asarray(1, np.int32),
        "params": nnx.to_pure_dict(nnx.state(student, nnx.Param)),
        "teacher": nnx.to_pure_dict(nnx.state(teacher, nnx.Param)),
        "opt": {"count": np.asarray(1, np.int32)},
        "rng": np.zeros((2,), np.uint32),
    }
    ckpt = Checkpointer(root, save_every=1, keep=1, async_save=False)
    ckpt.save(1, state, config=config, force=True)
    ckpt.close()
    return root


@pytest.fixture(scope="module")
def weak(tmp_path_factory, embedded_cache):
    from atst_jax.data import synthetic

    rows = sorted(synthetic.read_strong_tsv(os.path.join(embedded_cache, "strong_labels.tsv")).items())
    root = tmp_path_factory.mktemp("ft_data")
    return (
        prepare_dcase(embedded_cache, rows[:N_TRAIN], str(root / "train"), strong=False),
        prepare_dcase(embedded_cache, rows[N_TRAIN:], str(root / "test"), strong=False),
    )


def test_c2f_runs_end_to_end_and_reports_distilled_beside_undistilled(tmp_path, weak):
    clip_run = _write_run(tmp_path / "clip_run", "atst_clip.py", seed=1)
    frame_run = _write_run(tmp_path / "frame_run", "atst_frame.py", seed=2)
    out = tmp_path / "c2f"
    argv = ["--workdir", str(frame_run), "--c2f_clip", str(clip_run), "--train", weak[0], "--test", weak[1]]
    argv += ["--out", str(out), "--epochs", "3", "--batch", "8", "--crop_s", "2", "--lr", "0.05"]
    argv += ["--no_progress", "--distill_lambda", "0.5"]
    assert ft.main(argv) == 0
    res = json.loads((out / "RESULTS.json").read_text())
    assert res["task"] == "clip_multi" and list(res["models"]) == ["clip", "frame", "frame_distilled"]
    for name, m in res["models"].items():
        assert 0.0 <= m["metrics"]["mAP"] <= 1.0, (name, m["metrics"])
        assert len(m["selection"]["history"]) == 3
        assert (out / name / "model" / "params.msgpack").is_file()
    assert res["models"]["frame_distilled"]["distilled"] and not res["models"]["frame"]["distilled"]
    # The distillation term changes what the Frame model learns (same seed, same batches otherwise).
    assert (
        res["models"]["frame"]["selection"]["history"]
        != res["models"]["frame_distilled"]["selection"]["history"]
    )
    # The saved teacher reloads and reproduces the test posteriors the run scored.
    model, meta = ft.load_finetuned(out / "clip")
    assert meta["task"] == "clip_multi" and model.encoder.cfg.use_cls
    # Training lowers the task loss on this structured data (the head starts from scratch).
    hist = res["models"]["frame"]["selection"]["history"]
    assert hist[-1]["loss"] < hist[0]["loss"], hist
    # A teacher fine-tuned on another task is refused with one line.
    bad = tmp_path / "bad_teacher"
    (bad / "model").mkdir(parents=True)
    doc = json.loads((out / "clip" / "model" / "model.json").read_text())
    (bad / "model" / "model.json").write_text(json.dumps({**doc, "classes": ["a", "b"]}))
    (bad / "model" / "params.msgpack").write_bytes((out / "clip" / "model" / "params.msgpack").read_bytes())
    with pytest.raises(ft.FinetuneError, match="another task"):
        ft.run(ft._parser().parse_args(argv[:2] + ["--teacher", str(bad)] + argv[4:]))
