"""ASiT: group-masked model learning + local reconstruction + global/local self-distillation (Atito et al.,
TASLP 2024; spec/methods.md §4).

Recipe, as the official PyTorch code (``Sara-Ahmed/ASiT``: ``main_ASiT.py``, ``losses.py``,
``data_transformations.py``, ``utils.py``) runs it:

- Input: two independent random crops of 592 frames of a clip's Kaldi fbank (128 bins, 32 kHz, 10 ms shift;
  feature set ``kaldi_fbank128``), normalised ``(x + 4.2677393) / (2 · 4.5689974)``. The encoder is a ViT on
  16 × 16 patches (37 × 8 = 296 tokens, time-major), learned positions, a CLS token, qkv bias, drop-path 0.1
  on the student (none on the teacher).
- Corruption (``views.gmml_corrupt``, on the normalised pixels, per crop): block masks covering U(0.5, 0.7)
  of the crop set to 0; with probability 0.5 instead 30 % of the pixels pasted from the clean crop of a
  random clip of the batch. The teacher sees the clean crops, the student the corrupted ones; there is no
  mask token.
- Heads (``models/dino.py``): shared MLP trunk D → 2048 → 2048 → 256, L2 norm, weight-normalised prototype
  layers (gain fixed at 1): CLS → 8192, each patch token → 1024. Student-only reconstruction head: MLP
  D → 768 → 768 → 128 (GELU after each; 768 is the official ``RECHead`` default, not D) and a transposed
  conv 128 → 1 with kernel = stride = 16.
- Loss ``L = L_cls + L_data + 2·L_rec``:
  ``L_cls`` = DINO cross-entropy on the CLS logits, cross-view only (teacher crop 1 ↔ student crop 2 and
  vice versa), averaged; ``L_data`` = the same per patch token, same crop (teacher clean token i ↔ student
  corrupted token i), over all tokens; ``L_rec`` = L1 between the reconstruction and the clean crop over the
  corrupted pixels only. τ_s = 0.1; τ_t linear 0.04 → 0.07 over the first 30 epochs (here
  ``teacher_temp_warmup_steps``), then 0.07. Two centres (CLS 8192-d, patch 1024-d) are EMAs (0.9) of the
  teacher's mean output over the global batch, updated after the loss: the method state.
- Teacher = EMA of everything it has (encoder + DINO head), cosine 0.996 → 1; ``torch.optim.AdamW``
  (``optim.adamw = "torch"``, eps 1e-8), base LR 5e-4 × batch / 256, warm-up, cosine to 1e-6, weight decay
  cosine 0.04 → 0.4 (biases and 1-D parameters undecayed), **per-parameter** gradient-norm clipping at 3.0.

Where this differs from the official code, and why:
- Crops come from the prepared fbank of the whole clip (the pipeline's random crop of 592 frames) instead of
  a random 6 s waveform crop that is then transformed: identical up to the frame grid's phase. As the official
  dataset circularly shifts the waveform with probability 0.5 before cropping (one shift for all the clip's
  crops), the pipeline rotates the clip's frames (``circular_shift``, 0.5): a crop may straddle the clip's end
  and start, joined frame to frame where the official fbank has one frame over the seam.
- The paste partner of a crop comes from the same crop of the clips in its pool of ``paste_pool``
  consecutive clips of the global batch (default 32: the official collate pastes within one data loader's
  batch, 32 clips per GPU in the published command, crop by crop); ``paste_pool = 0``: the whole global batch.
- Crops of clips shorter than 592 frames are padded (the feature set's silence, what the official zero-padded
  waveform gives); by default (``pad_is_signal``, official) the padding is attended and counts in every loss
  term; ``pad_is_signal=False`` masks those tokens as keys and leaves them out of ``L_data``, ``L_rec`` and the
  centres. Identical for full-length clips (all of AudioSet's 10 s clips).
- ``freeze_last_layer``: the official code zeroes gradients of parameters named ``last_layer``, which ASiT's
  heads do not have (they are ``cls_layer`` / ``data_layer``), so it never acts; not reproduced.
- With gradient accumulation the centres are updated once per microbatch (as BN statistics are).

Monitors: ``tea_entropy`` (mean entropy of the teacher's CLS distribution: → 0 when it collapses to one-hot)
and ``tea_mean_entropy`` (entropy of its batch mean: → 0 when every clip picks the same prototype; both
→ ln 8192 ≈ 9.0 when uniform), with ``loss_cls`` / ``loss_data`` / ``loss_rec``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from atst_jax import flops
from atst_jax.data import views
from atst_jax.methods.base import Crop, Method
from atst_jax.models import collapse
from atst_jax.models.dino import (
    DinoHead,
    ReconstructionHead,
    centre_update,
    dino_cross_entropy,
    entropy,
    teacher_probs,
)
from atst_jax.models.encoder import FrameAST
from atst_jax.sharding import ConfigError

CROPS = ("crop1", "crop2")


@dataclasses.dataclass(frozen=True)
class AsitConfig:
    crop_frames: int = 592
    features: str = "kaldi_fbank128"
    # GMML corruption
    corrupt_area: tuple[float, float] = (0.5, 0.7)
    paste_prob: float = 0.5
    paste_area: tuple[float, float] = (0.3, 0.3)
    max_block: float = 0.3
    # Paste partners come from pools of this many consecutive clips, each crop separately (official: one
    # loader batch per GPU, 32 in the published command); 0 = the whole global batch.
    paste_pool: int = 32
    # Probability that a clip is rotated in time by a random count before its crops are drawn, one rotation
    # for all its crops (official: ``torch.roll`` of the waveform with p = 0.5; here of its frames).
    circular_shift: float = 0.5
    # heads
    head_hidden: int = 2048
    head_bottleneck: int = 256
    cls_prototypes: int = 8192
    data_prototypes: int = 1024
    rec_hidden: int = 768
    rec_bottleneck: int = 128
    # loss
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_steps: int = 0  # 0 = τ_t at ``teacher_temp`` from the start
    centre_momentum: float = 0.9
    rec_weight: float = 2.0
    # A clip shorter than the crop is padded (the clip's floor; the fbank of silence for Kaldi features). True
    # (official: the waveform is zero-padded and the padding is signal): the padding counts as audio; False:
    # masked by the valid length (keys, loss, statistics). Identical for clips at least a crop long.
    pad_is_signal: bool = True
    # Allowed values, checked before anything compiles (atst_jax.knobs).
    RANGES: ClassVar[dict[str, str]] = {
        "crop_frames": "[1, inf)",
        "corrupt_area": "(0, 1) ordered",
        "paste_prob": "[0, 1]",
        "paste_area": "(0, 1) ordered",
        "max_block": "(0, 1]",
        "paste_pool": "[0, inf)",
        "circular_shift": "[0, 1]",
        "head_hidden": "[1, inf)",
        "head_bottleneck": "[1, inf)",
        "cls_prototypes": "[1, inf)",
        "data_prototypes": "[1, inf)",
        "rec_hidden": "[1, inf)",
        "rec_bottleneck": "[1, inf)",
        "student_temp": "(0, inf)",
        "teacher_temp_start": "(0, inf)",
        "teacher_temp": "(0, inf)",
        "teacher_temp_warmup_steps": "[0, inf)",
        "centre_momentum": "[0, 1)",
        "rec_weight": "[0, inf)",
    }


def reconstruction_l1(rec, clean, mask, length, *, patch_t: int):
    """Mean ``|rec − clean|`` over the corrupted pixels (``mask``) of each clip's whole patches.

    ``rec [B, F, T']`` covers the crop's whole time patches (``T' ≤ T``); pixels past a clip's valid frames
    (rounded down to whole patches, as its tokens are) are padding and never count.
    """
    t_rec = rec.shape[-1]
    in_clip = jnp.arange(t_rec)[None, :] < (length - length % patch_t)[:, None]
    weight = (mask[..., :t_rec] & in_clip[:, None, :]).astype(jnp.float32)
    l1 = jnp.abs(rec.astype(jnp.float32) - clean[..., :t_rec].astype(jnp.float32))
    return jnp.sum(l1 * weight) / jnp.maximum(jnp.sum(weight), 1.0)


class Teacher(nnx.Module):
    """Encoder + DINO head (what the EMA covers)."""

    def __init__(self, enc, cfg: AsitConfig, *, rngs: nnx.Rngs):
        self.encoder = FrameAST(enc, rngs=rngs)
        heads = (cfg.head_hidden, cfg.head_bottleneck, cfg.cls_prototypes, cfg.data_prototypes)
        self.head = DinoHead(enc.width, *heads, rngs=rngs)


class Student(Teacher):
    """The teacher's networks plus the reconstruction head."""

    def __init__(self, enc, cfg: AsitConfig, *, rngs: nnx.Rngs):
        super().__init__(enc, cfg, rngs=rngs)
        patch_dim = enc.patch_size[0] * enc.patch_size[1]
        self.rec_head = ReconstructionHead(
            enc.width, cfg.rec_hidden, cfg.rec_bottleneck, patch_dim, rngs=rngs
        )


class Asit(Method):
    name = "asit"
    Config = AsitConfig
    ema_covers = ("encoder", "head")
    monitors = ("tea_entropy", "tea_mean_entropy")

    def inputs(self):
        return tuple(Crop(name, self.cfg.crop_frames, self.cfg.features) for name in CROPS)

    def init(self, rng):
        student = Student(self.enc_cfg, self.cfg, rngs=nnx.Rngs(params=rng))
        teacher = Teacher(self.enc_cfg, self.cfg, rngs=nnx.Rngs(params=jax.random.fold_in(rng, 1)))
        for name in self.ema_covers:  # the teacher starts as the student (official load_state_dict)
            nnx.update(getattr(teacher, name), nnx.state(getattr(student, name)))
        state = {
            "centre_cls": jnp.zeros((self.cfg.cls_prototypes,), jnp.float32),
            "centre_data": jnp.zeros((self.cfg.data_prototypes,), jnp.float32),
        }
        return student, teacher, state

    def teacher_temp(self, step):
        """τ_t: ``linspace(start, end, W)[step]`` for the first W steps, then ``end``."""
        c = self.cfg
        w = c.teacher_temp_warmup_steps
        if w <= 0:
            return jnp.asarray(c.teacher_temp, jnp.float32)
        frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(w - 1, 1), 1.0)
        return c.teacher_temp_start + (c.teacher_temp - c.teacher_temp_start) * frac

    def corrupt(self, key, clean):
        """GMML on the crops ``clean [2B, F, T]`` (crop 1 of every clip, then crop 2): paste partners from the
        same crop of the clips in the row's pool (``paste_pool`` clips, within its crop's half)."""
        cfg = self.cfg
        b = clean.shape[0] // len(CROPS)
        return views.gmml_corrupt(
            key,
            clean,
            area=cfg.corrupt_area,
            paste_prob=cfg.paste_prob,
            paste_area=cfg.paste_area,
            max_block=cfg.max_block,
            pool=min(cfg.paste_pool, b) if cfg.paste_pool > 0 else b,
        )

    def pictures(self, batch, key, step):
        """The first clip's two crops: clean (the teacher's) and GMML-corrupted (the student's), the
        corrupted pixels marked."""
        del step
        batch = self.padding_as_signal(batch)
        b = batch[CROPS[0]].shape[0]
        clean = jnp.concatenate([batch[n] for n in CROPS], axis=0)
        corrupted, mask = self.corrupt(jax.random.split(key)[0], clean)
        out = []
        for j, name in enumerate(CROPS):
            row = j * b
            m = mask[row].astype(jnp.float32)
            out += [
                (f"{name} (teacher: clean)", clean[row], None),
                (f"{name} (student: GMML)", corrupted[row], m),
            ]
        return out

    def loss(self, student, teacher, method_state, batch, key, step):
        batch = self.padding_as_signal(batch)
        cfg, enc = self.cfg, student.encoder
        b = batch[CROPS[0]].shape[0]
        k_corrupt, k_stu = jax.random.split(key)
        clean = jnp.concatenate([batch[n] for n in CROPS], axis=0)  # [2B, F, T]: crop 1 then crop 2
        length = jnp.concatenate([batch[f"{n}_length"] for n in CROPS], axis=0)
        corrupted, mask = self.corrupt(k_corrupt, clean)
        n_prefix = enc.n_prefix
        tau_t = self.teacher_temp(step)

        t_tokens = teacher.encoder(clean, length, train=False)
        t_cls, t_data = teacher.head(t_tokens, n_prefix)
        s_tokens = student.encoder(corrupted, length, train=True, key=k_stu)
        s_cls, s_data = student.head(s_tokens, n_prefix)
        valid = enc.valid_mask(length, s_tokens.shape[1])[:, n_prefix:]  # [2B, N] real patch tokens

        # L_cls: cross-view pairs only (teacher crop 1 ↔ student crop 2, teacher crop 2 ↔ student crop 1).
        ce = lambda s, t: dino_cross_entropy(
            s, t, method_state["centre_cls"], student_temp=cfg.student_temp, teacher_temp=tau_t
        )
        loss_cls = 0.5 * (ce(s_cls[b:], t_cls[:b]) + ce(s_cls[:b], t_cls[b:]))
        # L_data: every patch token against the teacher's token at the same place of the same crop.
        loss_data = dino_cross_entropy(
            s_data,
            t_data,
            method_state["centre_data"],
            student_temp=cfg.student_temp,
            teacher_temp=tau_t,
            weights=valid,
        )
        # L_rec: L1 over the corrupted pixels (of whole patches within the clip's valid frames).
        rec = enc.unpatchify(student.rec_head(s_tokens[:, n_prefix:]))  # [2B, F, T']
        loss_rec = reconstruction_l1(rec, clean, mask, length, patch_t=enc.cfg.patch_size[0])

        total = loss_cls + loss_data + cfg.rec_weight * loss_rec
        new_state = {
            "centre_cls": centre_update(method_state["centre_cls"], t_cls, cfg.centre_momentum),
            "centre_data": centre_update(method_state["centre_data"], t_data, cfg.centre_momentum, valid),
        }
        q = teacher_probs(t_cls, method_state["centre_cls"], tau_t)
        metrics = {
            "loss": total,
            "loss_cls": loss_cls,
            "loss_data": loss_data,
            "loss_rec": loss_rec,
            "tea_entropy": jnp.mean(entropy(q)),
            "tea_mean_entropy": entropy(jnp.mean(q, axis=0)),
            "corrupted": jnp.mean(mask.astype(jnp.float32)),
            "teacher_temp": tau_t,
            **collapse.health(t_tokens[:, n_prefix:], valid),
        }
        return total, metrics, new_state

    def step_flops(self, global_batch: int) -> float:
        """Both encoders on ``2B`` crops, the DINO head on every token of both networks, the student's
        reconstruction head and transposed conv on every patch token."""
        c, enc = self.cfg, self.enc_cfg
        seqs = 2 * global_batch
        n = self.tokens_per_crop()
        rows = seqs * (n + 1)  # the head's MLP runs on the CLS token too
        encoder = flops.encoder_forward(enc, n, seqs)
        mlp = 2 * rows * (enc.width * c.head_hidden + c.head_hidden**2 + c.head_hidden * c.head_bottleneck)
        protos = 2 * seqs * c.head_bottleneck * (c.cls_prototypes + n * c.data_prototypes)
        head = mlp + protos
        patch = enc.patch_size[0] * enc.patch_size[1]
        rec = 2 * seqs * n * (enc.width * c.rec_hidden + c.rec_hidden**2 + c.rec_hidden * c.rec_bottleneck)
        rec += 2 * seqs * n * c.rec_bottleneck * patch
        monitor = flops.token_covariance(seqs, n, enc.width)  # the health monitors, on the teacher's tokens
        return float(encoder + head + monitor + flops.TRAIN_FACTOR * (encoder + head + rec))

    def tokens_per_crop(self) -> int:
        p_t, p_f = self.enc_cfg.patch_size
        return (self.cfg.crop_frames // p_t) * (self.enc_cfg.n_mels // p_f)

    def check(self):
        c, enc = self.cfg, self.enc_cfg
        if enc.stem != "patch2d" or not enc.use_cls:
            raise ConfigError(
                "asit needs the 2-D patch ViT with a CLS token: model.stem=patch2d, model.use_cls=True"
            )
        if c.crop_frames < enc.patch_size[0]:
            raise ConfigError(
                f"asit.crop_frames={c.crop_frames} is shorter than one patch ({enc.patch_size[0]})"
            )
        t = self.config.train
        micro = int(t.global_batch) // max(int(t.get("grad_accum_steps", 1)), 1)  # the batch one loss sees
        if 0 < c.paste_pool < micro and micro % c.paste_pool:
            raise ConfigError(
                f"asit.paste_pool={c.paste_pool} must be 0 (the whole batch) or divide the (micro)batch of "
                f"{micro} clips, so that no pool straddles the two crops"
            )
