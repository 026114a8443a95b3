"""The BYOL-style networks and loss terms shared by the ATST methods (spec/methods.md §1–§2).

Student = encoder → projector → predictor, teacher = encoder → projector, with the official
``build_mlp(2, ..., last_bn=False)`` heads (``BNMLP``); ``2 − 2·cos`` pairs with ``F.normalize`` semantics and
the official ``compute_var`` collapse monitor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atst_jax.models.encoder import EncoderConfig, FrameAST
from atst_jax.models.heads import BNMLP
from atst_jax.models.layers import BN_EPS, BN_MOMENTUM


class Student(nnx.Module):
    def __init__(self, enc: EncoderConfig, cfg, *, rngs: nnx.Rngs):
        self.encoder = FrameAST(enc, rngs=rngs)
        self.projector = BNMLP(enc.width, cfg.proj_hidden, cfg.proj_dim, in_axis="embed", rngs=rngs)
        self.predictor = BNMLP(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim, in_axis="proj_out", rngs=rngs)


class Teacher(nnx.Module):
    def __init__(self, enc: EncoderConfig, cfg, *, rngs: nnx.Rngs):
        self.encoder = FrameAST(enc, rngs=rngs)
        self.projector = BNMLP(enc.width, cfg.proj_hidden, cfg.proj_dim, in_axis="embed", rngs=rngs)


def init_byol(rng, enc: EncoderConfig, cfg, covers):
    """Student (encoder, projector, predictor) and teacher (encoder, projector); the teacher starts as an
    exact copy of the student's covered parts (parameters and BN buffers), as the official
    ``load_state_dict`` does."""
    student = Student(enc, cfg, rngs=nnx.Rngs(params=rng))
    teacher = Teacher(enc, cfg, rngs=nnx.Rngs(params=jax.random.fold_in(rng, 1)))
    for name in covers:
        nnx.update(getattr(teacher, name), nnx.state(getattr(student, name)))
    return student, teacher


def byol_pair(pred, target, weights, groups: int = 1):
    """``2 − 2·cos(pred, target)`` averaged over the rows with weight 1 (stop-gradient is the caller's).

    ``groups > 1``: the leading axis (R rows) is cut into that many consecutive blocks, row ``i`` in block
    ``i·groups // R`` (equal blocks when ``groups`` divides R, else sizes differing by at most one), each
    averaged over its own rows, and the loss is the mean over blocks — DDP's gradient average of per-GPU
    means."""
    if groups == 1:
        denom = jnp.maximum(jnp.sum(weights), 1.0)
        return 2.0 - 2.0 * jnp.sum(cosine(pred, target) * weights) / denom
    rows = weights.shape[0]
    block = jnp.arange(rows) * groups // rows
    per_row = (cosine(pred, target) * weights).reshape(rows, -1).sum(axis=1)
    sims = jax.ops.segment_sum(per_row, block, num_segments=groups)
    count = jnp.maximum(
        jax.ops.segment_sum(weights.reshape(rows, -1).sum(axis=1), block, num_segments=groups), 1.0
    )
    return 2.0 - 2.0 * jnp.mean(sims / count)


def bn_head(mlp: BNMLP, x, weights, groups: int = 1, clips: int | None = None, *, use_running_average=False):
    """``mlp(x, weights)`` with the BatchNorm statistics taken per group of clips (``groups > 1``).

    ``x [R, ..., C]``: R rows = one or more stacked views of ``clips`` clips each (``[view 1; view 2]``); the
    clips are cut into ``groups`` equal consecutive blocks and a block's statistics cover its clips in every
    view — what one GPU's plain BatchNorm sees under DDP without SyncBN. Running statistics: each group's
    update (PyTorch's: biased variance normalises, unbiased variance is tracked), averaged over the groups —
    a stand-in for DDP, where every GPU tracks its own and rank 0's are the ones saved."""
    if groups == 1 or use_running_average:
        return mlp(x, weights, use_running_average=use_running_average)
    h = mlp.fc1(x)
    bn, shape, dtype = mlp.bn, h.shape, h.dtype
    clips = shape[0] if clips is None else clips
    hg = h.astype(jnp.float32).reshape(shape[0] // clips, groups, clips // groups, -1, shape[-1])
    wg = weights.astype(jnp.float32).reshape(hg.shape[:-1])
    count = jnp.maximum(jnp.sum(wg, axis=(0, 2, 3)), 1.0)  # [G]
    mean = jnp.einsum("vgck,vgckd->gd", wg, hg) / count[:, None]
    centred = hg - mean[None, :, None, None]
    var = jnp.einsum("vgck,vgckd->gd", wg, jnp.square(centred)) / count[:, None]
    unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))[:, None]
    m = BN_MOMENTUM
    bn.running_mean[...] = (1 - m) * bn.running_mean[...] + m * jax.lax.stop_gradient(jnp.mean(mean, 0))
    bn.running_var[...] = (1 - m) * bn.running_var[...] + m * jax.lax.stop_gradient(jnp.mean(unbiased, 0))
    bn.num_batches_tracked[...] = bn.num_batches_tracked[...] + 1
    y = centred * jax.lax.rsqrt(var + BN_EPS)[None, :, None, None]
    if bn.scale is not None:
        y = y * bn.scale[...] + bn.bias[...]
    return mlp.fc2(jax.nn.relu(y.reshape(shape).astype(dtype)))


def cosine(a, b):
    """Cosine similarity on the last axis with F.normalize's eps (1e-12) semantics."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), 1e-12)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), 1e-12)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def normalized_std(x, weights):
    """Mean over dims of the std of L2-normalised vectors over real rows (official ``compute_var``:
    unbiased variance, ``sqrt(var + 1e-6)``) — the collapse monitor."""
    x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    w = weights.astype(jnp.float32).reshape(-1)
    n = jnp.sum(w)
    s = w @ x  # matmul reductions (see MaskedBatchNorm)
    ss = w @ jnp.square(x)
    var = ss / (n - 1) - jnp.square(s) / (n * (n - 1))
    return jnp.mean(jnp.sqrt(var + 1e-6))


def use_student_bn_stats(student, teacher):
    """Eval-mode teacher (``teacher_train_mode=False``): its projector BatchNorm normalises with running
    statistics, and the stated source of those is the student projector's (EMA covers parameters, not
    buffers, so the teacher's own would never move)."""
    nnx.update(teacher.projector.bn, nnx.state(student.projector.bn, nnx.BatchStat))
