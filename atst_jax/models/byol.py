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


def byol_pair(pred, target, weights):
    """``2 − 2·cos(pred, target)`` averaged over the rows with weight 1 (stop-gradient is the caller's)."""
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    return 2.0 - 2.0 * jnp.sum(cosine(pred, target) * weights) / denom


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
