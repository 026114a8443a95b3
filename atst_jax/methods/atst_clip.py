"""ATST-Clip: clip-level teacher-student pretraining, the 2022 "ATST" (spec/methods.md §2).

Recipe, as the official audiossl code (``audiossl/methods/atst``) runs it:

- Two **independent** random crops of one clip: an ``anchor`` (``anchor_seconds``; 6 s in the base recipe,
  9 s in the newer small one) and a ``positive`` (6 s). The pipeline draws both (``inputs()``); shorter clips
  are padded and masked by length.
- Each crop gets its own log-mixup-exp (λ ~ U(0, 0.4); partner drawn from a FIFO bank of earlier crops of
  its kind, ``mixup_bank`` = official ``n_memory=2000``, first step unmixed — as in ATST-Frame; 0 = another
  clip of the global batch) and its own RandomResizeCrop on both axes (virtual canvas 1× frequency, 1.5×
  time, scales U(0.6, 1.5) on each axis, PyTorch bicubic back to the crop's size).
- No masking. The encoder has a CLS token (positional slot 0) and the final ``norm``; the representation is
  the CLS output. Crops of equal length go through an encoder together, as the official MultiCropWrapper
  concatenates them; the heads always see both crops' CLS outputs in one batch ``[anchor; positive]``, so
  BatchNorm statistics cover the ``2B`` CLS vectors of the global batch.
- Student: encoder → projector → predictor; teacher: encoder → projector (stop-gradient), in train mode as in
  the official code (drop-path on, BN batch statistics; ``teacher_train_mode=False`` = eval mode with the
  student projector's running statistics, see ATST-Frame). Loss: symmetric BYOL ``2 − 2·cos`` between the
  student prediction of one crop and the teacher projection of the other, averaged over the two pairs.
- Teacher = EMA of the student's encoder and projector parameters; optimizer and schedules as ATST-Frame.
- Collapse monitors ``std_cls_stu`` / ``std_cls_tea``: std of the L2-normalised outputs over the ``2B`` rows.
- The 80 dB floor per crop (``crop_floor_db``). The official code computes the log-mel of each *cropped
  waveform*, so ``AmplitudeToDB(top_db=80)`` floors each crop at its own maximum − 80 dB, before the MinMax
  normalisation, mixup and RandomResizeCrop. By default (``features="atst_logmel64_unfloored"``: prepare the
  data with ``--features atst_logmel64_unfloored``; the embedded dataset is built so automatically) each crop
  is floored at the maximum of its valid frames − ``crop_floor_db`` (padding frames do not enter the maximum,
  and are lifted to the floor as the official zero-padded waveform is), in the normalised domain
  (``FeatureSet.db_span``), before mixup: the official transform up to the STFT's reflect padding at the
  crop's edges. 0 turns it off. With ``features="atst_logmel64"`` (data floored per clip at the clip's maximum
  − 80 dB) a crop's own floor lies at or below the clip's, so it changes nothing and is skipped: a quiet crop
  of a loud clip then keeps detail only down to the clip's floor. Either way the encoder is evaluated on
  ``atst_logmel64`` (``FeatureSet.inference_name``), as the official evaluation floors each input it is given.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from atst_jax import features as feature_sets
from atst_jax import flops
from atst_jax.data import views
from atst_jax.methods.base import Crop, Method, crop_frames, official_schedule_hparams
from atst_jax.models import collapse
from atst_jax.models.byol import byol_pair, init_byol, normalized_std, use_student_bn_stats
from atst_jax.sharding import ConfigError

CROPS = ("anchor", "positive")


@dataclasses.dataclass(frozen=True)
class AtstClipConfig:
    anchor_seconds: float = 6.0
    positive_seconds: float = 6.0
    mixup_ratio: float = 0.4
    mixup_bank: int = 2000  # FIFO bank of >= this many earlier crops per crop kind; 0 = partner in the batch
    freq_scale: tuple[float, float] = (0.6, 1.5)
    time_scale: tuple[float, float] = (0.6, 1.5)
    virtual_time: float = 1.5  # virtual crop canvas along time (frequency: 1×)
    # The crops' feature set, and the floor below each crop's own maximum (dB; 0 = none), applied when the
    # stored values are not floored already (see the module docstring).
    features: str = "atst_logmel64_unfloored"
    crop_floor_db: float = 80.0
    proj_hidden: int = 4096
    proj_dim: int = 256
    teacher_train_mode: bool = True
    # A clip shorter than the crop is padded (the clip's floor; the fbank of silence for Kaldi features). True
    # (official: the waveform is zero-padded and the padding is signal): the padding counts as audio; False:
    # masked by the valid length (keys, loss, statistics). Identical for clips at least a crop long.
    pad_is_signal: bool = True
    # Allowed values, checked before anything compiles (atst_jax.knobs).
    RANGES: ClassVar[dict[str, str]] = {
        "anchor_seconds": "(0, inf)",
        "positive_seconds": "(0, inf)",
        "mixup_ratio": "[0, 1]",
        "mixup_bank": "[0, inf)",
        "freq_scale": "(0, inf) ordered",
        "time_scale": "(0, inf) ordered",
        "virtual_time": "[1, inf)",
        "crop_floor_db": "[0, inf)",
        "proj_hidden": "[1, inf)",
        "proj_dim": "[1, inf)",
    }


class AtstClip(Method):
    name = "atst_clip"
    Config = AtstClipConfig
    ema_covers = ("encoder", "projector")
    monitors = ("std_cls_stu", "std_cls_tea")

    def crop_frames(self) -> dict[str, int]:
        d, c = self.config.data, self.cfg
        return {
            "anchor": crop_frames(c.anchor_seconds, d.sample_rate, d.hop_length),
            "positive": crop_frames(c.positive_seconds, d.sample_rate, d.hop_length),
        }

    def inputs(self):
        return tuple(Crop(name, frames, self.cfg.features) for name, frames in self.crop_frames().items())

    def crop_floor_depth(self) -> float:
        """The per-crop floor's depth below the crop's maximum in model-input units; 0 when none is applied:
        ``crop_floor_db`` 0, or features already floored per clip at that depth or less (a no-op there)."""
        fs, db = feature_sets.get(self.cfg.features), float(self.cfg.crop_floor_db)
        if db <= 0 or (fs.clip_floor_db and db >= fs.clip_floor_db):
            return 0.0
        return fs.db_span(db)

    def floor_crops(self, batch):
        """``batch`` with each crop floored at its own valid maximum − ``crop_floor_db`` (when applied)."""
        depth = self.crop_floor_depth()
        if not depth:
            return batch
        floored = {name: floor_below_peak(batch[name], batch[f"{name}_length"], depth) for name in CROPS}
        return {**batch, **floored}

    def init(self, rng):
        student, teacher = init_byol(rng, self.enc_cfg, self.cfg, self.ema_covers)
        state = {}
        if self.cfg.mixup_bank > 0 and self.cfg.mixup_ratio > 0:  # one bank per crop, as the official
            shapes = {name: (self.enc_cfg.n_mels, frames) for name, frames in self.crop_frames().items()}
            state = views.mixup_bank_init(self.cfg.mixup_bank, self.config.train.global_batch, shapes)
        return student, teacher, state

    def make_views(self, key, batch, partners=None):
        """Each crop's own mixup + 2-D RandomResizeCrop: ``{name: [B, F, T_name]}``. ``partners``: per crop
        ``(partner, use)`` from the mixup bank (else another clip of the batch); with them, also returns the
        crops as mixup received them (what the bank stores)."""
        cfg = self.cfg
        batch = self.floor_crops(batch)
        out = {}
        for name, k in zip(CROPS, jax.random.split(key, len(CROPS)), strict=True):
            k_mix, k_crop = jax.random.split(k)
            x = batch[name]
            if cfg.mixup_ratio > 0:
                x = views.mixup(k_mix, x, cfg.mixup_ratio, *(partners or {}).get(name, ()))
            out[name] = views.random_resize_crop(k_crop, x, cfg.freq_scale, cfg.time_scale, cfg.virtual_time)
        return out if partners is None else (out, {name: batch[name] for name in CROPS})

    def pictures(self, batch, key, step):
        """The first clip's two crops before and after their augmentation, as the step drew them (with the
        mixup bank, which pictures cannot see, the mixup partner is another clip of the batch)."""
        del step
        batch = self.padding_as_signal(batch)
        crops = self.make_views(jax.random.split(key, 3)[0], batch)
        out = []
        for name in CROPS:
            out += [(f"{name} crop", batch[name][0], None), (f"{name}, augmented", crops[name][0], None)]
        return out

    @staticmethod
    def encode(encoder, crops, lengths, *, train, key):
        """CLS outputs ``[2B, D]`` = [anchor; positive] and the anchor crop's final tokens ``[B, 1 + N, D]``.
        Crops of equal length share one encoder call."""
        a, p = crops["anchor"], crops["positive"]
        if a.shape == p.shape:
            x = jnp.concatenate([a, p], axis=0)
            length = jnp.concatenate([lengths["anchor"], lengths["positive"]], axis=0)
            out = encoder(x, length, None, train=train, key=key)
            return out[:, 0], out[: a.shape[0]]
        k_a, k_p = jax.random.split(key)
        out_a = encoder(a, lengths["anchor"], None, train=train, key=k_a)
        cls_p = encoder(p, lengths["positive"], None, train=train, key=k_p)[:, 0]
        return jnp.concatenate([out_a[:, 0], cls_p], axis=0), out_a

    @classmethod
    def encode_cls(cls, encoder, crops, lengths, *, train, key):
        """CLS outputs ``[2B, D]`` = [anchor; positive]."""
        return cls.encode(encoder, crops, lengths, train=train, key=key)[0]

    def loss(self, student, teacher, method_state, batch, key, step):
        del step
        batch = self.padding_as_signal(batch)
        cfg = self.cfg
        b = batch["anchor"].shape[0]
        k_view, k_stu, k_tea = jax.random.split(key, 3)
        if views.has_mixup_bank(method_state):  # partners from the bank, then this batch's crops into it
            partners = views.mixup_bank_partners(jax.random.fold_in(key, 3), method_state, CROPS, b)
            crops, sources = self.make_views(k_view, batch, dict(zip(CROPS, partners, strict=True)))
            method_state = views.mixup_bank_update(method_state, sources)
        else:  # no bank (mixup_bank=0, or a direct call with {}): partners from the batch
            crops = self.make_views(k_view, batch)
        lengths = {name: batch[f"{name}_length"] for name in CROPS}
        rows = jnp.ones((2 * b,), jnp.float32)

        train_mode = cfg.teacher_train_mode
        if not train_mode:
            use_student_bn_stats(student, teacher)
        t_cls, t_anchor = self.encode(teacher.encoder, crops, lengths, train=train_mode, key=k_tea)
        z = jax.lax.stop_gradient(teacher.projector(t_cls, rows, use_running_average=not train_mode))
        s_cls = self.encode_cls(student.encoder, crops, lengths, train=True, key=k_stu)
        p = student.predictor(student.projector(s_cls, rows), rows)

        half = rows[:b]
        total = 0.5 * (byol_pair(p[b:], z[:b], half) + byol_pair(p[:b], z[b:], half))
        # Encoder health on the anchor crop's teacher tokens (the CLS objective alone never looks at them).
        n_pre = teacher.encoder.n_prefix
        t_valid = teacher.encoder.valid_mask(lengths["anchor"], t_anchor.shape[1])[:, n_pre:]
        metrics = {
            "loss": total,
            "std_cls_stu": normalized_std(p, rows),
            "std_cls_tea": normalized_std(z, rows),
            **collapse.health(t_anchor[:, n_pre:], t_valid),
        }
        return total, metrics, method_state

    def step_flops(self, global_batch: int) -> float:
        """Both networks over both crops (``B`` sequences each), the heads on ``2B`` CLS vectors, and each
        crop's 2-D resize."""
        cfg, enc = self.cfg, self.enc_cfg
        encoders = sum(
            flops.encoder_forward(enc, frames // enc.patch_w, global_batch)
            for frames in self.crop_frames().values()
        )
        rows = 2 * global_batch
        projector = flops.bnmlp_forward(rows, enc.width, cfg.proj_hidden, cfg.proj_dim)
        predictor = flops.bnmlp_forward(rows, cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        resize = sum(
            flops.resize_2d(global_batch, enc.n_mels, frames, int(frames * cfg.virtual_time))
            for frames in self.crop_frames().values()
        )
        teacher = encoders + projector
        student = flops.TRAIN_FACTOR * (encoders + projector + predictor)
        anchor = self.crop_frames()["anchor"] // enc.patch_w
        monitor = flops.token_covariance(global_batch, anchor, enc.width)  # the health monitors
        return float(teacher + student + resize + monitor)

    def check(self):
        if not self.enc_cfg.use_cls:
            raise ConfigError("atst_clip reads the CLS token: set model.use_cls=True")
        if self.cfg.features not in feature_sets.FEATURE_SETS:
            raise ConfigError(
                f"atst_clip.features={self.cfg.features!r}: choose from {sorted(feature_sets.FEATURE_SETS)}"
            )
        clip_floor = feature_sets.get(self.cfg.features).clip_floor_db
        if clip_floor and 0 < self.cfg.crop_floor_db < clip_floor:
            raise ConfigError(
                f"atst_clip.crop_floor_db={self.cfg.crop_floor_db} is below the {clip_floor:g} dB floor that "
                f"{self.cfg.features!r} already has per clip: use features='atst_logmel64_unfloored' (data "
                "prepared with --features atst_logmel64_unfloored), or crop_floor_db=0"
            )
        for name, frames in self.crop_frames().items():
            if frames // self.enc_cfg.patch_w < 1:
                raise ConfigError(f"atst_clip.{name}_seconds gives no whole token ({frames} frames)")

    @classmethod
    def lightning_hparams(cls, config, *, width: int, depth: int, heads: int):
        """The ``hyper_parameters`` of the official ``ATSTLightningModule`` (arch, peak learning_rate,
        warmup_steps, max_steps, ema, and ``train_len``: the longest crop in seconds, which the official
        downstream code reads as its chunk length), and warnings."""
        hp, warnings = official_schedule_hparams(config, width, depth, heads)
        section = dict(config.get(cls.name) or {})
        defaults = AtstClipConfig()
        hp["train_len"] = float(
            max(
                section.get("anchor_seconds", defaults.anchor_seconds),
                section.get("positive_seconds", defaults.positive_seconds),
            )
        )
        return hp, warnings


def floor_below_peak(x, length, depth):
    """``max(x, peak − depth)`` per example of ``x [B, F, T]``, ``peak`` the maximum over its valid frames
    (``t < length[b]``), so padding never sets the floor but is lifted to it; an empty example is unchanged."""
    valid = (jnp.arange(x.shape[-1]) < length[:, None])[:, None, :]
    peak = jnp.max(jnp.where(valid, x, -jnp.inf), axis=(1, 2), keepdims=True)
    return jnp.maximum(x, peak - depth)
