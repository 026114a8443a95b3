"""Fine-tuning and ATST-C2F (``atst_jax.finetune``), the method's parts: the layer-wise LR factors (read off
the optimizer's actual update), the learning-rate schedule, the C2F loss against hand-computed values, the
C2F teacher's chunks and modes, mixup, and the ``--recipe`` presets. The command end to end — C2F on the
embedded data, stop and resume, the --out folder's owner, the checks before any work — is
test_finetune_resume.py."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atst_jax.data import views
from atst_jax.eval import finetune as ft
from atst_jax.eval import finetune_run as ftr
from atst_jax.models.encoder import EncoderConfig, FrameAST


def test_layer_decay_gives_the_stated_per_block_factors():
    """Depth 3, d = 0.5, momentum and clipping off: every parameter moves by −lr · factor · grad, the peak
    lr being ``--lr · batch / 256``, with the official indexing (stem d^3, blocks d^3, d^2, d, final norm d,
    head 1; at frame level stem d^4 and final norm 1)."""
    d, depth, lr = 0.5, 3, 0.1
    cfg = EncoderConfig(width=16, depth=depth, heads=1, num_pos=9, drop_path=0.0)
    # Shapes are all the optimizer needs here (built abstractly: no initialiser runs).
    model = nnx.eval_shape(
        lambda: ft.FinetuneModel(FrameAST(cfg, rngs=nnx.Rngs(0)), 3, "clip", rngs=nnx.Rngs(1))
    )
    params = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    opts = ft.FinetuneOptions(lr=lr * 256 / 32, batch=32, layer_decay=d, momentum=0.0, clip_norm=0.0)
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
    # Frame level (the official SED code): the stem one step below block 0, the final norm at the head's 1.
    frame = ft.layer_scales(params, depth, d, "frame")
    np.testing.assert_allclose(frame["encoder"]["patch_embed"]["kernel"], d**4, rtol=1e-6)
    np.testing.assert_allclose(frame["encoder"]["pos_embed"], d**4, rtol=1e-6)
    qkv = np.asarray(frame["encoder"]["blocks"]["attn"]["qkv"]["kernel"]).ravel()
    np.testing.assert_allclose(qkv, [d**3, d**2, d], rtol=1e-6)
    np.testing.assert_allclose(frame["encoder"]["norm"]["scale"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(frame["linear"]["kernel"], 1.0, rtol=1e-6)
    # Clipping acts on the raw gradients, before the layer factors (torch's clip_grad_norm_ then per-group
    # LRs): a clipped update keeps the same ratios between layers.
    opts = dataclasses.replace(opts, clip_norm=1e-3)
    tx, _ = ft.make_optimizer(params, depth, opts, total_steps=10, warmup_steps=0)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    norm = float(optax.tree.norm(grads))
    got = np.asarray(updates["encoder"]["blocks"]["attn"]["qkv"]["kernel"][0]).ravel()[0]
    assert got == pytest.approx(-lr * d**3 * 1e-3 / norm, rel=1e-4)


def test_the_first_step_learns_even_when_the_warm_up_spans_the_whole_run():
    """``--epochs 1`` on a small set is a single step, with the default warm-up of one epoch a warm-up of one
    step: that step must move the parameters (a ramp from rate 0 took it at rate 0 and returned the
    pretrained encoder bit for bit). The ramp reaches the peak on the warm-up's last step; the cosine after it
    starts at the peak and ends at 1e-6 as before."""
    params = {"w": jnp.zeros((3,), jnp.float32)}  # not the encoder: the head's factor 1
    opts = ft.FinetuneOptions(lr=16.0, batch=16, momentum=0.0, clip_norm=0.0)  # peak 16 · 16 / 256 = 1
    tx, schedule = ft.make_optimizer(params, 1, opts, total_steps=1, warmup_steps=1)
    assert float(schedule(0)) == pytest.approx(1.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -1.0)
    _, schedule = ft.make_optimizer(params, 1, opts, total_steps=10, warmup_steps=4)
    lrs = np.array([float(schedule(t)) for t in range(11)])
    np.testing.assert_allclose(lrs[:5], [0.25, 0.5, 0.75, 1.0, 1.0], rtol=1e-6)
    assert (np.diff(lrs[4:]) < 0).all() and lrs[9] > ft.FINAL_LR
    assert lrs[10] == pytest.approx(ft.FINAL_LR)
    _, schedule = ft.make_optimizer(params, 1, opts, total_steps=1, warmup_steps=0)
    assert float(schedule(0)) == pytest.approx(1.0)


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
# The C2F teacher runs in chunks of its own crop
# ----------------------------------------------------------------------------------------------------------

T_CHUNK, CROP, K = 40, 100, 3  # the teacher's crop (10 tokens), the student's (25 tokens: 3 chunks), classes
LENGTHS = np.array([100, 90, 60, 20], np.int32)  # chunk frames: 40/40/20, 40/40/10, 40/20/0, 20/0/0


def _poisoned_teacher(tmp_path, level, drop_path=0.0):
    """A fine-tuned model saved and reloaded as ``--teacher`` would be: trained crop ``T_CHUNK`` frames, its
    positional slots past that crop NaN (never trained, so anything), (clip) its BatchNorm statistics not 0/1.
    Two blocks with drop-path (the first block's rate is 0), else one."""
    depth = 2 if drop_path else 1
    cfg = EncoderConfig(width=16, depth=depth, heads=1, num_pos=1 + CROP // 4, use_cls=True, drop_path=0.0)
    model = ft.FinetuneModel(FrameAST(cfg, rngs=nnx.Rngs(3)), K, level, rngs=nnx.Rngs(4))
    pos = model.encoder.pos_embed
    pos[...] = pos[...].at[:, 1 + T_CHUNK // 4 :].set(jnp.nan)
    rs = np.random.default_rng(5)
    if level == "clip":
        model.bn.mean[...] = jnp.asarray(rs.normal(size=model.bn.mean.shape), jnp.float32)
        model.bn.var[...] = jnp.asarray(rs.uniform(0.5, 2.0, size=model.bn.var.shape), jnp.float32)
    meta = {"task": "clip_multi" if level == "clip" else "sed", "classes": [f"c{k}" for k in range(K)]}
    meta |= {
        "features": "atst_logmel64",
        "chunk_frames": T_CHUNK,
        "time_step_s": 0.04,
        "drop_path": drop_path,
    }
    ft.save_finetuned(model, tmp_path / level, meta)
    return ft.load_finetuned(tmp_path / level)[0]


def _student(level):
    cfg = EncoderConfig(width=16, depth=1, heads=1, num_pos=1 + CROP // 4, drop_path=0.0)
    return ft.FinetuneModel(FrameAST(cfg, rngs=nnx.Rngs(6)), K, level, rngs=nnx.Rngs(7))


def _batch():
    rs = np.random.default_rng(8)
    spec = rs.normal(size=(len(LENGTHS), 64, CROP)).astype(np.float32)
    for row, n in enumerate(LENGTHS):
        spec[row, :, n:] = 0.0
    return jnp.asarray(spec), jnp.asarray(LENGTHS)


# The Python-level model, compiled (op-by-op dispatch on a few piece shapes costs seconds).
_call = nnx.jit(lambda m, spec, length: m(spec, length))
_call_train = nnx.jit(lambda m, spec, length: m(spec, length, train=True))


def _chunk_pieces(spec, n):
    """The whole-token pieces of one clip's chunks, each alone: ``[(piece [1, F, 4·tokens], tokens)]``."""
    out = []
    for a in range(0, CROP, T_CHUNK):
        tokens = max(0, min(T_CHUNK, int(n) - a)) // 4
        if tokens:
            out.append((spec[None, :, a : a + 4 * tokens], tokens))
    return out


def _bn_linear(model, x, batch_stats):
    """The head by hand: BatchNorm (no affine; the batch's biased statistics or the running ones), Linear."""
    x = np.asarray(x, np.float64)
    mean, var = (x.mean(0), x.var(0)) if batch_stats else (model.bn.mean[...], model.bn.var[...])
    x = (x - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + ft.BN_EPS)
    return x @ np.asarray(model.linear.kernel[...], np.float64) + np.asarray(model.linear.bias[...])


def test_c2f_clip_teacher_runs_in_chunks_of_its_crop_in_train_mode(tmp_path):
    """Student crop 100 frames, teacher crop 40: the distillation's teacher logits come from 40-frame chunks
    (the NaN positional slots past the teacher's crop never reach them), equal to the teacher run on each
    chunk by itself, ``[CLS ‖ mean]`` averaged over the chunks, then the head — on batch statistics (the
    official clip-level teacher is in train mode). The average is the official one by default: equal weights,
    a later chunk only when it holds more than half a chunk (rows 0 and 2 drop their 20-frame last chunk);
    ``--teacher_chunks valid`` weights every chunk by its tokens. The loss of a training step is the C2F loss
    on exactly those logits."""
    teacher = _poisoned_teacher(tmp_path, "clip")
    student = _student("clip")
    spec, length = _batch()
    y = jnp.asarray(np.random.default_rng(9).integers(0, 2, (len(LENGTHS), K)), jnp.float32)
    lam = 0.5
    opts = ft.FinetuneOptions(distill_lambda=lam, momentum=0.0, clip_norm=0.0)
    tuner = ft.Finetuner(student, "clip_multi", CROP, opts, teacher=teacher)
    # Independent reference: the Python-level teacher on every chunk on its own.
    feats, feats_valid = [], []
    for row in range(len(LENGTHS)):
        parts = _chunk_pieces(np.asarray(spec[row]), LENGTHS[row])
        outs = [
            np.asarray(_call(teacher.encoder, jnp.asarray(p), jnp.asarray([p.shape[-1]]))[0])
            for p, _ in parts
        ]
        f = np.stack([np.concatenate([o[0], o[1:].mean(0)]) for o in outs])
        w = np.array([t for _, t in parts], np.float64)
        feats_valid.append((f * w[:, None]).sum(0) / w.sum())
        counts = [i == 0 or 4 * t > T_CHUNK // 2 for i, (_, t) in enumerate(parts)]
        feats.append(f[counts].mean(0))
    assert [len(_chunk_pieces(np.asarray(spec[r]), n)) for r, n in enumerate(LENGTHS)] == [3, 3, 2, 1]
    want = _bn_linear(teacher, np.stack(feats), batch_stats=True)
    assert np.isfinite(want).all()
    # A training step: its loss is the C2F loss with that teacher (the student's own logits, on batch
    # statistics, are the Python-level model's: no drop-path at rate 0).
    student_logits, _ = _call_train(student, spec, length)
    tuner._build(total_steps=4, warmup_steps=0)
    opt_state = tuner.tx.init(tuner.params)
    key = jax.random.key(0)
    loss = tuner._step(tuner.params, tuner.rest, opt_state, tuner.t_state, spec, length, y, key)[3]
    assert np.isfinite(float(loss)), "the teacher read positional slots past its trained crop"
    expected = ft.c2f_loss(student_logits, y, jnp.asarray(want, jnp.float32), lam, softmax=False)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    got = np.asarray(tuner.teacher_logits(tuner.t_state, spec, length, key))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    valid_tuner = ft.Finetuner(
        student, "clip_multi", CROP, dataclasses.replace(opts, teacher_chunks="valid"), teacher
    )
    got = np.asarray(valid_tuner.teacher_logits(valid_tuner.t_state, spec, length, key))
    np.testing.assert_allclose(
        got, _bn_linear(teacher, np.stack(feats_valid), batch_stats=True), rtol=1e-4, atol=1e-5
    )
    # --teacher_mode eval: the running statistics instead (the encoder part is the same).
    eval_tuner = ft.Finetuner(
        student, "clip_multi", CROP, dataclasses.replace(opts, teacher_mode="eval"), teacher
    )
    got = np.asarray(eval_tuner.teacher_logits(eval_tuner.t_state, spec, length, key))
    np.testing.assert_allclose(
        got, _bn_linear(teacher, np.stack(feats), batch_stats=False), rtol=1e-4, atol=1e-5
    )


def test_c2f_frame_teacher_chunks_line_up_on_the_student_grid_and_train_mode_drops_paths(tmp_path):
    """SED: the teacher's per-step logits are its chunks' logits end to end on the student's 40 ms grid (eval
    mode by default: the official frame-level teacher is in ``eval()``), each step's token through the Linear
    alone (the official SED head has no BatchNorm). In train mode drop-path draws from the step's key."""
    teacher = _poisoned_teacher(tmp_path, "frame", drop_path=0.5)
    spec, length = _batch()
    tuner = ft.Finetuner(_student("frame"), "sed", CROP, ft.FinetuneOptions(), teacher=teacher)
    got = np.asarray(tuner.teacher_logits(tuner.t_state, spec, length, jax.random.key(0)))
    assert got.shape == (len(LENGTHS), CROP // 4, K)
    for row in range(len(LENGTHS)):
        parts = _chunk_pieces(np.asarray(spec[row]), LENGTHS[row])
        tokens = [
            np.asarray(_call(teacher.encoder, jnp.asarray(p), jnp.asarray([p.shape[-1]]))[0, 1:])
            for p, _ in parts
        ]
        want = np.concatenate(tokens) @ np.asarray(teacher.linear.kernel[...]) + np.asarray(
            teacher.linear.bias[...]
        )
        np.testing.assert_allclose(got[row, : len(want)], want, rtol=1e-4, atol=1e-5)
    assert not jax.tree.leaves(nnx.state(teacher, nnx.BatchStat))
    train = ft.Finetuner(_student("frame"), "sed", CROP, ft.FinetuneOptions(teacher_mode="train"), teacher)
    a, b = (np.asarray(train.teacher_logits(train.t_state, spec, length, jax.random.key(k))) for k in (0, 1))
    assert np.isfinite(a).all() and not np.allclose(a, b)
    again = np.asarray(train.teacher_logits(train.t_state, spec, length, jax.random.key(0)))
    np.testing.assert_array_equal(a, again)


def test_mixup_is_the_official_mixup_training_with_resize_crop_and_bce():
    """``--mixup``: mixup, then at clip level the RandomResizeCrop on both axes of the valid frames
    (``fold_in(key, 2)``), at frame level mixup alone; with the memory partner the step gets the batch mixed
    already and resize-crops it alone; and every loss BCE, single-label tasks included (softmax CE only
    without mixup)."""
    spec, length = _batch()
    y = jnp.eye(K)[jnp.array([0, 1, 2, 0])]

    @jax.jit
    def run(key):  # (one program: each mixup compiles a Beta sampler, seconds at -O0)
        clip, frame = (ft.augment(key, spec, length, y, 0.5, level) for level in ("clip", "frame"))
        memory = ft.augment(key, spec, length, y, 0.5, "clip", "memory")
        k = jax.random.fold_in(key, 2)
        return clip, frame, memory, ft.random_resize_crop_valid(k, frame[0], frame[1]), (k, spec, length)

    clip, frame, memory, warped, (k, *_) = run(jax.random.key(3))
    clip, frame, memory, warped = jax.tree.map(np.asarray, (clip, frame, memory, warped))
    # Frame level: a mix (the targets mixed alike); clip level: that same mix, resize-cropped.
    assert not np.allclose(frame[0], np.asarray(spec)) and not np.allclose(frame[2], np.asarray(y))
    np.testing.assert_array_equal(clip[0], warped)
    assert not np.allclose(clip[0], frame[0])
    for a, b in zip(clip[1:], frame[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        memory[0], np.asarray(jax.jit(ft.random_resize_crop_valid)(k, spec, length))
    )
    np.testing.assert_array_equal(memory[1], np.asarray(length))
    np.testing.assert_array_equal(memory[2], np.asarray(y))
    model = _student("clip")
    assert ft.Finetuner(model, "clip_single", CROP, ft.FinetuneOptions()).loss_softmax
    assert not ft.Finetuner(model, "clip_single", CROP, ft.FinetuneOptions(mixup=0.5)).loss_softmax
    assert not ft.Finetuner(model, "clip_multi", CROP, ft.FinetuneOptions()).loss_softmax


def test_resize_crop_acts_on_each_clip_s_valid_frames_alone():
    """The fine-tuning RandomResizeCrop sees a clip as the official transform does, unpadded: on a padded
    crop its valid part is BYOL-A's crop of the clip alone (``views.random_resize_crop`` of the unpadded
    clip, the same draws), and the padding stays zero; a clip that fills its crop gets exactly
    ``views.random_resize_crop``."""
    rs = np.random.default_rng(4)
    x = jnp.asarray(rs.normal(size=(1, 64, 48)).astype(np.float32))
    key = jax.random.key(5)
    valid = jax.jit(ft.random_resize_crop_valid)
    for n in (48, 37, 1):
        padded = x.at[..., n:].set(0.0)
        got = np.asarray(valid(key, padded, jnp.array([n])))
        want = np.asarray(jax.jit(views.random_resize_crop)(key, x[..., :n]))
        np.testing.assert_allclose(got[..., :n], want, rtol=1e-5, atol=1e-5)
        assert not got[..., n:].any()


def _identified_clips(lengths):
    """Clips whose values name them: clip ``i`` is ``i + 1`` over its ``lengths[i]`` frames, its target the
    one-hot of class ``i`` (as many classes as clips)."""
    n = len(lengths)
    specs = [np.full((64, t), i + 1.0, np.float32) for i, t in enumerate(lengths)]
    data = ft.LabelledSet("mem", [str(i) for i in range(n)], specs, [], None, [str(i) for i in range(n)], "x")
    return ft.TaskData(data, specs, list(np.eye(n, dtype=np.float32)))


def test_mixup_memory_partner_is_one_stored_earlier_example_and_the_memory_is_fifo():
    """``--mixup`` (memory partner, the default): the run's first example unmixed; every later one
    ``x·λ + x'·(1 − λ)`` (targets alike) with ``x'`` one of the ``--mixup_memory`` examples seen before it,
    stored unmixed (earlier ones of its own batch included, as the official per-example loop); a shorter
    partner mixed into a window of the clip, a longer one's window mixed into it, the length kept; and the
    memory the last ``--mixup_memory`` examples, oldest first out."""
    lengths = [20, 20, 12, 20, 8, 20, 20, 16, 20, 20]
    td, memory, batch = _identified_clips(lengths), 6, 4
    opts = ft.FinetuneOptions(mixup=0.5, mixup_memory=memory, batch=batch, epochs=2, seed=3)
    tuner = ft.Finetuner(_student("clip"), "clip_multi", 20, opts)
    tuner._build(4, 1)
    st = tuner.initial_state(td, 16)
    seen = []

    def step(params, rest, opt_state, t_state, spec, length, y, key):
        seen.append((np.asarray(spec), np.asarray(length), np.asarray(y)))
        return params, rest, opt_state, 0.0, 0.0

    tuner._step, order = step, []
    for epoch in range(2):
        assert tuner._train_epoch(st, td, batch, 2, None, lambda: 0.0)
        order += list(np.random.default_rng((3, epoch)).permutation(10)[: 2 * batch])
        st.epoch, st.batch = epoch + 1, 0
    spec, length, y = (np.concatenate(a) for a in zip(*seen, strict=True))
    for r, i in enumerate(order):
        n = lengths[i]
        assert length[r] == n and not spec[r, :, n:].any()
        if r == 0:  # nothing stored yet: unmixed
            np.testing.assert_array_equal(spec[r, :, :n], i + 1.0)
            np.testing.assert_array_equal(y[r], np.eye(10)[i])
            continue
        lam = y[r, i]
        partners = [j for j in np.flatnonzero(y[r]) if j != i] or [i]
        assert len(partners) == 1 and partners[0] in order[max(0, r - memory) : r]
        j = partners[0]
        np.testing.assert_allclose(y[r].sum(), 1.0, rtol=1e-6)
        mixed = lam * (i + 1) + (1 - lam) * (j + 1)
        cols = spec[r, 0, :n]
        window = np.isclose(cols, mixed, rtol=1e-5)
        if j == i:
            np.testing.assert_allclose(cols, i + 1.0, rtol=1e-5)
        elif lengths[j] >= n:
            assert window.all()
        else:  # a shorter partner: a window of its length, the rest the clip itself
            (at,) = np.flatnonzero(window)[:1]
            assert window.sum() == lengths[j] and window[at : at + lengths[j]].all()
            np.testing.assert_array_equal(cols[~window], i + 1.0)
    bank = st.mixup
    assert bank.filled == memory and len(bank.length) == memory
    ring = [(bank.pos + k) % memory for k in range(memory)]
    assert [int(bank.y[s].argmax()) for s in ring] == order[-memory:]
    for s, i in zip(ring, order[-memory:], strict=True):
        np.testing.assert_array_equal(bank.spec[s, :, : lengths[i]], i + 1.0)  # stored before its mixing
        assert bank.length[s] == lengths[i]


# ----------------------------------------------------------------------------------------------------------
# --recipe: the official per-task presets
# ----------------------------------------------------------------------------------------------------------

_PATHS = ["--weights", "enc.msgpack", "--train", "tr", "--test", "te", "--out", "out"]


def test_recipe_fills_each_family_s_official_values_and_given_flags_win():
    from atst_jax.eval import recipes

    args = ftr._parser().parse_args(_PATHS + ["--recipe", "spcv2"])
    want = {
        "clip": dict(lr=0.5, batch=512, epochs=50, warmup_epochs=5, layer_decay=0.75, mixup=0.5, crop_s=6.0),
        "frame": dict(
            lr=1.0, batch=512, epochs=50, warmup_epochs=5, layer_decay=0.75, mixup=10.0, crop_s=10.0
        ),
        "c2f": dict(lr=2.0, batch=512, epochs=50, mixup=0.5, crop_s=10.0, distill_lambda=0.5),
    }
    for family, values in want.items():
        opts, record = ftr.resolve_options(args, family)
        assert {k: getattr(opts, k) for k in values} == values, family
        assert record["name"] == "spcv2" and record["family"] == family and record["given"] == []
        assert record["source"].startswith("audiossl/methods/")
    # Options a preset does not set keep their defaults; so does every option without --recipe.
    opts, _ = ftr.resolve_options(args, "frame")
    assert (opts.momentum, opts.clip_norm, opts.median_s) == (0.9, 3.0, 0.28)
    plain = ftr._parser().parse_args(_PATHS)
    assert ftr.resolve_options(plain, "frame") == (ft.FinetuneOptions(), None)
    # Flags given win over the preset — 0 included (given, not "unset") —, and are recorded as given.
    args = ftr._parser().parse_args(
        _PATHS + ["--recipe", "SPCV2", "--lr", "0.3", "--mixup", "0", "--batch", "64"]
    )
    opts, record = ftr.resolve_options(args, "frame")
    assert (opts.lr, opts.mixup, opts.batch, opts.epochs, opts.crop_s) == (0.3, 0.0, 64, 50, 10.0)
    assert record["given"] == ["--batch", "--lr", "--mixup"] and record["preset"]["lr"] == 1.0
    line = ftr.recipe_line("finetuned", opts, record)
    assert "recipe spcv2 (ATST-Frame values" in line and "flags given: --batch, --lr, --mixup" in line
    assert "\n" not in line
    # Frame-level tasks translate the unscaled official rate to the rate of 256 (AS-strong Frame: 1e-3 at
    # a batch of 32), and set the median filter; aliases name the official tasks.
    args = ftr._parser().parse_args(_PATHS + ["--recipe", "audioset_strong"])
    opts, record = ftr.resolve_options(args, "frame")
    assert (opts.batch, opts.median_s, record["name"]) == (32, 0.28, "as_strong")
    assert ft.peak_lr(opts) == pytest.approx(1e-3)
    assert ftr.resolve_options(ftr._parser().parse_args(_PATHS + ["--recipe", "as20k"]), "clip")[1][
        "name"
    ] == ("audioset_b")
    # Every preset passes the flags' own checks and sets only preset-able options.
    for task in recipes.names():
        for family in recipes.families_of(task):
            assert set(recipes.preset(task, family).values) <= set(recipes.FIELDS)
            ftr.resolve_options(ftr._parser().parse_args(_PATHS + ["--recipe", task]), family)
    # The family of a plain run: a CLS token takes the ATST-Clip values.
    assert ftr.family_of(EncoderConfig(use_cls=True)) == "clip" and ftr.family_of(EncoderConfig()) == "frame"


def test_unknown_recipe_or_one_without_c2f_values_is_one_line_exit_2(capsys):
    assert ftr.main(_PATHS + ["--recipe", "esc50", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown --recipe 'esc50'" in err and "spcv2" in err and "as20k" in err
    # US8K has no official C2F script: a distillation run with it stops before reading anything.
    assert ftr.main(_PATHS + ["--recipe", "us8k", "--c2f_clip", "clip_run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ATST-C2F" in err and "voxceleb1" in err
