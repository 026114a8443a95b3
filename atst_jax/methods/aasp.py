"""AaSP: aliasing-aware teacher-student pretraining (Yamamoto & Okusa, arXiv 2512.03637, IEEE TASLP;
spec/methods.md §5). No public code exists: this is a reconstruction, and every reconstructed choice is a
field of ``AaspConfig`` (or of ``model.aape``, see ``models/aape.py``). Three sources, marked below:

**Published by AaSP** (its abstract and kernel formula): (a) the aliasing-aware patch embedding AaPE, which
adds features from the modulation band a strided patch stem aliases (the SBLU kernel, with decay and
frequency estimated from the input) to the standard patch tokens; (b) teacher-student masked modelling;
(c) a cross-attention predictor; (d) a multi-mask contrastive regulariser; AudioSet pretraining.

**From EAT** (Chen et al. 2024, code on fairseq's data2vec 2.0; the closest public recipe of (b)), the
default wherever the AaSP paper is silent, each an option:

- Input: one 1024-frame crop (``crop_frames``) per clip of EAT's front end, the 128-bin Kaldi fbank at
  16 kHz (``features="kaldi_fbank128_16k"``: bins 20 Hz–8 kHz, ``(x + 4.268) / (2 · 4.569)``;
  ``kaldi_fbank128`` is ASiT's 32 kHz set); the 2-D 16×16 patch ViT (time-major tokens, 64 × 8 = 512 for
  1024 frames), fixed 2-D sin-cos positions, a CLS token, qkv bias, no drop-path.
- A clip shorter than the crop (a 10 s AudioSet clip gives 998 frames): EAT zero-pads its raw log fbank to
  1024 frames and the padding is audio to every part of the method. ``pad_is_signal=True`` does the same
  (``official_padding``): the frames past the clip's length are set to the stored value 0 (``pad_value=
  "zero"``; model input ≈ 0.467, where the pipeline pads with the silence ``ln(eps)``, ≈ −1.277 model input;
  ``pad_value="data"`` keeps that) and the whole crop counts — attended, in the teacher's statistics, the
  targets, the losses and the mask sampler's choices.
- Trunk (``model.norm_style="post"``, set by configs/aasp.py): EAT's, data2vec 2.0's ``AltBlock`` with
  ``layer_norm_first=False``: a LayerNorm on the embedded tokens (positions added, CLS in front, so on the
  student's visible tokens only), each block ``x = LN1(x + Attn(x))``, ``t = MLP(x)``, ``LN2(x + t)``, and no
  final norm (``models/encoder.py``); exported as a post-norm ViT (``format=asit_encoder+postnorm+aape``,
  ``export/torch_vit.py``).
- Teacher = EMA of the student encoder; it encodes each **clean clip once**. Targets
  (``target_source="ffn"``): for each of the top ``top_k_layers`` (12 = all) blocks, the block's
  feed-forward output (after ``fc2``, before the residual add; ``FrameAST.trunk(collect_layers="ffn")``;
  EAT's ``t``), instance-normalised per channel over the clip's tokens, averaged over the layers, then a
  LayerNorm without affine parameters (eps 1e-5). ``target_source="block"`` takes the blocks' outputs
  instead (post-norm: after their ``LN2``, EAT's ``end_of_block_targets``). The utterance target is the
  targets' mean over the clip's tokens.
- Masks (``mask_sampler="eat"``, ``views.eat_inverse_block_mask``): ``num_masks`` = 16 copies of each clip
  (``clone_batch``), each keeping ``int(N·(1 − mask_ratio))`` = 102 of 512 tokens (``mask_ratio`` = 0.8):
  ``int(N·(1 − r + mask_prob_adjust) / 25)`` = 5 block centres drawn uniformly with replacement, a
  ``mask_block`` = 5 × 5 block of visible tokens around each (cut at the grid's edges), the union trimmed by
  a uniformly random subset or filled with uniformly random other tokens to the exact count. The masked
  tokens are **dropped**: the trunk runs on ``[B·M, n_prefix + visible]`` tokens (CLS + visible).
  ``mask_sampler="blocks"`` is our earlier sampler (``views.inverse_block_mask``: more, uncut blocks
  kept whole in a random order, ``round`` for the count).
- Loss weighting: EAT sums the squared errors × ``1/√D`` over the masked tokens' channels, adds
  ``cls_loss`` (1) × the GPU's masked-token count × the same sum over the copies' CLS errors, and fairseq
  divides the summed gradients by the global masked-token count. With equal counts per GPU that is
  ``√D · [frame MSE (mean over masked tokens and channels) + 192 · utterance MSE (mean over copies and
  channels)]``, 192 = 12 clips × 16 copies on one GPU. Here: the objective is ``s · (loss_reg +
  utterance_weight · loss_utt + contrast_weight · loss_nce)`` with ``s = D · loss_scale`` (``loss_scale`` =
  0 → EAT's 1/√D, so s = √D) and ``utterance_weight`` = 192; ``loss_reg`` / ``loss_utt`` / ``loss_nce``
  are logged unscaled.
- Teacher momentum: linear from ``optim.ema`` (0.9998) to ``ema_end`` (0.99999) over ``ema_anneal_steps``
  (100k), then constant. Optimiser and run (configs/aasp.py): Adam with decoupled weight decay, β (0.9,
  0.95), eps 1e-8, constant weight decay 0.05 (none on biases and norms), peak LR 5e-4 after 53,333
  warm-up steps, cosine to 0 at 400k, global gradient-norm clipping at 4, 48 clips per step (12 per GPU ×
  4 GPUs) × 16 copies.

**Ours** (neither paper states it):

- Predictor (``models/masked_prediction.CrossPredictor``): queries = the positional embeddings of the masked
  positions, ``Linear(D → pred_dim)``, then ``pred_depth`` × [cross-attention to the visible student tokens
  (CLS included) → MLP], ``pred_heads`` heads; queries never attend to each other; LayerNorm →
  ``Linear(pred_dim → D)``. (EAT's decoder is a CNN over the full sequence with mask tokens; a
  cross-attention decoder is what the AaSP abstract names.) ``loss="cosine"`` (``2 − 2·cos``) is an option.
- Contrastive term: InfoNCE over the B·M masked views (``models/masked_prediction.multi_view_info_nce``:
  positives = the other copies of the same clip, negatives = every copy of the other clips of the global
  batch), each view's embedding the L2-normalised mean of its predictor outputs (``contrast_embed="pred"``)
  or its CLS output (``"cls"``); temperature ``contrast_temp``, weight ``contrast_weight`` relative to the
  regression (so it shares the scale ``s``).
- AaPE: the patch projection and positions are computed once per clip; the AaPE branch once per copy, from
  that copy's visible tokens only (its SBLU filter and whole-clip envelope statistics would otherwise carry
  the dropped tokens' content into the kept ones, which the student must then predict without having seen).
  So the costly encoder work is one teacher pass on ``B × N`` plus the student's ``B·M × visible``.
- ``model.norm_style="pre"``: this project's pre-norm ViT with a final LayerNorm instead of EAT's trunk
  (``EncoderConfig``'s default, so a saved run config without the field is pre-norm).
  ``target_source`` taps the same places (``"ffn"``: the feed-forward output before the residual add).
- Padding masked (``pad_is_signal=False``): tokens past a clip's valid frames are never visible while enough
  real tokens remain (the EAT sampler then draws its centres among the real tokens), are masked as keys, and
  are left out of the teacher's instance-norm statistics, the regression and the utterance target.

Monitors: ``std_tea`` (std over the batch's tokens of the L2-normalised teacher outputs, the official ATST
``compute_var``: → 0 when the teacher collapses to one vector; ≈ 1/√D when healthy), ``std_pred`` (the same
for the predictor outputs), ``nce_acc`` (how often a view's nearest other view is a copy of its own clip).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from atst_jax import features, flops
from atst_jax.data import views
from atst_jax.methods.base import Crop, Method
from atst_jax.models import collapse
from atst_jax.models.byol import cosine, normalized_std
from atst_jax.models.encoder import FrameAST
from atst_jax.models.masked_prediction import (
    CrossPredictor,
    l2_normalize,
    layer_targets,
    masked_mean,
    multi_view_info_nce,
)
from atst_jax.sharding import ConfigError


@dataclasses.dataclass(frozen=True)
class AaspConfig:
    crop_frames: int = 1024
    # EAT's front end: the Kaldi fbank at 16 kHz (128 bins 20 Hz–8 kHz, EAT's normalisation); kaldi_fbank128 is
    # ASiT's 32 kHz one.
    features: str = "kaldi_fbank128_16k"
    # A clip shorter than the crop (a 10 s AudioSet clip is 998 frames of kaldi_fbank128_16k; EAT's target is 1024).
    # True (EAT): its padding is part of the clip, attended, in the teacher's statistics, the targets and the
    # losses; False: masked by the valid length (keys, statistics, targets, losses). Identical for clips at least
    # a crop long.
    pad_is_signal: bool = True
    # With pad_is_signal, what the padded frames hold: "zero" (EAT: the raw log fbank zero-padded, so the model
    # input there is the normalisation's offset, ≈ 0.467 for kaldi_fbank128_16k) | "data" (as the pipeline pads:
    # the feature set's silence, ln(eps) ≈ −15.94 stored, ≈ −1.277 model input).
    pad_value: str = "zero"
    # masks: M copies per clip, a fixed visible count (static shapes)
    num_masks: int = 16
    mask_ratio: float = 0.8
    mask_block: tuple[int, int] = (5, 5)  # (time, freq) tokens of one visible block
    mask_sampler: str = "eat"  # eat (views.eat_inverse_block_mask) | blocks (views.inverse_block_mask)
    mask_prob_adjust: float = 0.07  # eat: extra block centres, N·(1 − r + adjust)/|block| of them
    # targets (the trunk they come from: model.norm_style, "post" = EAT's post-norm blocks in configs/aasp.py)
    target_source: str = "ffn"  # ffn (each block's feed-forward output, EAT) | block (the block outputs)
    top_k_layers: int = 12  # clipped to the encoder depth
    instance_norm_targets: bool = True
    final_norm_targets: bool = True
    final_norm_eps: float = 1e-5  # PyTorch's F.layer_norm default, as EAT
    # predictor
    pred_dim: int = 512  # divides 256 (FSDP over a pod slice shards the predictor too)
    pred_depth: int = 2
    pred_heads: int = 8
    pred_mlp_ratio: float = 4.0
    loss: str = "mse"  # mse | cosine
    # the objective is D·loss_scale × (regression + utterance + contrast); 0 = EAT's 1/√D (× √D overall)
    loss_scale: float = 0.0
    # EAT's effective weight: cls_loss 1 × 12 clips × 16 copies per GPU (see the module docstring);
    # needs a CLS token (model.use_cls)
    utterance_weight: float = 192.0
    # multi-mask contrastive regulariser
    contrast_weight: float = 0.1
    contrast_temp: float = 0.1
    contrast_embed: str = "pred"  # pred (mean predictor output) | cls (student CLS)
    # teacher momentum: linear optim.ema → ema_end over ema_anneal_steps
    ema_end: float = 0.99999
    ema_anneal_steps: int = 100_000
    # Allowed values, checked before anything compiles (atst_jax.knobs).
    RANGES: ClassVar[dict[str, str]] = {
        "crop_frames": "[1, inf)",
        "num_masks": "[1, inf)",
        "mask_ratio": "(0, 1)",
        "mask_block": "[1, inf) pair",
        "mask_prob_adjust": "[0, 1)",
        "top_k_layers": "[1, inf)",
        "final_norm_eps": "(0, inf)",
        "pred_dim": "[1, inf)",
        "pred_depth": "[1, inf)",
        "pred_heads": "[1, inf)",
        "pred_mlp_ratio": "(0, inf)",
        "loss_scale": "[0, inf)",
        "utterance_weight": "[0, inf)",
        "contrast_weight": "[0, inf)",
        "contrast_temp": "(0, inf)",
        "ema_end": "[0, 1]",
        "ema_anneal_steps": "[0, inf)",
    }


class Student(nnx.Module):
    def __init__(self, enc, cfg: AaspConfig, *, rngs: nnx.Rngs):
        self.encoder = FrameAST(enc, rngs=rngs)
        self.predictor = CrossPredictor(
            enc.width, cfg.pred_dim, cfg.pred_depth, cfg.pred_heads, cfg.pred_mlp_ratio, rngs=rngs
        )


class Teacher(nnx.Module):
    def __init__(self, enc, cfg: AaspConfig, *, rngs: nnx.Rngs):
        del cfg
        self.encoder = FrameAST(enc, rngs=rngs)


class Aasp(Method):
    name = "aasp"
    Config = AaspConfig
    ema_covers = ("encoder",)
    monitors = ("std_tea", "std_pred")

    # --- shapes -------------------------------------------------------------------------------------------
    def grid(self) -> tuple[int, int]:
        p_t, p_f = self.enc_cfg.patch_size
        return self.cfg.crop_frames // p_t, self.enc_cfg.n_mels // p_f

    def num_tokens(self) -> int:
        n_t, n_f = self.grid()
        return n_t * n_f

    def num_visible(self) -> int:
        """Tokens each masked copy keeps (the student's sequence length without the CLS token)."""
        if self.cfg.mask_sampler == "eat":
            return views.eat_visible_count(self.num_tokens(), self.cfg.mask_ratio)
        return views.visible_count(self.num_tokens(), self.cfg.mask_ratio)

    def inputs(self):
        return (Crop("spec", self.cfg.crop_frames, self.cfg.features),)

    def official_padding(self, batch):
        """``batch`` as EAT pads a short clip (``pad_is_signal``): the frames past ``spec_length`` set to the
        stored value 0 (``pad_value="zero"``: EAT zero-pads the raw log fbank; the model input there is the
        feature set's normalisation offset) and the valid length set to the crop's width
        (``Method.padding_as_signal``: every token attended and counted). Unchanged with ``pad_is_signal=False``
        (padding masked by the length)."""
        if not self.cfg.pad_is_signal:
            return batch
        spec, length = batch["spec"], batch["spec_length"]
        if self.cfg.pad_value == "zero":
            fill = jnp.asarray(features.get(self.cfg.features).normalize(0.0), spec.dtype)
            past = jnp.arange(spec.shape[-1])[None, None, :] >= length[:, None, None]
            batch = dict(batch, spec=jnp.where(past, fill, spec))
        return self.padding_as_signal(batch)

    def pictures(self, batch, key, step):
        """The first clip's crop as the networks see it (short clips padded as ``official_padding`` pads)."""
        return super().pictures(self.official_padding(batch), key, step)

    def init(self, rng):
        student = Student(self.enc_cfg, self.cfg, rngs=nnx.Rngs(params=rng))
        teacher = Teacher(self.enc_cfg, self.cfg, rngs=nnx.Rngs(params=jax.random.fold_in(rng, 1)))
        nnx.update(teacher.encoder, nnx.state(student.encoder))  # the teacher starts as the student
        return student, teacher, {}

    def ema_momentum(self, step):
        base, end, n = self.config.optim.ema, self.cfg.ema_end, max(int(self.cfg.ema_anneal_steps), 1)
        frac = jnp.minimum(jnp.asarray(step, jnp.float32) / n, 1.0)
        return base + (end - base) * frac

    # --- the two networks ------------------------------------------------------------------------------
    def masks(self, key, token_valid):
        """Visible / masked token indices of the M copies: ``[B, M, V]`` and ``[B, M, N − V]``."""
        b, n = token_valid.shape
        m = self.cfg.num_masks
        valid = jnp.repeat(token_valid, m, axis=0)
        if self.cfg.mask_sampler == "eat":
            vis, hid = views.eat_inverse_block_mask(
                key,
                b * m,
                self.grid(),
                self.cfg.mask_ratio,
                block=self.cfg.mask_block,
                adjust=self.cfg.mask_prob_adjust,
                valid=valid,
            )
        else:
            vis, hid = views.inverse_block_mask(
                key, b * m, self.grid(), self.num_visible(), block=self.cfg.mask_block, valid=valid
            )
        return vis.reshape(b, m, -1), hid.reshape(b, m, -1)

    def teacher_targets(self, teacher, spec, length):
        """The teacher's single pass over the clean clips: targets ``[B, N, D]`` (patch tokens, from the
        blocks' feed-forward outputs or outputs: ``target_source``), the utterance target ``[B, D]``, its
        final tokens (for the monitor) and the token validity ``[B, N]``."""
        enc = teacher.encoder
        out, layers = enc(spec, length, train=False, collect_layers=self.cfg.target_source)
        p = enc.n_prefix
        valid = enc.valid_mask(length, out.shape[1])[:, p:]
        k = min(self.cfg.top_k_layers, enc.cfg.depth)
        y = layer_targets(
            layers[:, :, p:],
            k,
            valid,
            instance_norm_layers=self.cfg.instance_norm_targets,
            final_norm=self.cfg.final_norm_targets,
            final_norm_eps=self.cfg.final_norm_eps,
        )
        utt = masked_mean(y, valid)
        return y, utt, jax.lax.stop_gradient(out[:, p:]), valid

    def student_forward(self, student, spec, length, vis, token_valid, *, key):
        """Keeps the visible tokens of each clip's M copies (``FrameAST.embed_visible``: the patch projection
        once per clip, AaPE per copy from that copy's visible tokens) and runs the trunk on them:
        ``[B·M, n_prefix + V, D]`` and their validity."""
        enc = student.encoder
        b, m, v = vis.shape
        p = enc.n_prefix
        kept = enc.embed_visible(spec, length, vis)  # [B·M, n_prefix + V, D]
        kept_valid = jnp.take_along_axis(token_valid, vis.reshape(b, m * v), axis=1).reshape(b * m, v)
        if p:
            kept_valid = jnp.concatenate([jnp.ones((b * m, p), bool), kept_valid], axis=1)
        return enc.trunk(kept, kept_valid, train=True, key=key), kept_valid

    # --- loss ----------------------------------------------------------------------------------------
    def loss(self, student, teacher, method_state, batch, key, step):
        del step
        cfg = self.cfg
        batch = self.official_padding(batch)
        spec, length = batch["spec"], batch["spec_length"]
        b, m = spec.shape[0], cfg.num_masks
        k_mask, k_stu = jax.random.split(key)
        enc = student.encoder
        n = enc.num_tokens(spec.shape[-1])

        y, utt, t_out, token_valid = self.teacher_targets(teacher, spec, length)
        vis, hid = self.masks(k_mask, token_valid)
        s_out, s_valid = self.student_forward(student, spec, length, vis, token_valid, key=k_stu)

        q = hid.shape[-1]
        pos = jnp.broadcast_to(enc.token_positions(n, jnp.dtype(enc.cfg.dtype))[0], (n, enc.cfg.width))
        queries = jnp.take(pos, hid.reshape(b * m, q), axis=0)  # [B·M, Q, D]
        pred = student.predictor(queries, s_out, s_valid).astype(jnp.float32)
        target = jnp.take_along_axis(y, hid.reshape(b, m * q)[..., None], axis=1).reshape(b * m, q, -1)
        weight = jnp.take_along_axis(token_valid, hid.reshape(b, m * q), axis=1).reshape(b * m, q)
        w = weight.astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(w), 1.0)
        if cfg.loss == "cosine":
            loss_reg = 2.0 - 2.0 * jnp.sum(cosine(pred, target) * w) / denom
        else:
            loss_reg = jnp.sum(jnp.mean(jnp.square(pred - target), axis=-1) * w) / denom

        total = loss_reg  # scaled by D·loss_scale at the end (EAT's 1/√D per element summed over D)
        metrics = {"loss_reg": loss_reg}
        p = enc.n_prefix
        if p and cfg.utterance_weight > 0:
            cls = s_out[:, 0].astype(jnp.float32)
            loss_utt = jnp.mean(jnp.square(cls - jnp.repeat(utt, m, axis=0)))
            total = total + cfg.utterance_weight * loss_utt
            metrics["loss_utt"] = loss_utt
        if cfg.contrast_weight > 0:
            emb = s_out[:, 0] if cfg.contrast_embed == "cls" else masked_mean(pred, weight)
            loss_nce = multi_view_info_nce(emb, m, cfg.contrast_temp)
            total = total + cfg.contrast_weight * loss_nce
            z = l2_normalize(emb)
            sim = jnp.where(jnp.eye(b * m, dtype=bool), -jnp.inf, z @ z.T)
            nearest = jnp.argmax(sim, axis=1)
            metrics["loss_nce"] = loss_nce
            metrics["nce_acc"] = jnp.mean((nearest // m == jnp.arange(b * m) // m).astype(jnp.float32))
        total = self.objective_scale() * total
        metrics.update(
            loss=total,
            std_tea=normalized_std(t_out, token_valid),
            std_pred=normalized_std(pred, weight),
            visible=jnp.asarray(vis.shape[-1], jnp.float32),
            **collapse.health(t_out, token_valid),
        )
        return total, metrics, method_state

    def objective_scale(self) -> float:
        """``D · loss_scale``; ``loss_scale`` = 0 is EAT's (data2vec 2.0's) 1/√D, so √D."""
        d = self.enc_cfg.width
        return float(d * self.cfg.loss_scale) if self.cfg.loss_scale > 0 else float(d) ** 0.5

    # --- cost, checks --------------------------------------------------------------------------------
    def step_flops(self, global_batch: int) -> float:
        """The teacher's one pass over ``B × N`` tokens; the student's patch projection once per clip, the one-hot
        gather of ``M × V`` tokens, AaPE once per copy, and the trunk over ``B·M`` sequences of ``n_prefix + V``; the predictor on ``B·M × Q``
        queries against those; the InfoNCE similarities. Trained parts × 3."""
        parts = self.flops_breakdown(global_batch)
        return float(
            parts["teacher"] + flops.TRAIN_FACTOR * (parts["student"] + parts["predictor"] + parts["nce"])
        )

    def flops_breakdown(self, global_batch: int) -> dict[str, float]:
        """Forward matmul FLOPs per step by part (what ``step_flops`` adds up)."""
        c, enc = self.cfg, self.enc_cfg
        b, m = global_batch, c.num_masks
        n, v = self.num_tokens(), self.num_visible()
        q, p = n - v, (1 if enc.use_cls else 0)
        # The teacher's pass and the health monitors' covariance of its tokens.
        teacher = flops.encoder_forward(enc, n, b) + flops.token_covariance(b, n, enc.width)
        student = flops.embed_visible(enc, n, v, b, m) + flops.trunk_forward(enc, p + v, b * m)
        rows = b * m * q
        predictor = 2 * rows * enc.width * c.pred_dim + 2 * rows * c.pred_dim * enc.width
        predictor += c.pred_depth * flops.cross_block_forward(
            q, p + v, c.pred_dim, enc.width, c.pred_mlp_ratio, b * m
        )
        nce = 2.0 * (b * m) ** 2 * enc.width * 2 if c.contrast_weight > 0 else 0.0  # loss + accuracy
        return {
            "teacher": float(teacher),
            "student": float(student),
            "predictor": float(predictor),
            "nce": float(nce),
            "teacher_tokens": float(b * (n + p)),
            "student_tokens": float(b * m * (v + p)),
        }

    def check(self):
        c, enc = self.cfg, self.enc_cfg
        if enc.stem != "patch2d":
            raise ConfigError("aasp needs the 2-D patch encoder: model.stem=patch2d")
        if c.crop_frames < enc.patch_size[0]:
            raise ConfigError(
                f"aasp.crop_frames={c.crop_frames} is shorter than one patch ({enc.patch_size[0]})"
            )
        if self.num_tokens() < 2:
            raise ConfigError("aasp needs at least 2 tokens per crop")
        if c.contrast_weight > 0 and c.num_masks < 2:
            raise ConfigError(
                f"aasp.num_masks={c.num_masks}: need >= 1, and >= 2 for the contrastive term (contrast_weight > 0)"
            )
        if c.mask_sampler not in ("eat", "blocks"):
            raise ConfigError(f"aasp.mask_sampler={c.mask_sampler!r}: choose eat or blocks")
        if c.target_source not in ("ffn", "block"):
            raise ConfigError(f"aasp.target_source={c.target_source!r}: choose ffn or block")
        if c.loss not in ("mse", "cosine"):
            raise ConfigError(f"aasp.loss={c.loss!r}: choose mse or cosine")
        if c.pad_value not in ("zero", "data"):
            raise ConfigError(f"aasp.pad_value={c.pad_value!r}: choose zero or data")
        if c.contrast_embed not in ("pred", "cls") or (c.contrast_embed == "cls" and not enc.use_cls):
            raise ConfigError(
                f"aasp.contrast_embed={c.contrast_embed!r}: choose pred, or cls with model.use_cls"
            )
        if c.pred_dim % c.pred_heads:
            raise ConfigError(f"aasp: pred_dim={c.pred_dim} must be divisible by pred_heads={c.pred_heads}")
        if not 0 <= self.config.optim.ema <= c.ema_end <= 1:
            raise ConfigError(
                f"aasp: need 0 <= optim.ema={self.config.optim.ema} <= ema_end={c.ema_end} <= 1"
            )
