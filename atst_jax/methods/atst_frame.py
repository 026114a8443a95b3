"""ATST-Frame: frame-level teacher-student pretraining (spec/methods.md §1).

Recipe, as the official audiossl code runs it:

- One 10 s crop per clip gives **two time-aligned views**: view 1 clean, view 2 = log-mixup-exp with another
  clip + frequency warp (official ``aug_tea=False, aug_stu=True``; both switchable). The mixup partner comes
  from a FIFO bank of earlier crops (``mixup_bank``, official ``n_memory=2000``; method state, see
  ``views.mixup_bank_init``): the clips of the first step are left unmixed, as the official transform leaves
  its first inputs; each augmented view draws its own partners from the one bank of the (pre-mixup) crops.
  ``mixup_bank=0``: the partner is another clip of the same global batch.
- One span mask per clip (≈50 % of the 250 tokens), **shared by both views**. The student sees masked input
  (``mask_embed``); the teacher sees the unmasked views. Both are read out only at masked positions.
- Symmetric (the released recipe): both views go through both networks in one batch ``[view 1; view 2]``.
  Student: encoder → projector → predictor; teacher: encoder → projector (stop-gradient). BatchNorm
  statistics are taken over all masked tokens of both views of the global batch (the official trainer runs
  DDP with ``sync_batchnorm=True``). Loss: ``2 − 2·cos`` between the student prediction of one view and the
  teacher projection of the other, mean over masked tokens, averaged over the two pairs. ``symmetric=False``
  is the official single-pair path: the teacher sees view 1 only, the student view 2 only (so each network's
  BN statistics cover one view).
- Per-GPU means: the official loss is a mean over one GPU's masked tokens, and DDP averages the GPUs'
  gradients, so GPUs weigh equally whatever their token counts. ``loss_groups=G`` reproduces that: the clips
  of a loss call are cut into G consecutive blocks (equal when G divides them: the official GPUs' shares;
  the devices' shards when G is the data-parallel size), the loss is the mean over blocks of each block's
  token mean. configs/atst_frame.py sets the official G, the number of GPUs: 4 for small, 7 for base (and
  the larger sizes, which follow base); 1 (the dataclass default, tiny) is the mean over all masked tokens. ``bn_groups=G`` (not official: SyncBN is on there) takes the projector
  and predictor BatchNorm statistics per block too, as DDP without SyncBN would; 1 = the whole batch.
- Teacher mode: the official teacher runs in train mode (drop-path on, BN batch statistics) —
  ``teacher_train_mode=True``, the default. ``False`` puts the teacher in eval mode: no drop-path, and its
  projector BatchNorm normalises with running statistics instead of batch statistics. The teacher's own
  running statistics would never move in eval mode (EMA covers parameters, not buffers), so their stated
  source is the **student projector's running statistics** of the step (tracked over the student's
  masked-token batches), copied into the teacher before it runs.
- Teacher = EMA of the student's encoder and projector parameters (not BN buffers).

Beyond the recipe (ours, off by default): ``var_weight`` / ``cov_weight`` add VICReg's variance and covariance
terms, taken within clips, on the student's encoder tokens (all valid tokens of the rows it encodes) — see
``atst_jax.models.collapse``, which also gives the encoder-level monitors ``within_tea`` (share of the teacher
tokens' variance inside clips) and ``dim_tea`` (their effective dimension) that the projector-side
``std_frm_*`` monitors cannot show. The CPU demo (``configs/atst_frame.py:demo``) turns them on.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from atst_jax import flops
from atst_jax.data import views
from atst_jax.methods.base import Crop, Method, crop_frames, official_schedule_hparams
from atst_jax.models import collapse
from atst_jax.models.byol import bn_head, byol_pair, init_byol, normalized_std, use_student_bn_stats
from atst_jax.models.encoder import FrameAST
from atst_jax.models.stems import make_stem
from atst_jax.sharding import ConfigError


@dataclasses.dataclass(frozen=True)
class AtstFrameConfig:
    crop_seconds: float = 10.0  # the whole AudioSet clip, as the official recipe
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
    # Ours, off in every official recipe (0 = off): VICReg's variance / covariance terms within clips on the
    # student's encoder tokens (models/collapse.py), against the collapse of the features onto one vector
    # per clip that frame BYOL falls into on slowly changing clips. ``var_target`` is the per-dimension
    # within-clip standard deviation below which the hinge pulls (final-normed tokens: ≈ 0.4 at init).
    var_weight: float = 0.0
    cov_weight: float = 0.0
    var_target: float = 0.5
    # Mixup partners from a FIFO bank of at least this many earlier crops (official BYOL-A ``n_memory``); 0 = a
    # partner from the same global batch. The bank is method state (``B·⌈N/B⌉`` crops, sharded like the batch).
    mixup_bank: int = 2000
    # Equal blocks of clips the loss mean (official: one per GPU) and the head BatchNorm statistics (official:
    # 1, SyncBN) are taken over; each must divide the clips of a loss call (global batch / grad_accum_steps).
    loss_groups: int = 1
    bn_groups: int = 1
    # A clip shorter than the crop is padded (the clip's floor; the fbank of silence for Kaldi features). True
    # (official: the waveform is zero-padded and the padding is signal): the padding counts as audio; False:
    # masked by the valid length (keys, loss, statistics). Identical for clips at least a crop long.
    pad_is_signal: bool = True
    # Allowed values, checked before anything compiles (atst_jax.knobs).
    RANGES: ClassVar[dict[str, str]] = {
        "crop_seconds": "(0, inf)",
        "mask_ratio": "(0, 1)",
        "mask_span": "[1, inf)",
        "min_spans": "[0, inf)",
        "mixup_ratio": "[0, 1]",
        "freq_scale": "(0, inf) ordered",
        "proj_hidden": "[1, inf)",
        "proj_dim": "[1, inf)",
        "var_weight": "[0, inf)",
        "cov_weight": "[0, inf)",
        "var_target": "[0, inf)",
        "mixup_bank": "[0, inf)",
        "loss_groups": "[1, inf)",
        "bn_groups": "[1, inf)",
    }


def make_views(key, spec, cfg: AtstFrameConfig, partners=None):
    """Two time-aligned views of the same crop ``spec [B, F, T]``. ``partners``: per view ``(partner, use)``
    for its mixup (the mixup bank's draws); None: another clip of the batch."""

    def augment(k, x, partner):
        k_mix, k_warp = jax.random.split(k)
        if cfg.mixup_ratio > 0:
            x = views.mixup(k_mix, x, cfg.mixup_ratio, *partner)
        return views.freq_warp(k_warp, x, cfg.freq_scale)

    p1, p2 = ((), ()) if partners is None else partners
    k1, k2 = jax.random.split(key)
    v1 = augment(k1, spec, p1) if cfg.aug_view1 else spec
    v2 = augment(k2, spec, p2) if cfg.aug_view2 else spec
    return v1, v2


def prepare_inputs(key, batch, cfg: AtstFrameConfig, encoder: FrameAST, partners=None):
    """Views and masks of one step (symmetric path): ``x [2B, F, T]`` = [view 1; view 2], their lengths, the
    token mask ``[2B, N]`` (the same mask for both views of a clip) and the indices/validity of the masked
    tokens. ``partners``: see ``make_views``."""
    spec, length = batch["spec"], batch["spec_length"]
    b, _, frames = spec.shape
    n_tok = encoder.num_tokens(frames)
    k_mask, k_view = jax.random.split(key)
    mask = views.span_mask(
        k_mask, b, n_tok, ratio=cfg.mask_ratio, span=cfg.mask_span, min_spans=cfg.min_spans
    )
    mask = mask & (jnp.arange(n_tok)[None, :] < encoder.token_lengths(length)[:, None])
    v1, v2 = make_views(k_view, spec, cfg, partners)
    x = jnp.concatenate([v1, v2], axis=0)  # both views through both networks in one batch
    lengths = jnp.concatenate([length, length], axis=0)
    mask2 = jnp.concatenate([mask, mask], axis=0)
    capacity = views.mask_capacity(n_tok, cfg.mask_ratio, cfg.mask_span, cfg.min_spans)
    idx, valid = views.gather_masked(mask2, capacity)
    return x, lengths, mask2, idx, valid


class AtstFrame(Method):
    name = "atst_frame"
    Config = AtstFrameConfig
    ema_covers = ("encoder", "projector")
    monitors = ("std_frm_stu", "std_frm_tea")

    @property
    def frames(self) -> int:
        d = self.config.data
        return crop_frames(self.cfg.crop_seconds, d.sample_rate, d.hop_length)

    def inputs(self):
        return (Crop("spec", self.frames),)

    @property
    def uses_mixup_bank(self) -> bool:
        cfg = self.cfg
        return cfg.mixup_bank > 0 and cfg.mixup_ratio > 0 and (cfg.aug_view1 or cfg.aug_view2)

    def init(self, rng):
        student, teacher = init_byol(rng, self.enc_cfg, self.cfg, self.ema_covers)
        state = {}
        if self.uses_mixup_bank:
            shapes = {"spec": (self.enc_cfg.n_mels, self.frames)}
            state = views.mixup_bank_init(self.cfg.mixup_bank, self.config.train.global_batch, shapes)
        return student, teacher, state

    def loss(self, student, teacher, method_state, batch, key, step):
        """One ATST-Frame loss evaluation on a global batch ``{"spec": [B, F, T], "spec_length": [B]}``.

        With the mixup bank in ``method_state``, the partners are drawn from it and then this batch's crops are
        written to it; a state without it (a direct call with ``{}``) mixes within the batch."""
        del step
        batch = self.padding_as_signal(batch)
        cfg = self.cfg
        b = batch["spec"].shape[0]
        enc = student.encoder
        k_in, k_stu, k_tea = jax.random.split(key, 3)
        partners = None
        if views.has_mixup_bank(method_state):
            k_bank = jax.random.fold_in(key, 3)
            partners = views.mixup_bank_partners(k_bank, method_state, ("spec", "spec"), b)
            method_state = views.mixup_bank_update(method_state, {"spec": batch["spec"]})
        x, lengths, mask2, idx, valid = prepare_inputs(k_in, batch, cfg, enc, partners)
        # Rows of the teacher / student batch: both views for the symmetric loss, else view 1 / view 2.
        t_rows = slice(None) if cfg.symmetric else slice(0, b)
        s_rows = slice(None) if cfg.symmetric else slice(b, 2 * b)

        # Teacher: unmasked input, read out at the masked positions; no gradient.
        train_mode = cfg.teacher_train_mode
        if not train_mode:
            use_student_bn_stats(student, teacher)
        t_tok = teacher.encoder(x[t_rows], lengths[t_rows], None, train=train_mode, key=k_tea)
        g_bn, g_loss = cfg.bn_groups, cfg.loss_groups
        t_in = views.take_tokens(t_tok, idx[t_rows])
        z = bn_head(teacher.projector, t_in, valid[t_rows], g_bn, b, use_running_average=not train_mode)
        z = jax.lax.stop_gradient(z)

        s_tok = student.encoder(x[s_rows], lengths[s_rows], mask2[s_rows], train=True, key=k_stu)
        v_s = valid[s_rows]
        s_proj = bn_head(student.projector, views.take_tokens(s_tok, idx[s_rows]), v_s, g_bn, b)
        p = bn_head(student.predictor, s_proj, v_s, g_bn, b)

        w1 = valid[:b].astype(jnp.float32)  # identical masks for both views
        if cfg.symmetric:
            total = 0.5 * (byol_pair(p[b:], z[:b], w1, g_loss) + byol_pair(p[:b], z[b:], w1, g_loss))
        else:
            total = byol_pair(p, z, w1, g_loss)
        tok_valid = enc.valid_mask(lengths, t_tok.shape[1])  # [2B, N]: tokens over real frames (no CLS)
        t_valid = tok_valid[t_rows]
        metrics = {
            "loss": total,
            "std_frm_stu": normalized_std(p, v_s),
            "std_frm_tea": normalized_std(z, valid[t_rows]),
            **collapse.health(t_tok, t_valid),
            "mask_frac": jnp.sum(mask2) / jnp.maximum(jnp.sum(enc.token_lengths(lengths)), 1),
        }
        if cfg.var_weight or cfg.cov_weight:
            metrics["loss_byol"] = total
            var_loss, cov_loss, within_std = collapse.spread_terms(s_tok, tok_valid[s_rows], cfg.var_target)
            total = total + cfg.var_weight * var_loss + cfg.cov_weight * cov_loss
            metrics.update(loss=total, loss_var=var_loss, loss_cov=cov_loss, within_std_stu=within_std)
        return total, metrics, method_state

    def pictures(self, batch, key, step):
        """Both views of the first clip as the step drew them, the shared span mask over each (the student
        sees the masked tokens replaced by ``mask_embed``; the teacher sees the unmasked view). With the mixup
        bank the step's partner came from the bank, which pictures cannot see: they mix within the batch."""
        del step
        batch = self.padding_as_signal(batch)
        k_in = jax.random.split(key, 3)[0]
        stem = make_stem(self.enc_cfg)
        x, lengths, mask2, _, _ = prepare_inputs(k_in, batch, self.cfg, stem)
        b, frames = batch["spec"].shape[0], batch["spec"].shape[2]
        per_frame = jnp.zeros((frames,), jnp.float32)
        tokens = jnp.repeat(mask2[0].astype(jnp.float32), self.enc_cfg.patch_w)
        per_frame = per_frame.at[: tokens.shape[0]].set(tokens)
        overlay = jnp.broadcast_to(per_frame[None, :], x.shape[1:])
        v1 = "augmented" if self.cfg.aug_view1 else "clean"
        v2 = "augmented" if self.cfg.aug_view2 else "clean"
        return [(f"view 1 ({v1}), span mask", x[0], overlay), (f"view 2 ({v2}), span mask", x[b], overlay)]

    # --- cost, checks, export ----------------------------------------------------------------------
    def step_flops(self, global_batch: int) -> float:
        """Analytic matmul FLOPs (see ``atst_jax.flops``): both networks over ``2B`` sequences (``B`` each when
        not symmetric), the one-hot gather and the heads on the masked tokens, the frequency warp."""
        cfg, enc = self.cfg, self.enc_cfg
        seqs = 2 * global_batch if cfg.symmetric else global_batch
        n = self.frames // enc.patch_w
        k = views.mask_capacity(n, cfg.mask_ratio, cfg.mask_span, cfg.min_spans)
        encoder = flops.encoder_forward(enc, n, seqs)
        gather = flops.token_gather(seqs, k, n, enc.width)
        projector = flops.bnmlp_forward(seqs * k, enc.width, cfg.proj_hidden, cfg.proj_dim)
        predictor = flops.bnmlp_forward(seqs * k, cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        warps = int(cfg.aug_view1) + int(cfg.aug_view2)
        warp = warps * flops.freq_warp(global_batch, enc.n_mels, self.frames)
        # The teacher's dim_tea monitor and, when on, the student's within-clip covariance term: one [D, D]
        # covariance over each network's sequences.
        monitor = flops.token_covariance(seqs, n, enc.width)
        spread = monitor if (cfg.var_weight or cfg.cov_weight) else 0.0
        teacher = encoder + gather + projector
        student = flops.TRAIN_FACTOR * (encoder + gather + projector + predictor + spread)
        return float(teacher + student + warp + monitor)

    def check(self):
        cfg = self.cfg
        if self.enc_cfg.use_cls:
            raise ConfigError("atst_frame has no CLS token: set model.use_cls=False")
        train = self.config.train
        rows = int(train.global_batch) // max(int(train.get("grad_accum_steps", 1)), 1)
        if int(cfg.loss_groups) > rows:  # blocks of unequal size are fine (byol_pair), empty ones are not
            raise ConfigError(
                f"atst_frame.loss_groups={cfg.loss_groups} is more than the {rows} clips of a loss call "
                "(train.global_batch / train.grad_accum_steps)"
            )
        if rows % int(cfg.bn_groups):  # >= 1: RANGES
            raise ConfigError(
                f"atst_frame.bn_groups={cfg.bn_groups} must be >= 1 and divide the {rows} clips of a loss call "
                "(train.global_batch / train.grad_accum_steps)"
            )
        n = self.frames // self.enc_cfg.patch_w
        if n <= cfg.mask_span:
            raise ConfigError(
                f"atst_frame.crop_seconds={cfg.crop_seconds} gives {n} tokens: span masking needs more than "
                f"mask_span={cfg.mask_span}"
            )

    def official_step_inputs(self):
        """The official ``FrameATST`` step at our crop, mel bins and mask ratio."""
        return dict(
            frames=self.frames, n_mels=int(self.enc_cfg.n_mels), mask_ratio=float(self.cfg.mask_ratio)
        )

    @classmethod
    def lightning_hparams(cls, config, *, width: int, depth: int, heads: int):
        """The ``hyper_parameters`` of the official ``FrameATSTLightningModule`` from a run's saved config
        (a plain dict), and warnings. ``learning_rate`` is the peak LR the optimiser reached
        (``base_lr × global_batch / 256``): the official module uses it as the top of its schedule."""
        method = dict(config.get(cls.name) or {})
        hp, warnings = official_schedule_hparams(config, width, depth, heads)
        hp.update(
            symmetric=bool(method.get("symmetric", True)),
            pos_type="cut",
            avg_blocks=0,
            patch_embed="Linear",
            patch_h=int(config["model"].get("n_mels", 64)),
            patch_w=int(config["model"].get("patch_w", 4)),
            spec_h=int(config["model"].get("n_mels", 64)),
            n_mels=int(config["model"].get("n_mels", 64)),
            nprompt=0,
            # Saved configs from before the method contract kept the crop under data.
            anchor_len=float(method.get("crop_seconds", config.get("data", {}).get("crop_seconds", 10.0))),
            win_length=1024,
        )
        return hp, warnings
