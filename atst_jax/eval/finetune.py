"""Full fine-tuning of a pretrained encoder on a labelled task, and ATST-C2F (clip → frame distillation).

The command, ``python -m atst_jax.finetune`` — its options, the checks made before any work, the ``--out``
folder's life cycle (checkpoints, stop and resume, results written as each model finishes) — is
:mod:`atst_jax.eval.finetune_run`; this module is the method.

DATA are prepared datasets as for ``atst_jax.evaluate`` (records + ``labels.json``; strong labels → SED on the
encoder's time grid, weak → clip classification, single- or multi-label).

**The model** (spec §3): the encoder (every parameter trained) and a head on the **last block's** final-normed
tokens: clip tasks ``BatchNorm (no affine) → Linear`` on ``[CLS ‖ mean of the valid tokens]`` when the encoder
has a CLS token (ATST-Clip, ASiT) and on the mean of the valid tokens otherwise (ATST-Frame); SED a ``Linear``
(no BatchNorm, as the official frame-level heads) on every time step (a 40 ms token, or the mean of a
16-frame column of 2-D patches). Drop-path ``--drop_path`` while training (the encoder's pretraining rate by
default).

**The optimisation** (the official ``FineTuningPLModule``): SGD, momentum 0.9, no weight decay; learning rate
``--lr · --batch / 256`` (``--lr`` is the base rate of a batch of 256, as the official scripts scale it; the
default 0.16 gives 0.01 at the default batch of 16), linear warm-up over ``--warmup_epochs`` (step ``t``
of ``W`` at ``(t + 1)/W`` of the peak: the first step learns too, :func:`lr_schedule`) then cosine to 1e-6,
per step; gradients clipped to a global norm of ``--clip_norm`` (3.0) before the per-layer scaling;
**layer-wise LR decay** ``d = --layer_decay`` with the official indexing for depth L, block ``b``
(0-based) ``d^(L−b)`` and the head 1 at both levels; clip tasks (the clip fine-tuning code): the stem (patch
projection, positions, mask token, CLS) ``d^L`` — the same factor as block 0 — and the final norm ``d``; SED
(the official frame-level code): the stem ``d^(L+1)`` and the final norm 1. Loss: softmax cross-entropy for
single-label tasks, binary cross-entropy for multi-label and SED (mean over valid steps).

**Mixup**, ``--mixup ALPHA`` (off by default), is the official ``mixup_training`` (``FinetuneTargetTransform``:
``MixupSpecLabel(n_memory=5000)`` then BYOL-A's ``RandomResizeCrop``), and with it **every** loss is BCE on
(mixed one-hot, or sigmoid teacher) targets, single-label tasks included. Clip tasks, ``--mixup_partner
memory`` (default), as the official: a FIFO memory (:class:`MixupBank`) of the last ``--mixup_memory`` (5000)
training examples — the normalised crops before their own mixing, their lengths and one-hot targets — and,
example by example in batch order, each example with the memory non-empty mixed with one drawn uniformly
from it, ``x·λ + x'·(1 − λ)``, ``λ ~ Beta(α, α)`` per example, targets alike, a partner of another length by
the official window rule (:func:`mix_pair`), then the example itself appended: the run's first example is
left unmixed, and an example can draw earlier ones of its own batch, as in the official data loader. Then
BYOL-A's RandomResizeCrop on both axes of each clip's valid frames alone (:func:`random_resize_crop_valid`;
padding stays padding), in the step (:func:`augment`). ``--mixup_partner batch``: the partner is another
example of the same batch instead (a permutation, :func:`mixup_batch`; the mix valid as far as the longer).
SED always mixes within the batch (the official frame-level datasets take no target transform) and gets no
resize-crop (a time warp would move events off their labelled steps).

What differs from the official memory: ours is one memory for the whole run, on the host in the training
process and saved with the checkpoints (a stopped run continues it bit for bit), where the official one lives
in each data-loader worker (10 per GPU, not persistent: re-created empty every epoch, so each worker's
first example of an epoch is unmixed and its memory holds only the batches that worker built); its draws
come from ``(seed, epoch, step)`` NumPy streams; it holds at most the run's example count (a memory that
never fills behaves the same); and it holds our training crops (``--crop_s``, padded) where the official one
holds whole clips (up to 12 s), so a partner's length differs from the clip's only where one of them is
shorter than the crop.

**ATST-C2F**: ``λ·L_distill + (1 − λ)·L_task`` with a frozen teacher — a model fine-tuned on the same task by
this command (``--teacher FT_DIR``: the model's folder, or the ``--out`` of the run that made it) — run on
the same (mixed, cropped) input: ``L_distill`` = BCE(student logits, sigmoid(teacher logits)) for multi-label
tasks (and any with ``--mixup``), the soft-target cross-entropy with softmax(teacher logits) for single-label
tasks, and for SED the per-step BCE on the teacher's per-step sigmoid outputs (the frame-level variant).
λ = ``--distill_lambda`` (0.5, the spec's value outside AS-2M). ``--c2f_clip RUN`` runs the whole recipe:
fine-tune that ATST-Clip run into ``DIR/clip/``, then the given (ATST-Frame) encoder without distillation
(``DIR/frame/``, unless ``--no_undistilled``) and with it (``DIR/frame_distilled/``), and reports the three
side by side.

*The teacher's chunks.* The student's crop (10 s for ATST-Frame) is longer than the crop the Clip teacher was
pretrained and fine-tuned on (6 s base, 9 s small); its positional slots past that crop never received a
gradient. So, as the official distillation (``get_intermediate_layers_chunks``), the teacher sees the crop in
consecutive chunks of the crop it was fine-tuned and evaluated with (``chunk_frames`` of its ``model.json``,
through the inference chunk rules), all chunks of a batch as one batch (:func:`chunked_logits`). Clip level:
its ``[CLS ‖ mean]`` features averaged over the chunks, then its head. ``--teacher_chunks``: ``official``
(default) = the official code's average, **equal weights** over the chunks that count — the first one whenever
it holds audio, a later one only when it holds more than half a chunk of audio (a short trailing chunk is
dropped); ``valid`` = each chunk weighted by its valid tokens, as the teacher's own evaluation averages its
chunks (below) and as the inference scene embedding does, so a short last chunk counts for the audio it holds.
Both agree when every chunk is full, and for a crop of one chunk. Frame level: the chunks' per-step logits, end
to end on the student's grid (no average, so the knob does not apply).

*The teacher's mode*, ``--teacher_mode``: ``official`` (default) = the official code's — **train mode at clip
level** (its clip-level distillation never calls ``.eval()`` on the teacher: drop-path at the rate the teacher
was fine-tuned with, on keys folded from the step's key, and its head's BatchNorm normalising the
chunk-averaged features with the statistics of the batch), **eval mode at frame level** (the frame-level code
puts the teacher in ``eval()``); ``eval`` / ``train``: that mode at both levels. Either way the teacher gets
no gradient, and its BatchNorm running statistics are never updated: PyTorch's train mode moves them, but the
official code reads them only for a logged validation loss, never for training or a reported metric, and the
teacher is not saved.

**Crops and evaluation**: training examples are random crops of ``--crop_s`` seconds (default: the encoder's
chunk, e.g. the 10 s positional table of ATST; shorter clips are padded and masked), the start on the token
grid so SED targets stay aligned. Evaluation runs each whole clip as consecutive chunks: clip logits are the
chunks' logits averaged with their valid-token counts as weights (for a mean-of-tokens feature this is the
logit of the clip-wide mean, the head being affine); SED logits are concatenated. The model is evaluated on
the validation split (``--val``, else ``--val_fraction`` of ``--train`` held out by id hash) after every
epoch; the best epoch's parameters (accuracy / mAP / frame mAP, as the probe) are kept, tested and saved.

**Presets**, ``--recipe TASK`` (:mod:`atst_jax.eval.recipes`: ``audioset``, ``audioset_b``, ``fsd50k``,
``nsynth``, ``spcv2``, ``us8k``, ``voxceleb1``, ``as_strong``, ``dcase`` — the tasks the official fine-tuning
scripts define): the official learning rate, batch, epochs, warm-up, layer decay, mixup α, crop (and for SED
the median filter, for C2F λ) of that task, **keyed by (family, task)**, since the official scripts differ
between ATST-Clip, ATST-Frame and the distilled C2F Frame model. Each model takes its own family's values: a
plain run by its encoder (a CLS token: the ATST-Clip values, none: ATST-Frame), ``--c2f_clip`` its ``clip/``,
``frame/`` and ``frame_distilled/`` runs from the Clip, Frame and C2F entries (``--teacher``: the distilled
run from C2F). Flags given on the command line win over the preset. The values each model runs with, the
recipe, its family, source script and the flags given are printed when the model starts and recorded in
``RESULTS.json`` and ``model.json``.

Output (``OUT/<model>/``, :mod:`atst_jax.eval.finetune_run`): ``model/`` (``model.json`` +
``params.msgpack``: the fine-tuned encoder and head, loadable by :func:`load_finetuned` and usable as
``--teacher``) and its results entry (options, recipe entry, test metrics, per-class numbers, selected epoch
and the validation history) in ``OUT/RESULTS.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from atst_jax import features as feature_sets
from atst_jax import inference
from atst_jax.data import views
from atst_jax.eval.data import (
    EvalError,
    LabelledSet,
    check_sets,
    clip_targets,
    frame_targets,
    hold_out,
    task_of,
)
from atst_jax.eval.metrics import clip_metrics, mean_ap, median_steps, sed_metrics
from atst_jax.eval.probe import _bar_factory
from atst_jax.eval.report import fmt
from atst_jax.models.encoder import EncoderConfig, FrameAST

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # running = m · running + (1 − m) · batch (PyTorch's momentum 0.1)
FINAL_LR = 1e-6
LR_REF_BATCH = 256  # --lr is the learning rate of a batch of this size
MODEL_FORMAT = "atst_jax finetuned v1"
RUN_FILE = "RUN.json"  # a fine-tuning --out folder's owner: the command, options and inputs of its run


class FinetuneError(EvalError):
    """A user error: one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    task: str = "auto"
    epochs: int = 10
    batch: int = 16
    lr: float = 0.16  # base LR for a batch of 256: 0.01 at the default batch of 16
    layer_decay: float = 0.75
    momentum: float = 0.9
    clip_norm: float = 3.0
    warmup_epochs: float = 1.0
    mixup: float = 0.0  # Beta(α, α); 0 = off
    mixup_partner: str = "memory"  # memory (official, clip level) | batch
    mixup_memory: int = 5000  # the memory's size in examples (official n_memory)
    crop_s: float | None = None  # None: the encoder's chunk
    drop_path: float | None = None  # None: the pretraining rate
    distill_lambda: float = 0.5
    teacher_mode: str = "official"  # official | eval | train (the C2F teacher; see the module docstring)
    teacher_chunks: str = "official"  # official | valid: how the clip-level teacher averages its chunks
    val_fraction: float = 0.2
    median_s: float = 0.28
    seed: int = 0
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------
# The model: encoder + BatchNorm (no affine) + Linear
# ----------------------------------------------------------------------------------------------------------


def head_dims(cfg: EncoderConfig, level: str) -> int:
    return 2 * cfg.width if (level == "clip" and cfg.use_cls) else cfg.width


class FinetuneModel(nnx.Module):
    """``logits, valid = model(spec, length)``: clip logits ``[B, K]`` (valid ``[B]`` = valid tokens) or
    per-step logits ``[B, S, K]`` (valid ``[B, S]`` bool). ``features`` and ``head`` are the two halves, for a
    caller that pools features across chunks before the head (the C2F teacher).

    ``chunk_frames`` is the crop the model was fine-tuned and is evaluated with (set by :func:`load_finetuned`
    from its metadata; None for a fresh model): the longest input it has trained positions for."""

    def __init__(
        self,
        encoder: FrameAST,
        num_classes: int,
        level: str,
        *,
        rngs: nnx.Rngs,
        chunk_frames: int | None = None,
    ):
        self.encoder = encoder
        self.level = level
        self.chunk_frames = chunk_frames
        dims = head_dims(encoder.cfg, level)
        # Clip level: BatchNorm (no affine) → Linear. Frame level: the Linear alone, as the official SED heads
        # (``LinearHead(use_norm=False)`` of the AudioSet-strong and DCASE code).
        # Two-pass batch variance: a feature nearly constant across a batch (a CLS output) has a variance far
        # below its square, which E[x²] − E[x]² in float32 would lose.
        bn = dict(momentum=BN_MOMENTUM, epsilon=BN_EPS, use_fast_variance=False, rngs=rngs)
        self.bn = (
            nnx.BatchNorm(dims, use_scale=False, use_bias=False, **bn) if level == "clip" else nnx.data(None)
        )
        self.linear = nnx.Linear(dims, num_classes, rngs=rngs)

    def time_steps(self, frames: int) -> int:
        return frames // inference.time_patch(self.encoder.cfg)

    def features(self, spec, length, *, train: bool = False, key=None):
        """The head's input and its validity: clip level ``([B, dims], [B] valid steps)`` — ``[CLS ‖ mean of
        the valid steps]`` or the mean alone —, frame level ``([B, S, D] steps, [B, S] bool)``."""
        enc = self.encoder
        tokens = enc(spec, length, train=train, key=key)  # [B, prefix + N, D], final-normed last block
        prefix = enc.n_prefix
        patches = tokens[:, prefix:]
        n_valid = enc.token_lengths(length)  # [B] valid patch tokens
        stem = enc.stem
        steps = stem.time_steps(patches)  # [B, S, D]: the mean over each step's frequency patches
        step_valid = n_valid // stem.freq_patches if stem.freq_patches > 1 else n_valid
        valid = jnp.arange(steps.shape[1])[None, :] < step_valid[:, None]  # [B, S]
        if self.level == "clip":
            w = valid.astype(steps.dtype)[..., None]
            mean = (steps * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
            feats = jnp.concatenate([tokens[:, 0], mean], axis=-1) if prefix else mean
            return feats, step_valid
        return steps, valid

    def head(self, feats, valid=None, *, train: bool = False):
        """Logits of :meth:`features`' output; clip level with ``train``: BatchNorm on batch statistics, which
        also moves its running statistics. Frame level: per step, ``valid`` unused (no batch statistics)."""
        if self.level == "clip":
            return self.linear(self.bn(feats, use_running_average=not train))
        return self.linear(feats)

    def __call__(self, spec, length, *, train: bool = False, key=None):
        feats, valid = self.features(spec, length, train=train, key=key)
        return self.head(feats, valid, train=train), valid


def teacher_chunk_frames(model: FinetuneModel) -> int:
    """The chunk a fine-tuned model runs in: its fine-tuning crop (``chunk_frames``) through the inference
    chunk rules (whole time patches, within its positional table), or, unknown, the encoder's default
    chunk."""
    return inference.trained_chunk_frames(model.encoder.cfg, model.chunk_frames)


def chunked_logits(
    model: FinetuneModel,
    spec,
    length,
    chunk: int,
    *,
    train: bool = False,
    key=None,
    steps=None,
    weights: str = "valid",
):
    """``model``'s logits on a crop ``spec [B, F, T]`` of any length, run as consecutive chunks of at most
    ``chunk`` frames (the C2F teacher; traceable, static shapes).

    The crop is cut at ``0, w, 2w, …`` (``w = min(chunk, T)`` in whole time patches; the chunks of
    :func:`atst_jax.inference.chunk_bounds`), the last zero-padded, each chunk's valid frames from ``length``;
    the ``C`` chunks run as one batch ``[B·C, F, w]``. Clip level: the chunks' features are averaged, then the
    head: ``[B, K]``; ``weights="valid"``: each chunk weighted by its valid steps (a chunk without audio
    counts 0); ``"official"``: equal weights over the first chunk with audio and every later chunk holding
    more than ``w // 2`` valid frames (``get_intermediate_layers_chunks``' marks). Frame
    level: the chunks' per-step logits laid back end to end on the crop's grid, cut to ``steps`` (default
    ``T`` / patch): ``[B, steps, K]``. With ``train``, BatchNorm runs on batch statistics (of the pooled clip
    features, or of every valid step) and drop-path on ``key``, chunk by chunk."""
    tp = inference.time_patch(model.encoder.cfg)
    b, f, t = spec.shape
    width = min(chunk, -(-t // tp) * tp)
    c = max(1, len(inference.chunk_bounds(t, width, tp)))
    total = c * width
    x = spec[..., :total] if total <= t else jnp.pad(spec, ((0, 0), (0, 0), (0, total - t)))
    x = x.reshape(b, f, c, width).transpose(0, 2, 1, 3).reshape(b * c, f, width)
    starts = jnp.arange(c, dtype=length.dtype) * width
    lens = jnp.clip(length[:, None] - starts[None, :], 0, width).reshape(b * c)
    feats, valid = model.features(x, lens, train=train, key=key)
    if model.level == "clip":
        if weights == "official":
            counts = lens.reshape(b, c) > jnp.where(jnp.arange(c) == 0, 0, width // 2)[None, :]
            w = counts.reshape(b, c, 1).astype(feats.dtype)
        else:
            w = valid.reshape(b, c, 1).astype(feats.dtype)
        pooled = (feats.reshape(b, c, -1) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return model.head(pooled, train=train)
    logits = model.head(feats, valid, train=train)  # [B·C, w / patch, K]
    logits = logits.reshape(b, -1, logits.shape[-1])
    steps = t // tp if steps is None else steps
    if logits.shape[1] < steps:  # only when chunk_bounds dropped a trailing partial patch
        logits = jnp.pad(logits, ((0, 0), (0, steps - logits.shape[1]), (0, 0)))
    return logits[:, :steps]


def layer_scales(params: dict, depth: int, decay: float, level: str = "clip") -> dict:
    """Per-parameter LR factors (a tree like ``params``; stacked block parameters get ``[L, 1, …]``), with
    the official indexing: block b ``d^(L−b)``, head 1; clip level stem ``d^L``, final norm ``d``; frame
    level stem ``d^(L+1)``, final norm 1."""
    stem, norm = (decay ** (depth + 1), 1.0) if level == "frame" else (decay**depth, decay)

    def name(entry) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    def of(path, x):
        if name(path[0]) != "encoder":
            return jnp.ones((), jnp.float32)  # the head
        part = name(path[1])
        if part == "blocks":
            f = decay ** (depth - np.arange(depth, dtype=np.float64))
            return jnp.asarray(f, jnp.float32).reshape((depth,) + (1,) * (np.ndim(x) - 1))
        if part == "norm":
            return jnp.asarray(norm, jnp.float32)
        return jnp.asarray(stem, jnp.float32)  # stem: patch projection, positions, mask, CLS

    return jax.tree_util.tree_map_with_path(of, params)


def scale_by_tree(factors) -> optax.GradientTransformation:
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * f, updates, factors), state

    return optax.GradientTransformation(init, update)


def peak_lr(opts: FinetuneOptions) -> float:
    """The peak learning rate: ``--lr`` is the base rate of a batch of 256 (the official fine-tuning scripts'
    ``learning_rate · batch / 256``), scaled to the global batch ``--batch``."""
    return opts.lr * opts.batch / LR_REF_BATCH


def lr_schedule(opts: FinetuneOptions, total_steps: int, warmup_steps: int):
    """The learning rate of step ``t`` (0-based): linear warm-up over ``warmup_steps``, step ``t`` at
    ``(t + 1) / W`` of the peak, then cosine from the peak to ``FINAL_LR`` at ``total_steps``.

    The warm-up counts the step it is taking: a ramp starting at 0 (``t / W``) spends step 0 at rate 0, and a
    run of one step (``--epochs 1`` on a small set, warm-up one epoch) would then return the pretrained
    encoder unchanged, bit for bit. So every step, the first included, learns."""
    peak, w = peak_lr(opts), max(int(warmup_steps), 0)
    span = max(int(total_steps) - w, 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = peak * (t + 1.0) / max(w, 1)
        frac = jnp.clip((t - w) / span, 0.0, 1.0)
        cosine = FINAL_LR + (peak - FINAL_LR) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(t < w, warm, cosine)

    return schedule


def make_optimizer(
    params, depth: int, opts: FinetuneOptions, total_steps: int, warmup_steps: int, level: str = "clip"
):
    schedule = lr_schedule(opts, total_steps, warmup_steps)
    parts = [scale_by_tree(layer_scales(params, depth, opts.layer_decay, level))]
    if opts.clip_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(opts.clip_norm))
    parts.append(optax.sgd(schedule, momentum=opts.momentum if opts.momentum > 0 else None))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------------------
# Losses (C2F)
# ----------------------------------------------------------------------------------------------------------


def task_loss(logits, targets, softmax: bool, valid=None):
    """Softmax CE with (soft) targets, or mean BCE (over valid steps × classes for SED)."""
    if softmax:
        return -(targets * jax.nn.log_softmax(logits, axis=-1)).sum(-1).mean()
    bce = optax.sigmoid_binary_cross_entropy(logits, targets)
    if valid is None:
        return bce.mean()
    w = valid.astype(bce.dtype)[..., None]
    return (bce * w).sum() / jnp.maximum(w.sum() * bce.shape[-1], 1.0)


def distill_loss(logits, teacher_logits, softmax: bool, valid=None):
    """ATST-C2F's distillation term: soft-target CE on softmax(teacher) (single-label) or BCE on
    sigmoid(teacher) (multi-label, per step for SED). The teacher is a constant."""
    t = jax.lax.stop_gradient(teacher_logits)
    target = jax.nn.softmax(t, axis=-1) if softmax else jax.nn.sigmoid(t)
    return task_loss(logits, target, softmax, valid)


def c2f_loss(logits, targets, teacher_logits, lam: float, softmax: bool, valid=None):
    """``λ·L_distill + (1 − λ)·L_task``."""
    return lam * distill_loss(logits, teacher_logits, softmax, valid) + (1.0 - lam) * task_loss(
        logits, targets, softmax, valid
    )


# ----------------------------------------------------------------------------------------------------------
# Augmentation (--mixup)
# ----------------------------------------------------------------------------------------------------------

MIXUP_PARTNERS = ("memory", "batch")
MIXUP_STREAM = 0x313C  # the NumPy stream of a step's memory-mixup draws, apart from its crops'


def mixup_batch(key, spec, length, y, alpha: float):
    """``--mixup_partner batch``: each example mixed with another of the batch (a permutation), ``λ ~ Beta(α,
    α)`` per example, on the normalised spectrogram, the targets alike; the mix is valid as far as the longer
    of the two."""
    lam = jax.random.beta(key, alpha, alpha, (spec.shape[0],))
    perm = jax.random.permutation(jax.random.fold_in(key, 1), spec.shape[0])
    ls = lam[:, None, None]
    spec = ls * spec + (1 - ls) * spec[perm]
    length = jnp.maximum(length, length[perm])
    ly = lam.reshape((-1,) + (1,) * (y.ndim - 1))
    return spec, length, ly * y + (1 - ly) * y[perm]


def mix_pair(x, n: int, partner, m: int, lam, rng: np.random.Generator):
    """The official ``MixupSpecLabel`` rule for one example: ``x [F, T]`` (``n`` valid frames) mixed with a
    stored ``partner`` (``m`` valid frames) as ``x·λ + partner·(1 − λ)``. Equal lengths: frame by frame; the
    partner shorter: it is mixed into the window ``[s, s + m)`` of ``x``, the rest of ``x`` kept as it is; the
    partner longer: ``x`` is mixed with the partner's window ``[s, s + n)``; ``s`` uniform in ``[0, |n − m|)``
    (the official draw excludes the last offset). The mix keeps ``x``'s length; padding stays zero."""
    out = np.array(x, np.float32)
    lam = np.float32(lam)
    if n == m:
        out[:, :n] = lam * x[:, :n] + (1 - lam) * partner[:, :n]
    elif n > m:
        s = int(rng.integers(0, n - m))
        out[:, s : s + m] = lam * x[:, s : s + m] + (1 - lam) * partner[:, :m]
    else:
        s = int(rng.integers(0, m - n))
        out[:, :n] = lam * x[:, :n] + (1 - lam) * partner[:, s : s + n]
    return out


@dataclasses.dataclass
class MixupBank:
    """``--mixup_partner memory``: the official FIFO memory of the most recent training examples (host-side
    NumPy, as the official one lives in the data loader; saved with the fine-tune checkpoint): ``spec [M, F,
    T]`` (the normalised crops before their own mixing, zero-padded), their valid ``length [M]`` and targets
    ``y [M, K]``; a ring, ``pos`` the next slot to write, ``filled`` the slots written (at most ``M``)."""

    spec: np.ndarray
    length: np.ndarray
    y: np.ndarray
    pos: int = 0
    filled: int = 0

    @classmethod
    def empty(cls, size: int, freqs: int, frames: int, classes: int) -> MixupBank:
        z = np.zeros
        return cls(z((size, freqs, frames), np.float32), z((size,), np.int32), z((size, classes), np.float32))

    def append(self, x, n: int, y) -> None:
        """Stores one example, the oldest dropped once the memory is full."""
        self.spec[self.pos], self.length[self.pos], self.y[self.pos] = x, n, y
        self.pos = (self.pos + 1) % len(self.length)
        self.filled = min(self.filled + 1, len(self.length))

    def mix(self, rng: np.random.Generator, spec, length, y, alpha: float):
        """The batch ``spec [B, F, T]``, ``length [B]``, ``y [B, K]`` as the official per-example loop leaves
        it: example by example, with the memory non-empty, ``λ ~ Beta(α, α)`` and a partner drawn uniformly
        from the memory (:func:`mix_pair`; the targets ``y·λ + y'·(1 − λ)``), then the example itself (as it
        was before mixing) appended. So the run's very first example is left as it is, and an example may draw
        an earlier one of its own batch. Returns the mixed ``(spec, y)``; lengths do not change."""
        spec_out, y_out = np.array(spec, np.float32), np.array(y, np.float32)
        for r in range(spec.shape[0]):
            n = int(length[r])
            if self.filled:
                lam = np.float32(rng.beta(alpha, alpha))
                j = int(rng.integers(0, self.filled))
                spec_out[r] = mix_pair(spec[r], n, self.spec[j], int(self.length[j]), lam, rng)
                y_out[r] = lam * y[r] + (1 - lam) * self.y[j]
            self.append(spec[r], n, y[r])
        return spec_out, y_out


def _valid_time_matrix(width, offset, length, canvas, frames: int):
    """``[B, frames, frames]``: per example, canvas columns ``offset … offset+width−1`` resized (bicubic,
    ``align_corners=True``, taps clamped to the crop) to the clip's ``length`` valid frames, the clip sitting
    in the middle of a zero canvas of ``canvas`` columns; output and input columns past ``length`` are 0."""
    n = length.astype(jnp.float32)
    start = (canvas - length) // 2  # where the clip sits on its canvas
    s = jnp.arange(frames, dtype=jnp.float32)
    scale = jnp.where(length > 1, (width.astype(jnp.float32) - 1) / jnp.maximum(n - 1, 1.0), 0.0)
    src = scale[:, None] * s[None, :]
    base = jnp.floor(src)
    w = views._cubic_weights(src - base)  # [B, frames, 4]
    taps = base[..., None] + jnp.arange(-1, 3, dtype=jnp.float32)
    taps = jnp.clip(taps, 0, width.astype(jnp.float32)[:, None, None] - 1)
    col = taps.astype(jnp.int32) + (offset - start)[:, None, None]  # the input column each tap reads
    keep = (col >= 0) & (col < length[:, None, None]) & (s[None, :, None] < n[:, None, None])
    onehot = jax.nn.one_hot(col, frames, dtype=jnp.float32) * keep[..., None]
    return jnp.einsum("bik,bikj->bij", w, onehot)


def random_resize_crop_valid(key, x, length, freq_scale=(0.6, 1.5), time_scale=(0.6, 1.5), virtual_time=1.5):
    """BYOL-A RandomResizeCrop (:func:`atst_jax.data.views.random_resize_crop`, same draws) on each clip's
    ``length`` valid frames alone, as the official transform sees the unpadded clip: its canvas is
    ``int(virtual_time · length)`` columns, the crop's width ``clip(int(U(time_scale) · length), 1, canvas)``,
    and the crop is resized back to ``length`` frames; the padding stays zero. Equal to ``random_resize_crop``
    where every clip fills the crop."""
    b, f, t = x.shape
    length = jnp.asarray(length, jnp.int32)
    canvas = jnp.floor(length.astype(jnp.float32) * virtual_time).astype(jnp.int32)
    k_f, k_t = jax.random.split(key)
    h, i = views._crop_size_and_offset(k_f, b, f, f, freq_scale)
    w, j = views._crop_size_and_offset(k_t, b, length, canvas, time_scale)
    rows = views.freq_warp_matrix(h, i, f)  # [B, F, F]
    cols = _valid_time_matrix(w, j, length, canvas, t)  # [B, T(out), T(in)]
    y = jnp.einsum("bij,bjt->bit", rows, x.astype(jnp.float32))
    return jnp.einsum("bft,bst->bfs", y, cols).astype(x.dtype)


def augment(key, spec, length, y, alpha: float, level: str, partner: str = "batch"):
    """``--mixup``, the official ``mixup_training``, inside the step: with ``partner="batch"`` the in-batch
    mixup (:func:`mixup_batch`; with ``"memory"`` the batch arrives mixed from the :class:`MixupBank`), then
    at clip level BYOL-A's RandomResizeCrop on both axes of each clip's valid frames (canvas 1× frequency,
    1.5× time, scales U(0.6, 1.5); its defaults; :func:`random_resize_crop_valid`) on ``fold_in(key, 2)``.
    Frame level keeps mixup alone: a time warp would move the events off their labelled steps."""
    if partner == "batch":
        spec, length, y = mixup_batch(key, spec, length, y, alpha)
    if level == "clip":
        spec = random_resize_crop_valid(jax.random.fold_in(key, 2), spec, length)
    return spec, length, y


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskData:
    """A split in memory, normalised, with targets on the encoder's time grid."""

    data: LabelledSet
    specs: list[np.ndarray]  # float32 [F, T]
    targets: list[np.ndarray]  # clip: [K]; sed: [steps, K]


def task_data(data: LabelledSet, level: str, step_s: float, patch: int) -> TaskData:
    fs = feature_sets.get(data.features)
    specs = [np.asarray(fs.normalize(m.astype(np.float32)), np.float32) for m in data.mels]
    if level == "clip":
        y = clip_targets(data)
        targets = list(y)
    else:
        k = len(data.classes)
        targets = [
            frame_targets(e, s.shape[1] // patch, step_s, k) for e, s in zip(data.events, specs, strict=True)
        ]
    return TaskData(data, specs, targets)


def crop_batch(td: TaskData, idx, frames: int, patch: int, level: str, rng: np.random.Generator):
    """``spec [B, F, frames]``, ``length [B]``, targets (``[B, K]`` or ``[B, frames/patch, K]``)."""
    f = td.specs[0].shape[0]
    spec = np.zeros((len(idx), f, frames), np.float32)
    length = np.zeros((len(idx),), np.int32)
    k = len(td.data.classes)
    steps = frames // patch
    y = np.zeros((len(idx), k) if level == "clip" else (len(idx), steps, k), np.float32)
    for row, i in enumerate(idx):
        s = td.specs[i]
        t = s.shape[1]
        start = 0
        if t > frames:
            start = int(rng.integers(0, (t - frames) // patch + 1)) * patch
        piece = s[:, start : start + frames]
        spec[row, :, : piece.shape[1]] = piece
        length[row] = piece.shape[1]
        if level == "clip":
            y[row] = td.targets[i]
        else:
            tgt = td.targets[i][start // patch : start // patch + steps]
            y[row, : len(tgt)] = tgt
    return spec, length, y


def chunks_of(spec: np.ndarray, frames: int, patch: int):
    """Consecutive chunks of ``frames`` (the last padded): ``[(chunk [F, frames], valid frames)]``."""
    t = spec.shape[1] // patch * patch
    out = []
    for a in range(0, max(t, 1), frames):
        piece = spec[:, a : min(a + frames, t)]
        pad = np.zeros((spec.shape[0], frames), np.float32)
        pad[:, : piece.shape[1]] = piece
        out.append((pad, piece.shape[1]))
    return out


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


TEACHER_MODES = ("official", "eval", "train")
TEACHER_CHUNKS = ("official", "valid")
TEACHER_STREAM = 0x7EAC  # fold_in constant: the teacher's drop-path keys, apart from the student's


def teacher_trains(mode: str, level: str) -> bool:
    """Whether the C2F teacher runs in train mode: ``official`` = at clip level only (the official clip-level
    distillation never calls ``.eval()`` on its teacher; the frame-level one does)."""
    if mode not in TEACHER_MODES:
        raise FinetuneError(f"--teacher_mode must be one of {'|'.join(TEACHER_MODES)}, got {mode!r}")
    return mode == "train" or (mode == "official" and level == "clip")


@functools.partial(jax.jit, static_argnums=0)
def _predict_logits(graphdef, params, rest, spec, length):
    """A model's logits in eval mode. One program per model structure (the graph definition is static and
    compares by structure), shared by every :class:`Finetuner` of that structure: a run continued in the same
    process, or the same model fine-tuned twice, does not compile it again."""
    m = nnx.merge(graphdef, params, rest, copy=True)
    return m(spec, length, train=False)


def _pure(state):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


@dataclasses.dataclass
class FitState:
    """Where a fine-tuning run stands, all a resumed run needs to go on bit for bit: the trained parameters,
    BatchNorm statistics (``rest``) and optimizer state, the best epoch's parameters (host copies), and the
    position — ``step`` steps taken, ``epoch`` epochs finished, ``batch`` steps of the current one and their
    ``losses``. The data position is the position itself: an epoch's order and a step's crops are drawn from
    ``(seed, epoch[, step])`` (:meth:`Finetuner._train_epoch`). With ``--mixup_partner memory`` the
    :class:`MixupBank` too (its arrays with the others, its ring position and fill with the position)."""

    params: nnx.State
    rest: nnx.State
    opt_state: object
    best: tuple  # (params, rest) pure dicts of the best epoch so far
    step: int = 0
    epoch: int = 0
    batch: int = 0
    losses: list = dataclasses.field(default_factory=list)
    history: list = dataclasses.field(default_factory=list)
    best_score: float | None = None  # None: no epoch validated yet
    best_epoch: int = 0
    seconds: float = 0.0  # training time so far, over every run that worked on it
    mixup: MixupBank | None = None  # --mixup_partner memory: the memory of recent examples

    def arrays(self) -> dict:
        """The arrays as plain nested dicts (what Orbax stores). The optimizer state's leaves are numbered
        (its containers are optax's named tuples); a part without arrays (the BatchNorm statistics of a head
        without BatchNorm) is left out."""
        out = {
            "params": nnx.to_pure_dict(self.params),
            "opt": {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(self.opt_state))},
            "best_params": self.best[0],
        }
        if jax.tree.leaves(self.best[1]):
            out |= {"rest": nnx.to_pure_dict(self.rest), "best_rest": self.best[1]}
        if self.mixup is not None:  # copies: the memory changes in place while a save may still be writing
            bank = self.mixup
            out["mixup"] = {"spec": bank.spec.copy(), "length": bank.length.copy(), "y": bank.y.copy()}
        return out

    def position(self) -> dict:
        """The rest, as JSON (with a mixup memory, its ring position and fill)."""
        names = ("step", "epoch", "batch", "history", "best_score", "best_epoch", "seconds")
        out = {k: getattr(self, k) for k in names} | {"losses": [float(x) for x in self.losses]}
        if self.mixup is not None:
            out |= {"mixup_pos": self.mixup.pos, "mixup_filled": self.mixup.filled}
        return out

    def restored(self, arrays: dict, position: dict) -> FitState:
        """This state (the template: a fresh run's) with a checkpoint's ``arrays`` and ``position``."""

        def state(template, pure):
            out = jax.tree.map(lambda x: x, template)
            nnx.replace_by_pure_dict(out, pure)
            return out

        opt = [arrays["opt"][k] for k in sorted(arrays["opt"])]
        has_rest = "rest" in arrays
        position = dict(position)
        bank = None
        if "mixup" in arrays:  # host arrays again (writable copies), as a fresh run's memory
            m = {k: np.array(v) for k, v in arrays["mixup"].items()}
            ring = position.pop("mixup_pos"), position.pop("mixup_filled")
            bank = MixupBank(m["spec"], m["length"], m["y"], *ring)
        return FitState(
            state(self.params, arrays["params"]),
            state(self.rest, arrays["rest"]) if has_rest else self.rest,
            jax.tree.unflatten(jax.tree.structure(self.opt_state), opt),
            (arrays["best_params"], arrays["best_rest"] if has_rest else self.best[1]),
            **position,
            mixup=bank,
        )


class Finetuner:
    """One fine-tuning run (optionally distilled from a frozen teacher ``FinetuneModel``)."""

    def __init__(self, model: FinetuneModel, task: str, frames: int, opts: FinetuneOptions, teacher=None):
        self.model, self.task, self.frames, self.opts, self.teacher = model, task, frames, opts, teacher
        self.level = model.level
        self.softmax = task == "clip_single"  # the posteriors: softmax for a single-label task
        # The loss: softmax CE for a single-label task unless with mixup, where both terms are BCE on sigmoid
        # targets (the official ``mixup_training``: one-hot labels mixed, BCE with logits).
        self.loss_softmax = self.softmax and opts.mixup <= 0
        if opts.mixup_partner not in MIXUP_PARTNERS:
            raise FinetuneError(
                f"--mixup_partner must be one of {'|'.join(MIXUP_PARTNERS)}, got {opts.mixup_partner!r}"
            )
        # The memory partner is the official clip-level transform; SED keeps the in-batch partner.
        self.memory = opts.mixup > 0 and opts.mixup_partner == "memory" and self.level == "clip"
        self.patch = inference.time_patch(model.encoder.cfg)
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        if teacher is not None:
            self.t_graphdef, self.t_state = nnx.split(teacher)
            self.t_chunk = teacher_chunk_frames(teacher)
            self.t_train = teacher_trains(opts.teacher_mode, teacher.level)
            if opts.teacher_chunks not in TEACHER_CHUNKS:
                raise FinetuneError(
                    f"--teacher_chunks must be one of {'|'.join(TEACHER_CHUNKS)}, got {opts.teacher_chunks!r}"
                )
            self.teacher_logits = jax.jit(self._teacher_fn())

    def _teacher_fn(self):
        """``f(t_state, spec, length, key) -> teacher logits``: the teacher in chunks of its own crop, in the
        mode ``--teacher_mode`` gives it, drop-path on ``fold_in(key, TEACHER_STREAM)``. Its BatchNorm
        statistics are never written back (the teacher is constant)."""
        t_gd, chunk, train, patch = self.t_graphdef, self.t_chunk, self.t_train, self.patch
        weights = self.opts.teacher_chunks

        def fn(t_state, spec, length, key):
            tm = nnx.merge(t_gd, t_state, copy=True)
            k = jax.random.fold_in(key, TEACHER_STREAM)
            steps = spec.shape[-1] // patch
            return chunked_logits(tm, spec, length, chunk, train=train, key=k, steps=steps, weights=weights)

        return fn

    def _build(self, total_steps: int, warmup_steps: int):
        tx, self.schedule = make_optimizer(
            self.params,
            self.model.encoder.cfg.depth,
            self.opts,
            total_steps,
            warmup_steps,
            self.level,
        )
        gd, softmax, lam = self.graphdef, self.loss_softmax, self.opts.distill_lambda
        teacher = self.teacher is not None
        t_fn = self._teacher_fn() if teacher else None
        mixup, level = self.opts.mixup, self.level
        partner = "memory" if self.memory else "batch"

        def loss_fn(params, rest, t_state, spec, length, y, key):
            k_mix, k_drop = jax.random.split(key)
            if mixup > 0:
                spec, length, y = augment(k_mix, spec, length, y, mixup, level, partner)
            m = nnx.merge(gd, params, rest, copy=True)
            logits, valid = m(spec, length, train=True, key=k_drop)
            v = None if m.level == "clip" else valid
            if teacher:
                t_logits = t_fn(t_state, spec, length, key)
                loss = c2f_loss(logits, y, t_logits, lam, softmax, v)
            else:
                loss = task_loss(logits, y, softmax, v)
            return loss, nnx.state(m, nnx.BatchStat)

        def step(params, rest, opt_state, t_state, spec, length, y, key):
            (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, rest, t_state, spec, length, y, key
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, new_rest, opt_state, loss, optax.tree.norm(grads)

        self.tx = tx
        self._step = jax.jit(step, donate_argnums=(0, 1, 2))
        self._predict = functools.partial(_predict_logits, gd)

    def predict(self, td: TaskData, params=None, rest=None, batch: int | None = None) -> list[np.ndarray]:
        """Posteriors per clip: ``[K]`` (clip) or ``[steps, K]`` (SED)."""
        params = self.params if params is None else params
        rest = self.rest if rest is None else rest
        batch = batch or self.opts.batch
        pieces, owner = [], []
        for i, s in enumerate(td.specs):
            for chunk, n in chunks_of(s, self.frames, self.patch):
                pieces.append((chunk, n))
                owner.append(i)
        logits_all, valid_all = [], []
        for a in range(0, len(pieces), batch):
            group = pieces[a : a + batch]
            spec = np.zeros((batch, *group[0][0].shape), np.float32)
            length = np.zeros((batch,), np.int32)
            for r, (c, n) in enumerate(group):
                spec[r], length[r] = c, n
            logits, valid = self._predict(params, rest, jnp.asarray(spec), jnp.asarray(length))
            logits_all.append(np.asarray(logits)[: len(group)])
            valid_all.append(np.asarray(valid)[: len(group)])
        logits = np.concatenate(logits_all) if logits_all else np.zeros((0,))
        valid = np.concatenate(valid_all) if valid_all else np.zeros((0,))
        out: list[list] = [[] for _ in td.specs]
        for j, i in enumerate(owner):
            out[i].append((logits[j], valid[j]))
        posteriors = []
        for i, parts in enumerate(out):
            if self.level == "clip":
                w = np.array([float(v) for _, v in parts])
                z = (np.stack([lg for lg, _ in parts]) * w[:, None]).sum(0) / max(w.sum(), 1.0)
                posteriors.append(_activate(z, self.softmax))
            else:
                z = np.concatenate([lg[v] for lg, v in parts])
                steps = td.specs[i].shape[1] // self.patch
                posteriors.append(_activate(z[:steps], False))
        return posteriors

    def score(self, td: TaskData, posteriors) -> tuple[dict, dict]:
        if self.level == "clip":
            return clip_metrics(np.stack(td.targets), np.stack(posteriors), self.task, td.data.classes)
        step_s = self.patch * feature_sets.get(td.data.features).hop_length
        step_s /= feature_sets.get(td.data.features).sample_rate
        return sed_metrics(td.data, posteriors, step_s, median_steps(self.opts.median_s, step_s))

    def selection_score(self, td: TaskData, posteriors) -> float:
        if self.task == "clip_single":
            y = np.stack(td.targets)
            return float((np.stack(posteriors).argmax(1) == y.argmax(1)).mean())
        if self.level == "clip":
            m = mean_ap(np.stack(td.targets), np.stack(posteriors))[0]
        else:
            m = mean_ap(np.concatenate(td.targets), np.concatenate(posteriors))[0]
        return -1.0 if math.isnan(m) else m

    def initial_state(self, train: TaskData | None = None, examples: int = 0) -> FitState:
        """The state before the first step: the model's parameters, a fresh optimizer state (:meth:`_build`
        first), the best epoch's parameters the current ones; with the memory partner an empty
        :class:`MixupBank` of ``min(--mixup_memory, examples)`` slots (``examples``: the run's training
        examples; a memory that never fills needs no more) shaped by ``train``."""
        host = (_pure(self.params), _pure(self.rest))
        st = FitState(self.params, self.rest, self.tx.init(self.params), host)
        if self.memory and train is not None:
            size = max(1, min(self.opts.mixup_memory, examples))
            f, k = train.specs[0].shape[0], len(train.data.classes)
            st.mixup = MixupBank.empty(size, f, self.frames, k)
        return st

    def fit(self, train: TaskData, val: TaskData, log=print, bar=None, ckpt=None) -> dict | None:
        """Trains ``opts.epochs`` epochs, validating after each, and leaves the best epoch's parameters in the
        model; returns the selection record (best epoch, its score, the per-epoch history).

        ``ckpt`` (optional; the command passes its per-model checkpoints) provides ``restore(state)`` (the
        newest saved state, or ``state`` itself), ``save(state)``, ``should_stop()`` and ``stepped(state)``:
        the run continues from where a previous one stopped, saves after every epoch, and on a stop request
        saves at the next step boundary and returns None."""
        n = len(train.specs)
        batch = min(self.opts.batch, n)
        per_epoch = max(1, n // batch)
        self._build(per_epoch * self.opts.epochs, int(round(self.opts.warmup_epochs * per_epoch)))
        st = self.initial_state(train, per_epoch * batch * self.opts.epochs)
        if ckpt is not None:
            st = ckpt.restore(st)
        t0, before = time.perf_counter(), st.seconds
        if bar is not None and st.epoch:
            bar.update(st.epoch)
        while st.epoch < self.opts.epochs:
            if not self._train_epoch(
                st, train, batch, per_epoch, ckpt, lambda: before + time.perf_counter() - t0
            ):
                return None
            self._end_epoch(st, val, bar)
            if ckpt is not None:
                st.seconds = before + time.perf_counter() - t0
                ckpt.save(st)
                if ckpt.should_stop():
                    return None
        self.fit_seconds = before + time.perf_counter() - t0
        nnx.replace_by_pure_dict(self.params, st.best[0])
        nnx.replace_by_pure_dict(self.rest, st.best[1])
        nnx.update(self.model, self.params, self.rest)
        return {"epoch": st.best_epoch, "val_score": st.best_score, "history": st.history}

    def _train_epoch(self, st: FitState, train: TaskData, batch: int, per_epoch: int, ckpt, clock) -> bool:
        """The rest of epoch ``st.epoch`` from step ``st.batch``; False when it stopped (saved) on request.

        The epoch's order and each step's crops, memory-mixup draws and key come from ``(seed, epoch[,
        step])`` alone, and the mixup memory is part of the saved state, so a run resumed at any step draws
        what the uninterrupted run drew."""
        seed = self.opts.seed
        order = np.random.default_rng((seed, st.epoch)).permutation(len(train.specs))
        key = jax.random.key(seed)
        t_state = self.t_state if self.teacher is not None else None
        while st.batch < per_epoch:
            if ckpt is not None and ckpt.should_stop():
                st.seconds = clock()
                ckpt.save(st)
                return False
            b = st.batch
            rng = np.random.default_rng((seed, st.epoch, b))
            idx = order[b * batch : (b + 1) * batch]
            spec, length, y = crop_batch(train, idx, self.frames, self.patch, self.level, rng)
            if st.mixup is not None:  # the official memory mixup, before the step (as in the data loader)
                mix_rng = np.random.default_rng((seed, st.epoch, b, MIXUP_STREAM))
                spec, y = st.mixup.mix(mix_rng, spec, length, y, self.opts.mixup)
            st.params, st.rest, st.opt_state, loss, _ = self._step(
                st.params,
                st.rest,
                st.opt_state,
                t_state,
                jnp.asarray(spec),
                jnp.asarray(length),
                jnp.asarray(y),
                jax.random.fold_in(key, st.step),
            )
            st.losses.append(loss)
            st.batch, st.step = b + 1, st.step + 1
            if ckpt is not None:
                ckpt.stepped(st)
        return True

    def _end_epoch(self, st: FitState, val: TaskData, bar) -> None:
        """Validation after an epoch: its history row, the best epoch so far, the next epoch's position."""
        loss = float(np.mean([float(x) for x in st.losses]))
        if not math.isfinite(loss):
            raise FinetuneError(
                f"epoch {st.epoch + 1}: the loss is {loss}; lower --lr (now {self.opts.lr:g})"
            )
        val_score = self.selection_score(val, self.predict(val, st.params, st.rest))
        st.history.append({"epoch": st.epoch + 1, "loss": loss, "val": val_score})
        if st.best_score is None or val_score > st.best_score:
            st.best = (_pure(st.params), _pure(st.rest))
            st.best_score, st.best_epoch = val_score, st.epoch + 1
        st.epoch, st.batch, st.losses = st.epoch + 1, 0, []
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", val=f"{val_score:.4f}")


def _activate(z: np.ndarray, softmax: bool) -> np.ndarray:
    z = np.asarray(z, np.float64)
    if softmax:
        e = np.exp(z - z.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Saving and loading a fine-tuned model
# ----------------------------------------------------------------------------------------------------------


def save_finetuned(model: FinetuneModel, out: Path, meta: dict) -> None:
    from flax import serialization

    out.mkdir(parents=True, exist_ok=True)
    state = _pure(nnx.state(model))
    tmp = out / ".params.msgpack.tmp"
    tmp.write_bytes(serialization.msgpack_serialize(state))
    os.replace(tmp, out / "params.msgpack")
    cfg = dataclasses.asdict(model.encoder.cfg)
    doc = {"format": MODEL_FORMAT, "encoder": cfg, "level": model.level, **meta}
    tmp = out / ".model.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "model.json")


def finetuned_dir(path, what: str = "--teacher") -> Path:
    """The model directory (``model.json`` + ``params.msgpack``) of ``path``: that directory itself, its
    ``model/``, or — the ``--out`` folder of a fine-tuning run — the one ``<model>/model/`` in it. A run
    folder with several models (ATST-C2F's ``clip``, ``frame``, ``frame_distilled``) or none yet (a run
    stopped before its first model finished) is a :class:`FinetuneError` naming what to pass instead."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "model.json").is_file():
            return candidate
    found = sorted(p.parent for p in path.glob("*/model/model.json"))
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(p.parent.name for p in found)
        raise FinetuneError(
            f"{what} {path}: the run holds {len(found)} fine-tuned models ({names}): name one, e.g. "
            f"{what} {found[0].parent}"
        )
    if path.is_dir() and (any(path.glob("*/checkpoints")) or (path / RUN_FILE).is_file()):
        raise FinetuneError(
            f"{what} {path}: the fine-tuning run there has not finished a model yet (run its command again to "
            "finish it)"
        )
    raise FinetuneError(
        f"{what} {path}: not a fine-tuned model directory (no model.json in it, in its model/ or in a "
        "<model>/model/ of a fine-tuning --out folder)"
    )


def load_finetuned(path) -> tuple[FinetuneModel, dict]:
    """``(model, meta)`` from a fine-tuned model: its directory, the model's folder of a fine-tuning run
    (``OUT/<model>``) or the run's ``--out`` folder when it holds one model (:func:`finetuned_dir`)."""
    from flax import serialization

    path = finetuned_dir(path)
    try:
        meta = json.loads((path / "model.json").read_text())
        raw = (path / "params.msgpack").read_bytes()
    except (OSError, ValueError) as e:
        raise FinetuneError(f"--teacher {path}: not a fine-tuned model directory ({e})") from None
    if meta.get("format") != MODEL_FORMAT:
        raise FinetuneError(f"--teacher {path}: unknown format {meta.get('format')!r}")
    # The saved encoder config has drop-path 0; the rate fine-tuning used is in the metadata (drop-path acts
    # only with ``train`` and a key: a train-mode C2F teacher). Models saved without it: the official default.
    rate = float(meta.get("drop_path", EncoderConfig.drop_path))
    cfg = EncoderConfig(**{**meta["encoder"], "drop_path": rate})
    k = len(meta["classes"])
    chunk = meta.get("chunk_frames")
    abstract = nnx.eval_shape(
        lambda: FinetuneModel(
            FrameAST(cfg, rngs=nnx.Rngs(0)), k, meta["level"], rngs=nnx.Rngs(0), chunk_frames=chunk
        )
    )
    graphdef, state = nnx.split(abstract)
    restored = serialization.msgpack_restore(raw)
    if abstract.bn is None and "bn" in restored:
        raise FinetuneError(
            f"--teacher {path}: an SED model with a BatchNorm in its head (an older version of this "
            "command); fine-tune it again"
        )
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))
    return nnx.merge(graphdef, state), meta


# ----------------------------------------------------------------------------------------------------------
# One fine-tuning job
# ----------------------------------------------------------------------------------------------------------


def check_teacher(t_meta: dict, train: LabelledSet, task: str, features: str, level: str, step_s: float):
    """Refuses a ``--teacher`` fine-tuned on another task, feature set or (frame level) time grid."""
    if t_meta["classes"] != list(train.classes) or t_meta["task"] != task:
        raise FinetuneError(
            f"--teacher was fine-tuned on another task ({t_meta['task']}, {len(t_meta['classes'])} "
            f"classes) than this one ({task}, {len(train.classes)} classes)"
        )
    if t_meta["features"] != features:
        raise FinetuneError(
            f"--teacher takes feature set {t_meta['features']!r}, the student {features!r}: "
            "distillation runs both on the same input"
        )
    if level == "frame" and abs(t_meta["time_step_s"] - step_s) > 1e-9:
        raise FinetuneError(
            f"frame-level distillation needs one time grid: the teacher's steps are "
            f"{t_meta['time_step_s'] * 1000:g} ms, the student's {step_s * 1000:g} ms"
        )


def _crop_frames(opts: FinetuneOptions, chunk_frames: int, patch: int, fs, train: LabelledSet) -> int:
    """The training crop in frames: ``--crop_s`` (default: the chunk), at most the chunk and the longest
    training clip, a whole number of time steps."""
    frames = chunk_frames
    if opts.crop_s:
        frames = max(patch, int(round(opts.crop_s * fs.sample_rate / fs.hop_length)) // patch * patch)
        frames = min(frames, chunk_frames // patch * patch)
    longest = max(m.shape[1] for m in train.mels) // patch * patch
    return max(patch, min(frames, longest)) // patch * patch


def finetune(
    encoder: FrameAST,
    chunk_frames: int,
    features: str,
    train: LabelledSet,
    test: LabelledSet,
    val: LabelledSet | None,
    opts: FinetuneOptions,
    out: Path,
    teacher: tuple[FinetuneModel, dict] | None = None,
    source: dict | None = None,
    name: str = "finetuned",
    log=print,
    recipe: dict | None = None,
    ckpt=None,
) -> dict | None:
    """Fine-tunes ``encoder`` (modified in place), saves ``out/model`` and returns its results entry
    (``recipe``: the ``--recipe`` record of the command, kept with the options in both). ``ckpt``: the
    run's checkpoints of this model (:meth:`Finetuner.fit`); None when a stop request ended it early."""
    given = {"--train": train, "--test": test} | ({"--val": val} if val is not None else {})
    check_sets(given, features, encoder.cfg.n_mels)
    task = task_of(list(given.values()), opts.task)
    level = "frame" if task == "sed" else "clip"
    if val is None:
        train, val = hold_out(train, opts.val_fraction)
    patch = inference.time_patch(encoder.cfg)
    fs = feature_sets.get(features)
    step_s = patch * fs.hop_length / fs.sample_rate
    if teacher is not None:
        check_teacher(teacher[1], train, task, features, level, step_s)
    frames = _crop_frames(opts, chunk_frames, patch, fs, train)
    if opts.drop_path is not None:
        encoder.cfg = dataclasses.replace(encoder.cfg, drop_path=opts.drop_path)
    model = FinetuneModel(encoder, len(train.classes), level, rngs=nnx.Rngs(params=opts.seed))
    tuner = Finetuner(model, task, frames, opts, teacher=teacher[0] if teacher is not None else None)
    splits = {
        s: task_data(d, level, step_s, patch) for s, d in (("train", train), ("val", val), ("test", test))
    }
    steps = max(1, len(train) // min(opts.batch, len(train)))
    log(
        f"{name}: {task}, {len(train.classes)} classes; train {len(train)} / val {len(val)} / test "
        f"{len(test)} clips; crops of {frames} frames; {opts.epochs} epochs of {steps} steps"
        + (f"; distilled (λ = {opts.distill_lambda:g})" if teacher is not None else "")
    )
    with _bar_factory(opts.progress)(opts.epochs, f"{name}: fine-tune", "epoch") as bar:
        selection = tuner.fit(splits["train"], splits["val"], log=log, bar=bar, ckpt=ckpt)
    if selection is None:
        return None
    meta = {
        "task": task,
        "classes": list(train.classes),
        "features": features,
        "chunk_frames": frames,
        "time_step_s": step_s,
        "drop_path": encoder.cfg.drop_path,  # the rate it trained with: its drop-path as a train-mode teacher
        "source": source or {},
        "options": dataclasses.asdict(opts),
        "recipe": recipe,
    }
    return _test_and_save(tuner, splits["test"], selection, meta, out, name, log)


def _test_and_save(
    tuner: Finetuner, test: TaskData, selection: dict, meta: dict, out: Path, name, log
) -> dict:
    """Scores the selected parameters on the test split, saves ``out/model``; the results entry."""
    t0 = time.perf_counter()
    metrics, per = tuner.score(test, tuner.predict(test))
    seconds = round(tuner.fit_seconds + time.perf_counter() - t0, 2)
    model = tuner.model
    model.chunk_frames = meta["chunk_frames"]
    model.encoder.cfg = dataclasses.replace(model.encoder.cfg, drop_path=0.0)
    save_finetuned(model, out / "model", meta)
    shown = ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())
    log(f"{name}: {shown} (best epoch {selection['epoch']}, {seconds:.1f} s)")
    return {
        "task": meta["task"],
        "metrics": metrics,
        "per_class": per,
        "selection": selection,
        "distilled": tuner.teacher is not None,
        "seconds": seconds,
        "model": str(out / "model"),
        "source": meta["source"],
        "options": meta["options"],
        "recipe": meta["recipe"],
    }
