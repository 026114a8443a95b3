"""ATST-Frame: frame-level teacher-student pretraining (spec/methods.md §1).

Recipe, as the official audiossl code runs it:

- One 10 s crop per clip gives **two time-aligned views**: view 1 clean, view 2 = log-mixup-exp with another
  clip + frequency warp (official ``aug_tea=False, aug_stu=True``; both switchable).
- One span mask per clip (≈50 % of the 250 tokens), **shared by both views**. The student sees masked input
  (``mask_embed``); the teacher sees the unmasked views. Both are read out only at masked positions.
- Both views go through both networks in one batch ``[view 1; view 2]``. Student:
  encoder → projector → predictor; teacher: encoder → projector (stop-gradient). BatchNorm statistics are
  taken over all masked tokens of both views of the global batch (SyncBN). The teacher runs in train mode
  as in the official code (drop-path on, BN batch statistics), switchable with ``teacher_train_mode``.
- Loss: ``2 − 2·cos`` between the student prediction of one view and the teacher projection of the other,
  mean over masked tokens, averaged over the two pairs.
- Teacher = EMA of the student's encoder and projector parameters (not BN buffers).

The trainer knows only ``init``, ``loss`` and ``EMA_COVERS``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from atst_jax.data import views
from atst_jax.models.encoder import EncoderConfig, FrameAST
from atst_jax.models.heads import BNMLP

# The teacher's parameters are an EMA of these student sub-modules (same names on both sides).
EMA_COVERS = ("encoder", "projector")


@dataclasses.dataclass(frozen=True)
class AtstFrameConfig:
    mask_ratio: float = 0.65
    mask_span: int = 5
    min_spans: int = 2
    mixup_ratio: float = 0.4
    freq_scale: tuple[float, float] = (0.6, 1.5)
    aug_view1: bool = False  # official aug_tea
    aug_view2: bool = True  # official aug_stu
    proj_hidden: int = 4096
    proj_dim: int = 256
    teacher_train_mode: bool = True
    symmetric: bool = True

    @classmethod
    def from_config(cls, method_config) -> AtstFrameConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(method_config).items() if k in fields}
        if "freq_scale" in kwargs:
            kwargs["freq_scale"] = tuple(kwargs["freq_scale"])
        return cls(**kwargs)


class Student(nnx.Module):
    def __init__(self, enc: EncoderConfig, cfg: AtstFrameConfig, *, rngs: nnx.Rngs):
        self.encoder = FrameAST(enc, rngs=rngs)
        self.projector = BNMLP(enc.width, cfg.proj_hidden, cfg.proj_dim, in_axis="embed", rngs=rngs)
        self.predictor = BNMLP(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim, in_axis="proj_out", rngs=rngs)


class Teacher(nnx.Module):
    def __init__(self, enc: EncoderConfig, cfg: AtstFrameConfig, *, rngs: nnx.Rngs):
        self.encoder = FrameAST(enc, rngs=rngs)
        self.projector = BNMLP(enc.width, cfg.proj_hidden, cfg.proj_dim, in_axis="embed", rngs=rngs)


def init(rng, encoder_config: EncoderConfig, method_config: AtstFrameConfig):
    """Student and teacher; the teacher starts as an exact copy of the student's encoder and projector
    (parameters and BN buffers), as the official ``load_state_dict`` does."""
    student = Student(encoder_config, method_config, rngs=nnx.Rngs(params=rng))
    teacher = Teacher(encoder_config, method_config, rngs=nnx.Rngs(params=jax.random.fold_in(rng, 1)))
    for name in EMA_COVERS:
        nnx.update(getattr(teacher, name), nnx.state(getattr(student, name)))
    return student, teacher, {}


def make_views(key, spec, cfg: AtstFrameConfig):
    """Two time-aligned views of the same crop ``spec [B, F, T]``."""

    def augment(k, x):
        k_mix, k_warp = jax.random.split(k)
        if cfg.mixup_ratio > 0:
            x = views.mixup(k_mix, x, cfg.mixup_ratio)
        return views.freq_warp(k_warp, x, cfg.freq_scale)

    k1, k2 = jax.random.split(key)
    v1 = augment(k1, spec) if cfg.aug_view1 else spec
    v2 = augment(k2, spec) if cfg.aug_view2 else spec
    return v1, v2


def _cosine(a, b):
    """Cosine similarity on the last axis with F.normalize's eps (1e-12) semantics."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), 1e-12)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), 1e-12)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def normalized_std(x, weights):
    """Mean over dims of the std of L2-normalised vectors over real tokens (official ``compute_var``:
    unbiased variance, ``sqrt(var + 1e-6)``) — the collapse monitor."""
    x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    w = weights.astype(jnp.float32).reshape(-1)
    n = jnp.sum(w)
    s = w @ x  # matmul reductions (see MaskedBatchNorm)
    ss = w @ jnp.square(x)
    var = ss / (n - 1) - jnp.square(s) / (n * (n - 1))
    return jnp.mean(jnp.sqrt(var + 1e-6))


def prepare_inputs(key, batch, cfg: AtstFrameConfig, encoder: FrameAST):
    """Views and masks of one step: ``x [2B, F, T]`` = [view 1; view 2], their lengths, the token mask
    ``[2B, N]`` (the same mask for both views of a clip) and the indices/validity of the masked tokens."""
    spec, length = batch["spec"], batch["length"]
    b, _, frames = spec.shape
    n_tok = encoder.num_tokens(frames)
    k_mask, k_view = jax.random.split(key)
    mask = views.span_mask(
        k_mask, b, n_tok, ratio=cfg.mask_ratio, span=cfg.mask_span, min_spans=cfg.min_spans
    )
    mask = mask & (jnp.arange(n_tok)[None, :] < encoder.token_lengths(length)[:, None])
    v1, v2 = make_views(k_view, spec, cfg)
    x = jnp.concatenate([v1, v2], axis=0)  # both views through both networks in one batch
    lengths = jnp.concatenate([length, length], axis=0)
    mask2 = jnp.concatenate([mask, mask], axis=0)
    capacity = views.mask_capacity(n_tok, cfg.mask_ratio, cfg.mask_span, cfg.min_spans)
    idx, valid = views.gather_masked(mask2, capacity)
    return x, lengths, mask2, idx, valid


def loss(student: Student, teacher: Teacher, batch, key, cfg: AtstFrameConfig):
    """One ATST-Frame loss evaluation on a global batch ``{"spec": [B, F, T], "length": [B]}``."""
    b = batch["spec"].shape[0]
    enc = student.encoder
    k_in, k_stu, k_tea = jax.random.split(key, 3)
    x, lengths, mask2, idx, valid = prepare_inputs(k_in, batch, cfg, enc)

    # Teacher: unmasked input, read out at the masked positions; no gradient.
    t_tok = teacher.encoder(x, lengths, None, train=cfg.teacher_train_mode, key=k_tea)
    z = teacher.projector(views.take_tokens(t_tok, idx), valid)
    z = jax.lax.stop_gradient(z)

    s_tok = student.encoder(x, lengths, mask2, train=True, key=k_stu)
    p = student.predictor(student.projector(views.take_tokens(s_tok, idx), valid), valid)

    w = valid.astype(jnp.float32)
    z1, z2 = z[:b], z[b:]
    p1, p2 = p[:b], p[b:]
    w1 = w[:b]  # identical masks for both views
    denom = jnp.maximum(jnp.sum(w1), 1.0)

    def pair(pred, target):
        return 2.0 - 2.0 * jnp.sum(_cosine(pred, target) * w1) / denom

    if cfg.symmetric:
        total = 0.5 * (pair(p2, z1) + pair(p1, z2))
    else:
        total = pair(p2, z1)
    metrics = {
        "loss": total,
        "std_frm_stu": normalized_std(p, valid),
        "std_frm_tea": normalized_std(z, valid),
        "mask_frac": jnp.sum(mask2) / jnp.maximum(jnp.sum(enc.token_lengths(lengths)), 1),
    }
    return total, metrics


def method_config(config) -> AtstFrameConfig:
    return AtstFrameConfig.from_config(config.atst_frame)
