"""Composed teacher-student pretraining: stem × masking × predictor × objectives, chosen in the config from the
parts the recipes share (issue "Methods III", item 3; ``configs/compose.py``).

The recipes (ATST-Frame, ATST-Clip, ASiT, AaSP) stay their own methods, each as its paper runs it. This one
recombines their parts so a study can swap one part and keep the rest:

- **stem** (``model``): the ATST frame stem (64 bins × 4 frames), the 2-D patch stem, either with the AaPE
  branch (``model.aape``) — ``configs/compose.py:VARIANT,STEM`` with STEM ``frame | aape | patch2d |
  patch2d_aape``.
- **masking** (``masking``): the student sees ``num_masks`` = M masked copies of each clip; the EMA teacher
  encodes the clean clip **once**.

  * ``span`` — ATST-Frame's span masks over the time steps (a 2-D patch grid masks whole time columns);
    masked tokens become ``mask_embed`` and stay in the sequence; an AaPE branch does not see their frames.
  * ``gmml`` — ASiT's group-masked corruption of the pixels (zeros, or pixels pasted from another clip); a
    token counts as masked when any of its pixels was replaced; no mask token. An AaPE branch reads the
    corrupted crop, which is exactly what the student sees (no token is hidden from it).
  * ``inverse_block`` — data2vec 2.0 / EAT / AaSP: a fixed visible count per copy (``1 − mask_ratio`` of the
    tokens, grown as blocks of ``mask_block``); the masked tokens are **dropped**, so the student's trunk
    runs on the visible tokens only; an AaPE branch runs once per copy on that copy's visible tokens
    (``FrameAST.embed_visible``).
- **predictor** (``predictor``): what answers at a masked position.

  * ``bn_mlp`` — the student's own output at that position, through the objective's BN-MLP where it has one:
    for ``frame_byol`` the official ATST predictor in projection space (encoder → projector → predictor),
    for ``regression`` a BN-MLP D → ``pred_hidden`` → D; ``dino`` and ``reconstruction`` read the output
    directly, as ASiT does. Needs the masked tokens in the sequence (``span`` or ``gmml``).
  * ``cross_attention`` — ``models/masked_prediction.CrossPredictor``: queries = the positional embeddings of
    the masked positions, keys / values = the student's visible tokens (queries never see each other); its
    D-wide answers feed every token objective.
- **objectives** (weights, 0 = off; the loss is their weighted sum):

  * ``frame_byol`` — ``2 − 2·cos`` between the student's prediction and the teacher projector's output at
    each masked token (ATST-Frame); BN statistics over the masked tokens of the batch.
  * ``clip_byol`` — the same on the clip embedding (CLS, or the mean over the student's visible tokens):
    student clip projector → clip predictor vs the teacher's clip projector on the clean clip (ATST-Clip).
  * ``dino`` — DINO cross-entropy with centring on the clip embedding (``dino_prototypes``) plus on every
    masked token (``dino_token_prototypes``), one shared head (ASiT's L_cls + L_data); the two centres are
    the method state.
  * ``reconstruction`` — L1 between a reconstruction head's output and the clean patch pixels of the
    masked tokens (ASiT's L_rec over whole masked patches).
  * ``regression`` — MSE to the mean of the teacher's instance-normalised top ``top_k_layers`` blocks, then a
    LayerNorm (data2vec 2.0 / AaSP).
  * ``contrastive`` — InfoNCE across the M copies of a clip (positives) vs every copy of the other clips,
    each copy's embedding the mean of its predictor answers (AaSP's regulariser); needs M ≥ 2.

Where the shapes do not allow a combination, ``check`` says so in one line (``bn_mlp`` with
``inverse_block``: the student never computes a dropped token; ``contrastive`` with one copy).

Exactness against the recipes, tested in ``tests/test_compose.py``: frame stem × ``span`` × ``bn_mlp`` ×
``frame_byol`` with M = 1 is ATST-Frame's single-pair loss (``symmetric=False``, no augmentation, teacher in
train mode); 2-D stem × ``inverse_block`` × ``cross_attention`` × ``regression`` + ``contrastive`` is AaSP's
loss without its utterance term. What differs from each recipe when combined: no view augmentation (both
networks see the same crop; the teacher clean, the student masked), the teacher without drop-path unless
``teacher_drop_path``, and every masking producing M copies.

Monitors: ``std_tea`` (the official ``compute_var`` of the teacher's L2-normalised final tokens: → 0 on
collapse) and ``std_pred`` (the same for the student's answers at the masked positions).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from atst_jax import flops
from atst_jax.data import views
from atst_jax.features import DEFAULT_FEATURES
from atst_jax.methods.base import Crop, Method
from atst_jax.models import collapse
from atst_jax.models.byol import byol_pair, normalized_std
from atst_jax.models.dino import DinoHead, ReconstructionHead, centre_update, dino_cross_entropy
from atst_jax.models.encoder import FrameAST
from atst_jax.models.heads import BNMLP
from atst_jax.models.masked_prediction import (
    CrossPredictor,
    l2_normalize,
    layer_targets,
    masked_mean,
    multi_view_info_nce,
)
from atst_jax.models.stems import make_stem
from atst_jax.sharding import ConfigError

MASKINGS = ("span", "gmml", "inverse_block")
PREDICTORS = ("bn_mlp", "cross_attention")
OBJECTIVES = ("frame_byol", "clip_byol", "dino", "reconstruction", "regression", "contrastive")
TOKEN_OBJECTIVES = ("frame_byol", "dino", "reconstruction", "regression")


@dataclasses.dataclass(frozen=True)
class ComposeConfig:
    crop_frames: int = 1001
    features: str = DEFAULT_FEATURES
    # masking
    masking: str = "inverse_block"  # span | gmml | inverse_block
    num_masks: int = 4  # M masked copies per clip (the teacher still runs once)
    mask_ratio: float = 0.65  # span: target ratio; inverse_block: the masked fraction (fixed visible count)
    mask_span: int = 5  # span: time steps per span
    min_spans: int = 2
    mask_block: tuple[int, int] = (5, 5)  # inverse_block: (time, freq) tokens of a visible block
    corrupt_area: tuple[float, float] = (0.5, 0.7)  # gmml (ASiT's defaults)
    paste_prob: float = 0.5
    paste_area: tuple[float, float] = (0.3, 0.3)
    max_block: float = 0.3
    # predictor
    predictor: str = "cross_attention"  # bn_mlp | cross_attention
    pred_hidden: int = 4096  # bn_mlp: hidden units of the BN-MLP predictors
    pred_dim: int = 512  # cross_attention: width, blocks, heads
    pred_depth: int = 2
    pred_heads: int = 8
    pred_mlp_ratio: float = 4.0
    # objective weights (0 = off)
    frame_byol: float = 1.0
    clip_byol: float = 0.0
    dino: float = 0.0
    reconstruction: float = 0.0
    regression: float = 0.0
    contrastive: float = 0.1
    # objective settings
    proj_hidden: int = 4096  # BYOL projectors (frame and clip)
    proj_dim: int = 256
    top_k_layers: int = 8  # regression targets, clipped to the depth
    instance_norm_targets: bool = True
    dino_hidden: int = 2048
    dino_bottleneck: int = 256
    dino_prototypes: int = 8192
    dino_token_prototypes: int = 1024
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    centre_momentum: float = 0.9
    rec_hidden: int = 768
    rec_bottleneck: int = 128
    contrast_temp: float = 0.1
    teacher_drop_path: bool = False  # ATST's teacher runs with drop-path on; data2vec / EAT / AaSP's without
    # Allowed values, checked before anything compiles (atst_jax.knobs).
    RANGES: ClassVar[dict[str, str]] = {
        "crop_frames": "[1, inf)",
        "num_masks": "[1, inf)",
        "mask_ratio": "(0, 1)",
        "mask_span": "[1, inf)",
        "min_spans": "[0, inf)",
        "mask_block": "[1, inf) pair",
        "corrupt_area": "(0, 1) ordered",
        "paste_prob": "[0, 1]",
        "paste_area": "(0, 1) ordered",
        "max_block": "(0, 1]",
        "pred_hidden": "[1, inf)",
        "pred_dim": "[1, inf)",
        "pred_depth": "[1, inf)",
        "pred_heads": "[1, inf)",
        "pred_mlp_ratio": "(0, inf)",
        "frame_byol": "[0, inf)",
        "clip_byol": "[0, inf)",
        "dino": "[0, inf)",
        "reconstruction": "[0, inf)",
        "regression": "[0, inf)",
        "contrastive": "[0, inf)",
        "proj_hidden": "[1, inf)",
        "proj_dim": "[1, inf)",
        "top_k_layers": "[1, inf)",
        "dino_hidden": "[1, inf)",
        "dino_bottleneck": "[1, inf)",
        "dino_prototypes": "[1, inf)",
        "dino_token_prototypes": "[1, inf)",
        "student_temp": "(0, inf)",
        "teacher_temp": "(0, inf)",
        "centre_momentum": "[0, 1)",
        "rec_hidden": "[1, inf)",
        "rec_bottleneck": "[1, inf)",
        "contrast_temp": "(0, inf)",
    }


def _on(cfg: ComposeConfig, objective: str) -> bool:
    return float(getattr(cfg, objective)) > 0


class Teacher(nnx.Module):
    """Encoder plus the heads the EMA tracks: the frame projector, the clip projector, the DINO head."""

    def __init__(self, enc, cfg: ComposeConfig, *, rngs: nnx.Rngs):
        self.encoder = FrameAST(enc, rngs=rngs)
        d = enc.width
        if _on(cfg, "frame_byol"):
            self.projector = BNMLP(d, cfg.proj_hidden, cfg.proj_dim, in_axis="embed", rngs=rngs)
        if _on(cfg, "clip_byol"):
            self.clip_projector = BNMLP(d, cfg.proj_hidden, cfg.proj_dim, in_axis="embed", rngs=rngs)
        if _on(cfg, "dino"):
            self.dino_head = DinoHead(
                d,
                cfg.dino_hidden,
                cfg.dino_bottleneck,
                cfg.dino_prototypes,
                cfg.dino_token_prototypes,
                rngs=rngs,
            )


class Student(Teacher):
    """The teacher's networks plus the student-only predictors and heads."""

    def __init__(self, enc, cfg: ComposeConfig, *, rngs: nnx.Rngs):
        super().__init__(enc, cfg, rngs=rngs)
        d = enc.width
        if cfg.predictor == "cross_attention":
            self.predictor = CrossPredictor(
                d, cfg.pred_dim, cfg.pred_depth, cfg.pred_heads, cfg.pred_mlp_ratio, rngs=rngs
            )
        elif _on(cfg, "frame_byol"):  # the official ATST predictor, in projection space
            self.predictor = BNMLP(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim, in_axis="proj_out", rngs=rngs)
        if cfg.predictor == "bn_mlp" and _on(cfg, "regression"):
            self.reg_predictor = BNMLP(d, cfg.pred_hidden, d, in_axis="embed", rngs=rngs)
        if _on(cfg, "clip_byol"):
            self.clip_predictor = BNMLP(
                cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim, in_axis="proj_out", rngs=rngs
            )
        if _on(cfg, "reconstruction"):
            patch = flops.patch_dim(enc)
            self.rec_head = ReconstructionHead(d, cfg.rec_hidden, cfg.rec_bottleneck, patch, rngs=rngs)


def _per_copy(x, idx, m: int):
    """Rows of the per-clip ``x [B, N, E]`` at each copy's positions ``idx [B·M, Q]`` → ``[B·M, Q, E]``."""
    b = x.shape[0]
    q = idx.shape[1]
    out = jnp.take_along_axis(x, idx.reshape(b, m * q)[..., None], axis=1)
    return out.reshape(b * m, q, x.shape[-1])


class Compose(Method):
    name = "compose"
    Config = ComposeConfig
    ema_covers = ("encoder",)  # the instance's tuple adds the teacher heads its objectives use
    monitors = ("std_tea", "std_pred")

    def __init__(self, config):
        super().__init__(config)
        heads = (("frame_byol", "projector"), ("clip_byol", "clip_projector"), ("dino", "dino_head"))
        self.ema_covers = ("encoder",) + tuple(name for obj, name in heads if _on(self.cfg, obj))

    # --- shapes -------------------------------------------------------------------------------------------
    def grid(self) -> tuple[int, int]:
        return make_stem(self.enc_cfg).grid(self.cfg.crop_frames)

    def num_tokens(self) -> int:
        n_t, n_f = self.grid()
        return n_t * n_f

    def num_visible(self) -> int:
        """inverse_block: tokens each copy keeps (the student's sequence length without a CLS token)."""
        return views.visible_count(self.num_tokens(), self.cfg.mask_ratio)

    def num_queries(self) -> int:
        """Masked positions answered per copy (static): the span capacity, all tokens (gmml), or N − V."""
        c = self.cfg
        n_t, n_f = self.grid()
        if c.masking == "span":
            return views.mask_capacity(n_t, c.mask_ratio, c.mask_span, c.min_spans) * n_f
        if c.masking == "gmml":
            return n_t * n_f
        return n_t * n_f - self.num_visible()

    def student_keys(self) -> int:
        """Tokens of each student sequence (CLS included)."""
        p = 1 if self.enc_cfg.use_cls else 0
        return p + (self.num_visible() if self.cfg.masking == "inverse_block" else self.num_tokens())

    def inputs(self):
        return (Crop("spec", self.cfg.crop_frames, self.cfg.features),)

    def init(self, rng):
        student = Student(self.enc_cfg, self.cfg, rngs=nnx.Rngs(params=rng))
        teacher = Teacher(self.enc_cfg, self.cfg, rngs=nnx.Rngs(params=jax.random.fold_in(rng, 1)))
        for name in self.ema_covers:  # the teacher starts as the student
            nnx.update(getattr(teacher, name), nnx.state(getattr(student, name)))
        state = {}
        if _on(self.cfg, "dino"):
            state = {
                "centre_cls": jnp.zeros((self.cfg.dino_prototypes,), jnp.float32),
                "centre_data": jnp.zeros((self.cfg.dino_token_prototypes,), jnp.float32),
            }
        return student, teacher, state

    # --- the student's masked copies -------------------------------------------------------------------
    def corrupt(self, key, x):
        c = self.cfg
        return views.gmml_corrupt(
            key,
            x,
            area=c.corrupt_area,
            paste_prob=c.paste_prob,
            paste_area=c.paste_area,
            max_block=c.max_block,
        )

    def student_forward(self, student, spec, length, token_valid, *, k_mask, k_stu):
        """The M masked copies through the student: its tokens ``[B·M, K, D]``, which of them are keys for the
        predictor, the positions to answer ``[B·M, Q]`` and which of those count, and the student's own
        outputs there (``None`` when the masked tokens were dropped)."""
        c, enc = self.cfg, student.encoder
        b, m = spec.shape[0], c.num_masks
        n_t, n_f = self.grid()
        n, p = n_t * n_f, enc.n_prefix
        rep = lambda x: jnp.repeat(x, m, axis=0)  # clip-major: rows c·M … c·M + M − 1 are clip c's copies
        valid = rep(token_valid)
        prefix = jnp.ones((b * m, p), bool)
        if c.masking == "inverse_block":
            block = (min(c.mask_block[0], n_t), min(c.mask_block[1], n_f))
            vis, hid = views.inverse_block_mask(
                k_mask, b * m, (n_t, n_f), self.num_visible(), block=block, valid=valid
            )
            v = vis.shape[1]
            # The patch projection once per clip, AaPE per copy from that copy's visible tokens only.
            kept = enc.embed_visible(spec, length, vis.reshape(b, m, v))
            kept_valid = jnp.take_along_axis(token_valid, vis.reshape(b, m * v), axis=1).reshape(b * m, v)
            if p:
                kept_valid = jnp.concatenate([prefix, kept_valid], axis=1)
            s_out = enc.trunk(kept, kept_valid, train=True, key=k_stu)
            q_ok = jnp.take_along_axis(valid, hid, axis=1)
            return s_out, kept_valid, hid, q_ok, None
        if c.masking == "span":
            steps = views.span_mask(
                k_mask, b * m, n_t, ratio=c.mask_ratio, span=c.mask_span, min_spans=c.min_spans
            )
            masked = jnp.repeat(steps, n_f, axis=1) & valid  # token t·n_f + f: whole time columns
            s_out = enc(rep(spec), rep(length), masked, train=True, key=k_stu)
            idx, q_ok = views.gather_masked(masked, self.num_queries())
            keys = jnp.concatenate([prefix, valid & ~masked], axis=1)
            own = views.take_tokens(s_out[:, p:], idx) if c.predictor == "bn_mlp" else None
            return s_out, keys, idx, q_ok, own
        corrupted, pixels = self.corrupt(k_mask, rep(spec))
        masked = (jnp.max(enc.patchify(pixels.astype(jnp.float32)), axis=-1) > 0) & valid
        s_out = enc(corrupted, rep(length), train=True, key=k_stu)
        idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b * m, n))
        keys = jnp.concatenate([prefix, valid], axis=1)  # corrupted tokens stay in the sequence
        return s_out, keys, idx, masked, s_out[:, p:]

    # --- loss ----------------------------------------------------------------------------------------
    def loss(self, student, teacher, method_state, batch, key, step):
        del step
        c = self.cfg
        spec, length = batch["spec"], batch["spec_length"]
        b, m = spec.shape[0], c.num_masks
        enc = student.encoder
        p, n = enc.n_prefix, self.num_tokens()
        k_mask, k_stu, k_tea = jax.random.split(key, 3)

        # Teacher: the clean clip, once.
        t_kw = dict(train=c.teacher_drop_path, key=k_tea if c.teacher_drop_path else None)
        if _on(c, "regression"):
            t_out, t_layers = teacher.encoder(spec, length, collect_layers=True, **t_kw)
        else:
            t_out, t_layers = teacher.encoder(spec, length, **t_kw), None
        t_out = jax.lax.stop_gradient(t_out)
        token_valid = enc.valid_mask(length, p + n)[:, p:]
        t_tok = t_out[:, p:]

        s_out, keys, idx, q_ok, own = self.student_forward(
            student, spec, length, token_valid, k_mask=k_mask, k_stu=k_stu
        )
        w = q_ok.astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(w), 1.0)
        if c.predictor == "cross_attention":
            pos = jnp.broadcast_to(enc.token_positions(n, jnp.dtype(enc.cfg.dtype))[0], (n, enc.cfg.width))
            answer = student.predictor(jnp.take(pos, idx, axis=0), s_out, keys).astype(jnp.float32)
        else:
            answer = own

        terms = {}
        if _on(c, "frame_byol"):
            if c.predictor == "bn_mlp":
                pred = student.predictor(student.projector(answer, q_ok), q_ok)
            else:
                pred = student.projector(answer, q_ok)
            z = jax.lax.stop_gradient(teacher.projector(_per_copy(t_tok, idx, m), q_ok))
            terms["frame_byol"] = byol_pair(pred, z, w)
        if _on(c, "regression"):
            k = min(c.top_k_layers, enc.cfg.depth)
            y = layer_targets(
                t_layers[:, :, p:], k, token_valid, instance_norm_layers=c.instance_norm_targets
            )
            pred = student.reg_predictor(answer, q_ok) if c.predictor == "bn_mlp" else answer
            err = jnp.mean(jnp.square(pred.astype(jnp.float32) - _per_copy(y, idx, m)), axis=-1)
            terms["regression"] = jnp.sum(err * w) / denom
        if _on(c, "reconstruction"):
            target = _per_copy(enc.patchify(spec.astype(jnp.float32)), idx, m)
            err = jnp.mean(jnp.abs(student.rec_head(answer) - target), axis=-1)
            terms["reconstruction"] = jnp.sum(err * w) / denom

        # Clip embeddings: CLS, or the mean over the student's visible tokens / the teacher's real tokens.
        s_keys = keys.at[:, :p].set(False) if p else keys
        s_clip = s_out[:, 0] if p else masked_mean(s_out, s_keys)
        t_clip = t_out[:, 0] if p else masked_mean(t_tok, token_valid)
        rows_s, rows_t = jnp.ones((b * m,), bool), jnp.ones((b,), bool)
        if _on(c, "clip_byol"):
            zs = student.clip_predictor(student.clip_projector(s_clip, rows_s), rows_s)
            zt = jax.lax.stop_gradient(teacher.clip_projector(t_clip, rows_t))
            terms["clip_byol"] = byol_pair(zs, jnp.repeat(zt, m, axis=0), rows_s.astype(jnp.float32))
        new_state = method_state
        if _on(c, "dino"):
            s_cls, s_data = student.dino_head(
                jnp.concatenate([s_clip[:, None], answer.astype(s_out.dtype)], 1)
            )
            t_cls, t_data = teacher.dino_head(jnp.concatenate([t_clip[:, None], t_tok], 1))
            t_cls, t_data = jax.lax.stop_gradient(t_cls), jax.lax.stop_gradient(t_data)
            ce = lambda s, t, centre, weights=None: dino_cross_entropy(
                s, t, centre, student_temp=c.student_temp, teacher_temp=c.teacher_temp, weights=weights
            )
            terms["dino"] = ce(s_cls, jnp.repeat(t_cls, m, axis=0), method_state["centre_cls"]) + ce(
                s_data, _per_copy(t_data, idx, m), method_state["centre_data"], q_ok
            )
            new_state = {
                "centre_cls": centre_update(method_state["centre_cls"], t_cls, c.centre_momentum),
                "centre_data": centre_update(
                    method_state["centre_data"], t_data, c.centre_momentum, token_valid
                ),
            }
        metrics = {}
        if _on(c, "contrastive"):
            emb = masked_mean(answer, q_ok)
            terms["contrastive"] = multi_view_info_nce(emb, m, c.contrast_temp)
            zn = l2_normalize(emb)
            sim = jnp.where(jnp.eye(b * m, dtype=bool), -jnp.inf, zn @ zn.T)
            nearest = jnp.argmax(sim, axis=1)
            metrics["nce_acc"] = jnp.mean((nearest // m == jnp.arange(b * m) // m).astype(jnp.float32))

        total = sum(float(getattr(c, name)) * value for name, value in terms.items())
        metrics.update({f"loss_{name}": value for name, value in terms.items()})
        metrics.update(
            loss=total,
            std_tea=normalized_std(t_tok, token_valid),
            std_pred=normalized_std(answer, q_ok),
            mask_frac=jnp.sum(w) / jnp.maximum(m * jnp.sum(token_valid), 1),
            **collapse.health(t_tok, token_valid),
        )
        return total, metrics, new_state

    def pictures(self, batch, key, step):
        """The first clip as the teacher sees it and its first masked copy with the masked tokens (or, for
        gmml, the replaced pixels) marked, drawn with the step's key."""
        del step
        c = self.cfg
        k_mask = jax.random.split(key, 3)[0]
        stem = make_stem(self.enc_cfg)
        spec = batch["spec"]
        if c.masking == "gmml":
            rows = jnp.repeat(spec, c.num_masks, axis=0)
            corrupted, pixels = self.corrupt(k_mask, rows)
            return [("clean (teacher)", spec[0], None), ("copy 1 (student: GMML)", corrupted[0], pixels[0])]
        n_t, n_f = self.grid()
        b, m, n = spec.shape[0], c.num_masks, n_t * n_f
        valid = jnp.repeat(jnp.arange(n)[None] < stem.token_lengths(batch["spec_length"])[:, None], m, axis=0)
        if c.masking == "span":
            steps = views.span_mask(
                k_mask, b * m, n_t, ratio=c.mask_ratio, span=c.mask_span, min_spans=c.min_spans
            )
            masked = jnp.repeat(steps, n_f, axis=1)[0] & valid[0]
        else:
            block = (min(c.mask_block[0], n_t), min(c.mask_block[1], n_f))
            vis, _ = views.inverse_block_mask(
                k_mask, b * m, (n_t, n_f), self.num_visible(), block=block, valid=valid
            )
            masked = jnp.ones((n,), bool).at[vis[0]].set(False)
        patches = jnp.broadcast_to(masked[None, :, None].astype(jnp.float32), (1, n, stem.patch_dim))
        overlay = jnp.zeros(spec.shape[1:], jnp.float32)
        pix = stem.unpatchify(patches)[0]
        overlay = overlay.at[:, : pix.shape[1]].set(pix)
        title = "dropped" if c.masking == "inverse_block" else "mask_embed"
        return [
            ("clean (teacher)", spec[0], None),
            (f"copy 1 (student: {c.masking}, {title})", spec[0], overlay),
        ]

    # --- cost, checks --------------------------------------------------------------------------------
    def step_flops(self, global_batch: int) -> float:
        parts = self.flops_breakdown(global_batch)
        return float(parts["teacher"] + flops.TRAIN_FACTOR * parts["student"])

    def flops_breakdown(self, global_batch: int) -> dict[str, float]:
        """Forward matmul FLOPs per step: the teacher's one pass and heads (not trained), the student's
        copies, predictor and heads (trained: × 3 in ``step_flops``)."""
        c, enc = self.cfg, self.enc_cfg
        b, m = global_batch, c.num_masks
        r, n, q, k = b * m, self.num_tokens(), self.num_queries(), self.student_keys()
        p, d = (1 if enc.use_cls else 0), enc.width
        # The teacher's pass and the health monitors' covariance of its tokens.
        teacher = flops.encoder_forward(enc, n, b) + flops.token_covariance(b, n, d)
        if c.masking == "inverse_block":
            v = self.num_visible()
            student = flops.embed_visible(enc, n, v, b, m) + flops.trunk_forward(enc, p + v, r)
        else:
            student = flops.encoder_forward(enc, n, r)
            if c.masking == "span" and c.predictor == "bn_mlp":
                student += flops.token_gather(r, q, n, d)
        rows = r * q
        if c.predictor == "cross_attention":
            student += 2 * rows * d * c.pred_dim * 2
            student += c.pred_depth * flops.cross_block_forward(q, k, c.pred_dim, d, c.pred_mlp_ratio, r)
        if _on(c, "frame_byol"):
            student += flops.bnmlp_forward(rows, d, c.proj_hidden, c.proj_dim)
            teacher += flops.bnmlp_forward(rows, d, c.proj_hidden, c.proj_dim)
            if c.predictor == "bn_mlp":
                student += flops.bnmlp_forward(rows, c.proj_dim, c.proj_hidden, c.proj_dim)
        if _on(c, "regression") and c.predictor == "bn_mlp":
            student += flops.bnmlp_forward(rows, d, c.pred_hidden, d)
        if _on(c, "reconstruction"):
            h, o = c.rec_hidden, c.rec_bottleneck
            student += 2 * rows * (d * h + h * h + h * o) + 2 * rows * o * flops.patch_dim(enc)
        if _on(c, "clip_byol"):
            student += flops.bnmlp_forward(r, d, c.proj_hidden, c.proj_dim)
            student += flops.bnmlp_forward(r, c.proj_dim, c.proj_hidden, c.proj_dim)
            teacher += flops.bnmlp_forward(b, d, c.proj_hidden, c.proj_dim)
        if _on(c, "dino"):
            h, o = c.dino_hidden, c.dino_bottleneck

            def head(clips, tokens):
                mlp = 2 * clips * (1 + tokens) * (d * h + h * h + h * o)
                return mlp + 2 * clips * o * (c.dino_prototypes + tokens * c.dino_token_prototypes)

            student += head(r, q)
            teacher += head(b, n)
        if _on(c, "contrastive"):
            # Similarities: the loss's forward and backward (3 matmuls) and the accuracy's forward (1).
            student += 2.0 * r**2 * d * 4 / flops.TRAIN_FACTOR
        return {
            "teacher": float(teacher),
            "student": float(student),
            "teacher_tokens": float(b * (n + p)),
            "student_tokens": float(r * k),
        }

    def check(self):
        c = self.cfg
        if c.masking not in MASKINGS:
            raise ConfigError(f"compose.masking={c.masking!r}: choose one of {'|'.join(MASKINGS)}")
        if c.predictor not in PREDICTORS:
            raise ConfigError(f"compose.predictor={c.predictor!r}: choose one of {'|'.join(PREDICTORS)}")
        weights = {name: float(getattr(c, name)) for name in OBJECTIVES}
        if not any(v > 0 for v in weights.values()):  # each >= 0: RANGES
            raise ConfigError(f"compose: objective weights must be >= 0 with at least one > 0, got {weights}")
        if c.masking == "inverse_block" and c.predictor == "bn_mlp":
            raise ConfigError(
                "compose: masking=inverse_block drops the masked tokens, so the student never computes the "
                "output predictor=bn_mlp reads there; use predictor=cross_attention or masking=span|gmml"
            )
        if _on(c, "contrastive") and c.num_masks < 2:
            raise ConfigError(
                f"compose.num_masks={c.num_masks}: need >= 1, and >= 2 for the contrastive objective"
            )
        n_t, _ = self.grid()
        if self.num_tokens() < 2:
            raise ConfigError(f"compose.crop_frames={c.crop_frames} gives fewer than 2 tokens")
        if c.masking == "span" and n_t <= c.mask_span:
            raise ConfigError(
                f"compose.crop_frames={c.crop_frames} gives {n_t} time steps: span masking needs more than "
                f"mask_span={c.mask_span}"
            )
        if c.predictor == "cross_attention" and c.pred_dim % c.pred_heads:
            raise ConfigError(
                f"compose: pred_dim={c.pred_dim} must be divisible by pred_heads={c.pred_heads}"
            )
