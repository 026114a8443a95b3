"""Frozen-encoder probes: a linear head on the features of a pretrained encoder, next to two baselines.

    python -m atst_jax.evaluate (--workdir RUN [--step N] [--encoder teacher|student] | --weights FILE) \\
        --train DATA --test DATA [--val DATA] --out RESULTS.json \\
        [--task auto|clip|sed] [--layers N] [--baselines random_init,logmel|none] [--lrs 1e-3,3e-3,1e-2] \\
        [--epochs E] [--batch B] [--median_s 0.28] [--val_fraction 0.2] [--seed 0] [--no_plots] \\
        [--protocol probe|official]

DATA are datasets made by ``python -m atst_jax.data.prepare`` (records + ``labels.json``), in the feature set
the encoder takes (refused otherwise). The task comes from the labels (``--task auto``):

* strong labels (events with onset/offset) in every split → **SED**: one prediction per time step of the
  encoder (a 40 ms token for the ATST frame stem, a 160 ms column of 16 × 16 patches for a 2-D patch ViT:
  the token grid is the encoder's own), targets on that grid (a step is active when the event covers at
  least half of it: onset and offset rounded to the nearest step boundary).
* weak labels → **clip classification**: single-label when every clip has exactly one class (softmax),
  multi-label otherwise (sigmoid). ``--task clip`` also treats strong data this way.

Features (spec §0): the outputs of the last ``--layers`` blocks (default: all), each through the final norm,
concatenated, computed chunk by chunk by :class:`atst_jax.eval.embed.Embedder` from the stored spectrograms. Clip
tasks take the clip's scene embedding: the mean over its valid tokens (ATST-Frame), ``[CLS ‖ mean]`` for
encoders with a CLS token (ATST-Clip, ASiT) — the same vector ``embed --level clip`` writes. SED takes the
per-step embeddings.

Encoders, each with its own linear probe trained the same way:

* ``checkpoint`` — the run's teacher (or ``--encoder student``) or the ``--weights`` file;
* ``random_init`` — the same ``EncoderConfig`` freshly initialised (``nnx.Rngs(params=--seed)``), same features;
* ``logmel`` — pooled statistics of the normalised spectrogram: mean and standard deviation over the clip's
  valid frames (clips, ``2·F`` dims), or over each time step's frames (SED, ``2·F`` per step).

Probe: BatchNorm without affine (batch statistics while training, running statistics, momentum 0.9, at test)
then Linear, trained with Adam (cosine decay, no weight decay) on the softmax cross-entropy (single-label) or
the binary cross-entropy (multi-label, SED), jitted, the batch sharded over all devices (``data`` axis of
``atst_jax.sharding.make_mesh``; features replicated). For every learning rate of ``--lrs`` the probe trains
``--epochs`` epochs and is evaluated on the validation split every ``--eval_every`` epochs; the state with the
best validation score over all learning rates and evaluations is kept (accuracy for single-label, mAP for
multi-label, frame-level mAP for SED). Without ``--val``, ``--val_fraction`` of the training clips are held
out: those whose SHA-1 of the id is smallest (deterministic, independent of the record order). Everything is
seeded (``--seed``): the same command gives the same numbers.

``--protocol official``: the official ATST linear evaluation instead of the probe above (audiossl,
``methods/atst/downstream/train_freeze.py`` and ``model.py`` ``LinearClassifierPLModule``, the same in
``methods/atstframe/downstream``; batch and learning rates from their ``shell/downtream/freeze`` scripts).
Every split is centre-cropped to 12 s (``FreezingTransform``: ``CentralCrop(pad=False)``, shorter clips kept
whole) and the clip vector is the equal-weight mean of the per-chunk ``[CLS ‖ mean]`` (or mean) vectors, a
chunk after the first counting only when it holds more than half a chunk (``get_intermediate_layers_chunks``;
features, not logits, are averaged; train, validation and test alike). The chunks are the official ones:
every ``seconds · 100 + 1`` frames (601 for a 600-frame encoder chunk), each encoded on its own, so each
drops its last frame and has its own token grid and CLS (:func:`official_chunk_frames`). The head is BatchNorm without affine
(running statistics from 0 / 1) then Linear (N(0, 0.01²) weights), CE or BCE, trained by SGD (momentum 0.9,
no weight decay, no warm-up) at ``lr × batch / 256``, batch 1024 (a smaller last batch), 100 epochs, the LR
following ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped per epoch; validated every epoch, the best
validation accuracy / mAP kept. The official scripts run one LR each (spcv2, us8k 2e-3; nsynth 2.5e-4 to
1e-3; voxceleb1 2e-2 to 1e-1; audioset, fsd50k 0.1 to 4): their values are the default sweep, selected on
validation here. ``cal_norm.py`` only saves training-set feature statistics to files the linear evaluation
never reads: the BatchNorm is the normalisation. SED follows the frame code's frozen mode (``train_as_strong.py
--freeze_mode``, ``utils_as_strong/model_as_strong.py``): 10 s centre crop (events moved with it), the last
block only, a linear head without BatchNorm, BCE, SGD momentum 0.9, LR 1e-3 / 1e-2 / 1e-1 (no batch scaling)
warmed up linearly over 5 epochs then cosine-decayed to 1e-6 per step, gradients clipped to norm 3, selected
on the lowest validation loss with early stopping after 10 epochs without one. Still differing: features
come from the stored spectrograms, floored per clip (the official computes the log-mel of the 12 s crop, its
dB floor per crop: the same for every clip of at most 12 s), the crop is in frames, not samples; SED
batches are time steps (not whole clips) and its metrics are this module's (``sed_scores_eval``, median
``--median_s``: 7 steps by default, as the official) where the official decodes 50 thresholds.

Metrics on the test split:

* clips: accuracy (single-label: argmax; multi-label: every label right at threshold 0.5) and mAP (macro
  average precision over the classes with a positive test clip), per-class AP;
* SED, on the posteriors after a median filter of ``--median_s`` seconds (rounded to an odd number of steps,
  at least 1): frame-level macro F1 at 0.5 (per step, classes with positives), PSDS1 (dtc = gtc = 0.7,
  α_ct = 0) and PSDS2 (dtc = gtc = 0.1, cttc = 0.3, α_ct = 0.5), both with α_st = 1 and e_max = 100 false
  positives per hour as in DCASE, from the posterior curves with ``sed_scores_eval``
  (``intersection_based.psds``), and the collar-based event F1 (``collar_based.fscore``: threshold 0.5,
  200 ms onset collar, offset collar max(200 ms, 20 % of the event), macro over classes), per-class frame and
  event F1. Ground-truth events are the records' own (seconds), cut at the end of the last step.

Pictures (unless ``--no_plots``), next to ``RESULTS.json`` as ``RESULTS_per_class.png`` (per class, the
score of every encoder side by side: AP for clips, frame-level AP for SED) and, for SED, ``RESULTS_sed.png``
(the three test clips with the most events: the ground truth as a piano roll above each encoder's
posteriors, on one 0 → 1 colour scale).

``RESULTS.json``: the task, class names, split sizes, the options, and per encoder its metrics, per-class
numbers, feature size and the selected learning rate / epoch / validation score; the table of metrics (pretrained
next to the baselines) is also printed. It is written as results are earned: at the start, after each encoder
(``"complete": false``, the encoders to come in ``"pending"``), whole before the pictures, and finally with
them (``"complete": true``). A metric that fails is None with its error under the encoder's ``"errors"``, a
picture that fails an entry of the top-level ``"errors"`` (both also printed as warnings): neither costs the
other results. Bad inputs (missing paths, a dataset without labels, another feature set than the encoder's,
train/test vocabularies that differ, an empty, truncated or damaged weights file, non-finite weights) stop
before any work with one line (exit 2), as do non-finite embeddings when they appear; Ctrl-C exits 130 with
one line saying which encoders' results the file holds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from atst_jax import features as feature_sets
from atst_jax import inference
from atst_jax.eval.data import (
    EvalError,
    LabelledSet,
    check_sets,
    clip_targets,
    frame_targets,
    hold_out,
    read_labelled,
    task_of,
)
from atst_jax.eval.metrics import (
    COLLAR,
    MAX_EFPR,
    PSDS1,
    PSDS2,
    Guard,
    clip_metrics,
    import_sed_scores_eval,
    mean_ap,
    median_steps,
    sed_metrics,
    write_score_tables,
)
from atst_jax.eval.report import error_lines, fmt, table, write_plots, write_results

BASELINES = ("random_init", "logmel")
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # running = m · running + (1 − m) · batch (PyTorch's momentum 0.1)


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Features:
    """Per clip: the clip vector (``[C]``) or the per-step vectors (``[T, C]``)."""

    clips: list[np.ndarray]
    dims: int


def _normalised(mel: np.ndarray, fs) -> np.ndarray:
    return np.asarray(fs.normalize(mel.astype(np.float32)), np.float32)


def encoder_features(
    embedder,
    data: LabelledSet,
    level: str,
    batch_chunks: int,
    bar=None,
    official: bool = False,
    name: str = "encoder",
) -> Features:
    """Clip (``level="clip"``: scene embeddings) or per-step (``"frame"``) features of every clip;
    ``official``: clip vectors by the official chunk averaging (:func:`official_scene`). Non-finite
    embeddings are an ``EvalError`` naming encoder ``name`` and the clip: a probe could not learn from them,
    and downstream they only surfaced as a missing example or an index error."""
    fs = feature_sets.get(data.features)
    out: list[np.ndarray] = []
    group: list[np.ndarray] = []
    chunks = 0

    def check(*arrays):
        if not all(np.isfinite(a).all() for a in arrays):
            clip = data.ids[len(out)]
            raise EvalError(
                f"{name}: non-finite (NaN/inf) embeddings for clip {clip} of {data.path}: the encoder's "
                "weights hold non-finite values or overflow float32"
            )

    def flush():
        if official and level == "clip":
            chunk_len = official_chunk_frames(embedder.front.feature_set, embedder.chunk_frames)
            for vectors, frames, arrays in _official_clip_vectors(embedder, group, chunk_len):
                check(*arrays)
                out.append(official_scene(vectors, frames, chunk_len))
        else:
            for tokens, scene in embedder.spec_features(group):
                check(tokens, *([scene] if level == "clip" and len(tokens) else []))
                out.append(scene if level == "clip" else tokens)
        if bar is not None:
            bar.update(len(group))
        group.clear()

    for mel in data.mels:
        n = len(inference.chunk_bounds(mel.shape[1], embedder.chunk_frames, embedder.patch_w))
        if group and chunks + n > batch_chunks:
            flush()
            chunks = 0
        group.append(_normalised(mel, fs))
        chunks += n
    if group:
        flush()
    dims = embedder.scene_embedding_size if level == "clip" else embedder.embedding_size
    return Features(out, dims)


def logmel_features(data: LabelledSet, level: str, patch: int, bar=None) -> Features:
    """Mean and standard deviation of the normalised spectrogram over the clip's frames (``clip``: ``[2F]``)
    or over each time step's ``patch`` frames (``frame``: ``[frames // patch, 2F]``)."""
    fs = feature_sets.get(data.features)
    out = []
    for mel in data.mels:
        x = _normalised(mel, fs)  # [F, T]
        if level == "clip":
            out.append(np.concatenate([x.mean(axis=1), x.std(axis=1)]))
        else:
            steps = x.shape[1] // patch
            blocks = x[:, : steps * patch].reshape(x.shape[0], steps, patch)
            out.append(np.concatenate([blocks.mean(axis=2), blocks.std(axis=2)], axis=0).T.copy())
        if bar is not None:
            bar.update(1)
    return Features(out, 2 * fs.n_mels)


# ----------------------------------------------------------------------------------------------------------
# Linear probe (BatchNorm without affine + Linear), in JAX
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    """A trained probe: ``predict(x)`` → class posteriors (softmax or sigmoid)."""

    kernel: np.ndarray  # [C, K]
    bias: np.ndarray  # [K]
    mean: np.ndarray  # BatchNorm running statistics [C]
    var: np.ndarray
    softmax: bool
    selection: dict
    norm: bool = True  # False: no BatchNorm in front (the official frame-level head)

    def _params(self):
        return {"kernel": self.kernel, "bias": self.bias}, {"mean": self.mean, "var": self.var}

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, self.kernel.shape[1]), np.float32)
        return np.asarray(_predict(*self._params(), jnp.asarray(x, jnp.float32), self.softmax, self.norm))


def _normalize(x, mean, var):
    return (x - mean) * jax.lax.rsqrt(var + BN_EPS)


@functools.partial(jax.jit, static_argnames=("softmax", "norm"))
def _predict(p, bn, x, softmax: bool, norm: bool = True):
    z = (_normalize(x, bn["mean"], bn["var"]) if norm else x) @ p["kernel"] + p["bias"]
    return jax.nn.softmax(z, axis=-1) if softmax else jax.nn.sigmoid(z)


def _loss(p, x, y, softmax: bool):
    """Loss on a batch with batch statistics (BatchNorm in training mode); also returns them."""
    mean = x.mean(axis=0)
    var = x.var(axis=0)
    z = _normalize(x, mean, var) @ p["kernel"] + p["bias"]
    if softmax:
        loss = optax.softmax_cross_entropy(z, y).mean()
    else:
        loss = optax.sigmoid_binary_cross_entropy(z, y).mean()
    return loss, (mean, var)


def _make_epoch(n: int, batch: int, steps_total: int, softmax: bool, mesh):
    """One jitted epoch: a seeded permutation of the n examples (wrapped to whole batches), Adam steps with
    a cosine-decayed learning rate, BatchNorm running statistics; the batch is sharded over the mesh."""
    steps = -(-n // batch)
    adam = optax.scale_by_adam()
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def epoch(state, x, y, key, lr):
        perm = jax.random.permutation(key, n)
        idx = jnp.tile(perm, -(-steps * batch // n))[: steps * batch].reshape(steps, batch)

        def step(state, ids):
            p, bn, opt, t = state
            xb = jax.lax.with_sharding_constraint(x[ids], batch_sharding)
            yb = jax.lax.with_sharding_constraint(y[ids], batch_sharding)
            (loss, (mean, var)), grads = jax.value_and_grad(_loss, has_aux=True)(p, xb, yb, softmax)
            updates, opt = adam.update(grads, opt, p)
            scale = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, steps_total) / steps_total))
            p = jax.tree.map(lambda w, u: w - scale * u, p, updates)
            unbiased = var * batch / max(batch - 1, 1)
            bn = {
                "mean": BN_MOMENTUM * bn["mean"] + (1 - BN_MOMENTUM) * mean,
                "var": BN_MOMENTUM * bn["var"] + (1 - BN_MOMENTUM) * unbiased,
            }
            return (p, bn, opt, t + 1), loss

        state, losses = jax.lax.scan(step, state, idx)
        return state, losses.mean()

    return jax.jit(epoch), adam


def _training_arrays(x, y, mesh):
    """``(x, y)`` as float32 arrays (refused when empty) and the mesh a probe trains on (all devices on
    ``data`` unless one is given)."""
    from atst_jax import sharding

    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.shape[0] == 0:
        raise EvalError("no training examples")
    return x, y, mesh if mesh is not None else sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def train_probe(
    x: np.ndarray,
    y: np.ndarray,
    validate,
    *,
    softmax: bool,
    lrs=(1e-3, 3e-3, 1e-2),
    epochs: int = 100,
    batch: int = 256,
    eval_every: int | None = None,
    seed: int = 0,
    mesh=None,
    bar=None,
) -> Probe:
    """Trains one probe per learning rate on ``x [N, C]`` / ``y [N, K]`` (one-hot for ``softmax``, else
    multi-hot) and returns the state with the best ``validate(probe) -> float`` (higher is better) over all
    learning rates and evaluations (every ``eval_every`` epochs and at the end; ties keep the earlier)."""
    x, y, mesh = _training_arrays(x, y, mesh)
    (n, c), k, ndev = x.shape, y.shape[1], mesh.devices.size
    batch = -(-min(batch, n) // ndev) * ndev  # whole batches on every device (wrapped examples fill it)
    eval_every = eval_every or max(1, epochs // 10)
    steps_total = epochs * -(-n // batch)
    epoch_fn, adam = _make_epoch(n, batch, steps_total, softmax, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    xd, yd = jax.device_put(x, replicated), jax.device_put(y, replicated)
    # Running statistics start at the training set's own (the first batches then need not drag them from 0/1).
    mean0, var0 = x.mean(axis=0), x.var(axis=0)
    best, history = None, []
    for lr in lrs:
        p = {"kernel": jnp.zeros((c, k), jnp.float32), "bias": jnp.zeros((k,), jnp.float32)}
        bn = {"mean": jnp.asarray(mean0), "var": jnp.asarray(var0)}
        state = jax.device_put((p, bn, adam.init(p), jnp.zeros((), jnp.int32)), replicated)
        key = jax.random.key(seed)
        for e in range(1, epochs + 1):
            state, loss = epoch_fn(state, xd, yd, jax.random.fold_in(key, e), jnp.float32(lr))
            if bar is not None:
                bar.update(1)
            if e % eval_every == 0 or e == epochs:
                p_, bn_ = jax.device_get(state[:2])
                probe = Probe(p_["kernel"], p_["bias"], bn_["mean"], bn_["var"], softmax, {})
                score = float(validate(probe))
                history.append({"lr": lr, "epoch": e, "train_loss": float(loss), "val": score})
                if best is None or score > best[0] + 1e-12:
                    best = (score, probe, lr, e)
    score, probe, lr, e = best
    probe.selection = {"lr": lr, "epoch": e, "val": score, "history": history}
    return probe


# ----------------------------------------------------------------------------------------------------------
# The official linear evaluation (``--protocol official``)
# ----------------------------------------------------------------------------------------------------------

PROTOCOLS = ("probe", "official")
PROBE_LRS = (1e-3, 3e-3, 1e-2)
# The learning rates the official freeze scripts sweep, per label kind (base values: x batch / 256 applies).
OFFICIAL_LRS = {
    "clip_single": (2.5e-4, 5e-4, 1e-3, 2e-3, 2e-2, 5e-2, 1e-1),
    "clip_multi": (1e-1, 5e-1, 1.0, 2.0, 4.0),
    "sed": (1e-3, 1e-2, 1e-1),
}
OFFICIAL_CROP_S = {"clip": 12.0, "sed": 10.0}  # FreezingTransform(max_len=12); max_len=10 for frame-level
OFFICIAL_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class OfficialRecipe:
    """How the official code trains its frozen-feature linear head (see the module docstring)."""

    norm: bool  # BatchNorm1d(affine=False) before the linear layer
    lr_batch_scaled: bool  # learning rate x batch / 256
    per_step: bool  # the schedule moves every step (else once per epoch)
    warmup_epochs: int  # linear warm-up from 0 (per step)
    final_lr: float  # the cosine's floor
    clip_norm: float | None  # global gradient-norm clipping
    patience: int | None  # early stopping: epochs without a better validation score


OFFICIAL_CLIP = OfficialRecipe(True, True, False, 0, 0.0, None, None)
OFFICIAL_SED = OfficialRecipe(False, False, True, 5, 1e-6, 3.0, 10)


def official_lr_schedule(lr: float, epochs: int, steps: int, recipe: OfficialRecipe) -> np.ndarray:
    """float64 ``[epochs, steps]``: the learning rate of every step. Per epoch (clips): the closed form of
    ``CosineAnnealingLR(T_max=epochs, eta_min=final_lr)`` stepped once an epoch. Per step (SED): a linear
    warm-up from 0 over ``warmup_epochs`` (at most ``epochs - 1``), then a cosine down to ``final_lr``."""
    if not recipe.per_step:
        e = np.arange(epochs, dtype=np.float64)
        per_epoch = recipe.final_lr + 0.5 * (lr - recipe.final_lr) * (1 + np.cos(np.pi * e / epochs))
        return np.repeat(per_epoch[:, None], steps, axis=1)
    warm = min(recipe.warmup_epochs, epochs - 1) * steps
    iters = np.arange(epochs * steps - warm, dtype=np.float64)
    cosine = recipe.final_lr + 0.5 * (lr - recipe.final_lr) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([np.linspace(0.0, lr, warm), cosine]).reshape(epochs, steps)


def official_batches(n: int, batch: int, ndev: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [steps, B], weights float32 [steps, B])`` of one epoch: a fresh permutation (NumPy,
    seeded by ``(seed, epoch)``) cut into batches of ``batch`` with a smaller last one (``drop_last=False``);
    rows past it (and up to a multiple of ``ndev``) are padding of weight 0."""
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    steps = -(-n // batch)
    width = -(-batch // ndev) * ndev
    ids = np.zeros((steps, width), np.int32)
    w = np.zeros((steps, width), np.float32)
    for s in range(steps):
        part = perm[s * batch : (s + 1) * batch]
        ids[s, : len(part)] = part
        w[s, : len(part)] = 1.0
    return ids, w


def _official_loss(p, x, y, w, softmax: bool, norm: bool):
    """Mean loss over the rows of weight 1; BatchNorm (training mode) over those rows when ``norm``."""
    nb = w.sum()
    mean = (w[:, None] * x).sum(axis=0) / nb
    var = (w[:, None] * (x - mean) ** 2).sum(axis=0) / nb
    if norm:
        x = _normalize(x, mean, var)
    z = x @ p["kernel"] + p["bias"]
    if softmax:
        per_row = optax.softmax_cross_entropy(z, y)
    else:
        per_row = optax.sigmoid_binary_cross_entropy(z, y).mean(axis=-1)
    return (w * per_row).sum() / nb, (mean, var, nb)


def _make_official_epoch(softmax: bool, recipe: OfficialRecipe, mesh):
    """One jitted epoch of SGD with momentum (PyTorch's: ``buf = m·buf + g; w -= lr·buf``, no dampening,
    no weight decay) over given batches and per-step learning rates."""
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def epoch(state, x, y, ids, w, lrs):
        def step(state, inp):
            p, bn, buf = state
            idx, wb, lr = inp
            xb = jax.lax.with_sharding_constraint(x[idx], batch_sharding)
            yb = jax.lax.with_sharding_constraint(y[idx], batch_sharding)
            grad_fn = jax.value_and_grad(_official_loss, has_aux=True)
            (loss, (mean, var, nb)), g = grad_fn(p, xb, yb, wb, softmax, recipe.norm)
            if recipe.clip_norm is not None:
                total = optax.tree.norm(g)
                g = jax.tree.map(lambda t: t * jnp.minimum(1.0, recipe.clip_norm / (total + 1e-6)), g)
            buf = jax.tree.map(lambda b, t: OFFICIAL_MOMENTUM * b + t, buf, g)
            p = jax.tree.map(lambda v, b: v - lr * b, p, buf)
            unbiased = var * nb / jnp.maximum(nb - 1, 1)
            bn = {
                "mean": BN_MOMENTUM * bn["mean"] + (1 - BN_MOMENTUM) * mean,
                "var": BN_MOMENTUM * bn["var"] + (1 - BN_MOMENTUM) * unbiased,
            }
            return (p, bn, buf), loss

        state, losses = jax.lax.scan(step, state, (ids, w, lrs))
        return state, losses.mean()

    return jax.jit(epoch)


def train_official(
    x: np.ndarray,
    y: np.ndarray,
    validate,
    *,
    softmax: bool,
    recipe: OfficialRecipe = OFFICIAL_CLIP,
    lrs=(2e-3,),
    epochs: int = 100,
    batch: int = 1024,
    eval_every: int = 1,
    seed: int = 0,
    mesh=None,
    bar=None,
) -> Probe:
    """The official linear head on ``x [N, C]`` / ``y [N, K]``: weights N(0, 0.01²) and zero bias (seeded),
    BatchNorm without affine in front when ``recipe.norm`` (running statistics from 0 / 1, PyTorch momentum
    0.1), SGD with momentum 0.9 on the schedule of :func:`official_lr_schedule`, shuffled batches with a
    smaller last one. One run per base learning rate of ``lrs`` (x batch / 256 when
    ``recipe.lr_batch_scaled``); the state with the best ``validate(probe)`` (higher is better) over all
    runs and evaluations is kept, a run stopping after ``recipe.patience`` evaluations without a better
    score."""
    x, y, mesh = _training_arrays(x, y, mesh)
    (n, c), k, ndev = x.shape, y.shape[1], mesh.devices.size
    batch = min(batch, n)
    steps = -(-n // batch)
    epoch_fn = _make_official_epoch(softmax, recipe, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    xd, yd = jax.device_put(x, replicated), jax.device_put(y, replicated)
    best, history = None, []
    for base_lr in lrs:
        lr = base_lr * batch / 256 if recipe.lr_batch_scaled else base_lr
        schedule = official_lr_schedule(lr, epochs, steps, recipe).astype(np.float32)
        kernel = np.random.default_rng(seed).normal(0.0, 0.01, (c, k)).astype(np.float32)
        p = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros((k,), jnp.float32)}
        bn = {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}
        state = jax.device_put((p, bn, jax.tree.map(jnp.zeros_like, p)), replicated)
        run_best, stale = -math.inf, 0
        for e in range(1, epochs + 1):
            ids, w = official_batches(n, batch, ndev, seed, e)
            state, loss = epoch_fn(state, xd, yd, ids, w, schedule[e - 1])
            if bar is not None:
                bar.update(1)
            if e % eval_every and e != epochs:
                continue
            p_, bn_ = jax.device_get(state[:2])
            probe = Probe(p_["kernel"], p_["bias"], bn_["mean"], bn_["var"], softmax, {}, recipe.norm)
            score = float(validate(probe))
            history.append({"lr": base_lr, "epoch": e, "train_loss": float(loss), "val": score})
            if best is None or score > best[0] + 1e-12:
                best = (score, probe, base_lr, lr, e)
            if score > run_best + 1e-12:
                run_best, stale = score, 0
            else:
                stale += 1
                if recipe.patience is not None and stale >= recipe.patience:
                    if bar is not None:
                        bar.update(epochs - e)
                    break
    score, probe, base_lr, lr, e = best
    probe.selection = {"lr": base_lr, "effective_lr": lr, "epoch": e, "val": score, "history": history}
    return probe


def centre_crop(mel: np.ndarray, frames: int) -> tuple[np.ndarray, int]:
    """``(the centre frames of mel [F, T], first frame kept)``; a clip no longer than ``frames`` is kept whole
    (the official ``CentralCrop(pad=False)``)."""
    t = mel.shape[-1]
    if t <= frames:
        return mel, 0
    start = (t - frames) // 2
    return mel[..., start : start + frames], start


def crop_set(data: LabelledSet, seconds: float) -> LabelledSet:
    """Every clip centre-cropped to ``seconds`` of its feature set's frames; events moved with the crop
    (clipped to it, dropped if outside)."""
    fs = feature_sets.get(data.features)
    frames = fs.num_frames(int(round(seconds * fs.sample_rate)))
    hop_s = fs.hop_length / fs.sample_rate
    mels, events = [], [] if data.events is not None else None
    for i, mel in enumerate(data.mels):
        cropped, start = centre_crop(mel, frames)
        mels.append(cropped)
        if events is not None:
            ev = np.asarray(data.events[i], np.float32).reshape(-1, 3).copy()
            end = cropped.shape[-1] * hop_s
            ev[:, :2] = np.clip(ev[:, :2] - start * hop_s, 0.0, end)
            events.append(ev[ev[:, 1] > ev[:, 0]])
    return dataclasses.replace(data, mels=mels, events=events)


def official_chunk_frames(fs, chunk_frames: int) -> int:
    """The length of the official evaluation's chunks for an encoder of ``chunk_frames``: its chunk's duration
    counted as the official transform counts frames (``samples // hop + 1``: 600 → 601, 1000 → 1001), so the
    chunks start every 601 frames and each drops its last frame, as the official patch embedding does. Kaldi
    sets (no official ATST counterpart) keep the encoder's own chunk."""
    return chunk_frames if fs.window_length else fs.num_frames(chunk_frames * fs.hop_length)


def official_pieces(frames: int, chunk_len: int) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` of the official evaluation's chunks of a clip: every ``chunk_len`` frames from
    frame 0, the last one shorter."""
    return [(s, min(s + chunk_len, frames)) for s in range(0, frames, chunk_len)]


def official_scene(vectors, piece_frames, chunk_len: int) -> np.ndarray:
    """The official chunk averaging of one clip: ``vectors`` per chunk (mean of its tokens, ``[CLS ‖ mean]``
    with a CLS; None for a chunk with no whole patch) averaged with equal weights over the chunks kept: the
    first always, a later one only when it holds more than half a chunk (``piece_frames`` > ``chunk_len // 2``).
    NaN when no chunk has a vector."""
    kept = [
        v
        for j, (v, n) in enumerate(zip(vectors, piece_frames, strict=True))
        if v is not None and (j == 0 or n > chunk_len // 2)
    ]
    if not kept:
        size = next((len(v) for v in vectors if v is not None), 0)
        return np.full((size,), np.nan, np.float32)
    return np.mean(kept, axis=0).astype(np.float32)


def _official_clip_vectors(embedder, specs, chunk_len: int) -> list[tuple[list, list[int], list[np.ndarray]]]:
    """Per clip: (per official chunk of ``chunk_len`` frames its vector or None, its frames, the arrays to check
    for non-finite values). Each chunk is encoded on its own, as the official code does (its own token grid and
    CLS)."""
    pieces, owners = [], []
    for i, spec in enumerate(specs):
        for s, e in official_pieces(spec.shape[1], chunk_len):
            pieces.append(spec[:, s:e])
            owners.append(i)
    clips = [([], [], []) for _ in specs]
    for owner, piece, (tokens, cls, _) in zip(owners, pieces, embedder.chunk_outputs(pieces), strict=True):
        vectors, frames, arrays = clips[owner]
        frames.append(piece.shape[1])
        if not len(tokens):
            vectors.append(None)
            continue
        mean = tokens.mean(axis=0)
        # A piece spans one encoder chunk (at most ``patch_w − 1`` frames more, dropped): its CLS is row 0.
        vectors.append(mean if cls is None else np.concatenate([cls[0], mean]))
        arrays += [tokens, *([] if cls is None else [cls])]
    return clips


# ----------------------------------------------------------------------------------------------------------
# One encoder: features → probe → metrics
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    task: str = "auto"
    layers: int | None = None  # default: all blocks (official SED: the last one)
    lrs: tuple | None = None  # default: PROBE_LRS, or OFFICIAL_LRS of the task
    epochs: int | None = None  # default: 100 for clips, 20 for SED (official: 100)
    batch: int | None = None  # default: 256 clips / 4096 time steps (official: 1024 clips)
    eval_every: int | None = None
    median_s: float = 0.28
    val_fraction: float = 0.2
    seed: int = 0
    batch_chunks: int = 32
    progress: bool = True
    protocol: str = "probe"  # or "official" (module docstring)
    scores_dir: str | None = (
        None  # SED: DCASE task 4 score tables of each encoder (metrics.write_score_tables)
    )


def _stack(feats: Features, targets: list[np.ndarray] | np.ndarray, level: str):
    if level == "clip":
        return np.stack(feats.clips).astype(np.float32), np.asarray(targets, np.float32)
    x = (
        np.concatenate(feats.clips).astype(np.float32)
        if feats.clips
        else np.zeros((0, feats.dims), np.float32)
    )
    return x, np.concatenate(targets)


def _test_metrics(name, probe, feats, test, level: str, task: str, step_s: float, opts: Options):
    """``(metrics, per-class, errors, posteriors)`` of a trained probe on the test split (posteriors: SED's
    per-clip ``[T, K]``, else None); with ``opts.scores_dir``, SED's DCASE score tables too."""
    posteriors = None
    errors: dict = {}  # metric -> why it is None (metrics.Guard)
    if level == "clip":
        p_test = probe.predict(np.nan_to_num(np.stack(feats.clips).astype(np.float32)))
        metrics, per = clip_metrics(clip_targets(test), p_test, task, test.classes, errors)
        return metrics, per, errors, None
    posteriors = [probe.predict(f) for f in feats.clips]
    median = median_steps(opts.median_s, step_s)
    metrics, per = sed_metrics(test, posteriors, step_s, median, errors)
    if opts.scores_dir is not None:  # an error entry beside the metrics if it fails, never their loss
        Guard(errors)(
            "score_tables",
            lambda: write_score_tables(opts.scores_dir, name, test, posteriors, step_s, median),
        )
    return metrics, per, errors, posteriors


def probe_encoder(
    name: str, extract, splits: dict, task: str, step_s: float, opts: Options, mesh, bar_factory
):
    """Features of every split (``extract(data, level, bar) -> Features``), a probe selected on validation, and
    the test metrics of one encoder."""
    level = "frame" if task == "sed" else "clip"
    feats = {}
    total = sum(len(d) for d in splits.values())
    with bar_factory(total, f"{name}: features", "clip") as bar:
        for split, data in splits.items():
            feats[split] = extract(data, level, bar)
    k = len(splits["train"].classes)

    def targets(split):
        data = splits[split]
        if level == "clip":
            return clip_targets(data)
        return [
            frame_targets(ev, len(f), step_s, k)
            for ev, f in zip(data.events, feats[split].clips, strict=True)
        ]

    x_train, y_train = _stack(feats["train"], targets("train"), level)
    x_val, y_val = _stack(feats["val"], targets("val"), level)
    x_val = np.nan_to_num(x_val)
    if level == "clip":
        bad = ~np.isfinite(x_train).all(axis=1)
        if bad.any():  # clips shorter than one time step have no embedding
            x_train, y_train = x_train[~bad], y_train[~bad]
    softmax = task == "clip_single"

    official = opts.protocol == "official"

    def validate(probe):
        p = probe.predict(x_val)
        if official and task == "sed":  # the official frame-level head is selected on the validation loss
            q = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
            return float(np.mean(y_val * np.log(q) + (1 - y_val) * np.log1p(-q))) if len(q) else -math.inf
        if task == "clip_single":
            return float((p.argmax(1) == y_val.argmax(1)).mean())
        m = mean_ap(y_val, p)[0]
        return -1.0 if math.isnan(m) else m

    train = train_official if official else train_probe
    extra = {"recipe": OFFICIAL_SED if task == "sed" else OFFICIAL_CLIP} if official else {}
    with bar_factory(opts.epochs * len(opts.lrs), f"{name}: probe", "epoch") as bar:
        probe = train(
            x_train,
            y_train,
            validate,
            softmax=softmax,
            lrs=opts.lrs,
            epochs=opts.epochs,
            batch=opts.batch,
            eval_every=opts.eval_every,
            seed=opts.seed,
            mesh=mesh,
            bar=bar,
            **extra,
        )
    metrics, per, errors, posteriors = _test_metrics(
        name, probe, feats["test"], splits["test"], level, task, step_s, opts
    )
    return {
        "test_posteriors": posteriors if level == "frame" else None,
        "metrics": metrics,
        "errors": errors,
        "per_class": per,
        "feature_dims": int(x_train.shape[1]),
        "train_examples": int(x_train.shape[0]),
        "selection": dict(probe.selection),
    }


# ----------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------


def _bar_factory(enabled: bool):
    import contextlib

    @contextlib.contextmanager
    def make(total, desc, unit):
        if not enabled:
            yield None
            return
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr)
        try:
            yield bar
        finally:
            bar.close()

    return make


def load_encoder(workdir=None, step=None, weights=None, encoder="teacher"):
    """``(FrameAST, chunk_frames, features, source dict)`` from a run or an export/official file."""
    if workdir is not None:
        from atst_jax.eval.embed import read_run_encoder, run_inference_inputs

        enc, step, config = read_run_encoder(workdir, step, encoder)
        chunk, feats = run_inference_inputs(workdir, step, enc.cfg, config)
        return enc, chunk, feats, {"workdir": str(workdir), "step": int(step), "encoder": encoder}
    from atst_jax.eval.embed import read_weights_file

    enc, f = read_weights_file(weights, encoder)
    return enc, f.chunk_frames, f.features, {"weights": str(weights), "encoder": encoder}


def random_encoder(cfg, seed: int):
    """The same architecture at a fixed random initialisation (inference config: float32, no drop-path)."""
    from flax import nnx

    from atst_jax.models.encoder import FrameAST

    # Under jit: eagerly, each of the initialisers' ops would compile on its own (seconds on a CPU).
    return nnx.jit(lambda: FrameAST(cfg, rngs=nnx.Rngs(params=seed)))()


def _resolved_options(opts: Options, task: str) -> Options:
    """``opts`` with every default filled in for ``task`` and the protocol (module docstring)."""
    sed = task == "sed"
    official = opts.protocol == "official"
    if opts.protocol not in PROTOCOLS:
        raise EvalError(f"--protocol {opts.protocol!r}: choose from {', '.join(PROTOCOLS)}")
    epochs = opts.epochs or (100 if official or not sed else 20)
    return dataclasses.replace(
        opts,
        layers=opts.layers or (1 if official and sed else None),
        lrs=tuple(opts.lrs or (OFFICIAL_LRS[task] if official else PROBE_LRS)),
        epochs=epochs,
        batch=opts.batch or (4096 if sed else 1024 if official else 256),
        eval_every=opts.eval_every or (1 if official else max(1, epochs // 10)),
    )


def _extractors(encoder, emb, embedder_of, baselines, opts: Options, patch: int) -> dict:
    """Per encoder name, ``extract(data, level, bar)`` → its :class:`Features`: the checkpoint's, then the
    baselines asked for."""
    official = opts.protocol == "official"
    extractors = {
        "checkpoint": lambda d, lvl, bar: encoder_features(
            emb, d, lvl, opts.batch_chunks, bar, official, "checkpoint"
        )
    }
    if "random_init" in baselines:
        rnd = embedder_of(random_encoder(encoder.cfg, opts.seed))
        extractors["random_init"] = lambda d, lvl, bar: encoder_features(
            rnd, d, lvl, opts.batch_chunks, bar, official, "random_init"
        )
    if "logmel" in baselines:
        extractors["logmel"] = lambda d, lvl, bar: logmel_features(d, lvl, patch, bar)
    return extractors


def _probe_all(extractors: dict, splits: dict, task: str, step_s: float, opts: Options, log, earned):
    """``(results, test_posteriors)``: every encoder probed in turn (:func:`probe_encoder`), timed, its
    metrics logged and handed to ``earned(results so far)`` at once (``RESULTS.json`` is written as they
    come: an interruption or a failure later keeps them)."""
    from atst_jax import sharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    bars = _bar_factory(opts.progress)
    results, test_posteriors = {}, {}
    for name, extract in extractors.items():
        t0 = time.perf_counter()
        results[name] = probe_encoder(name, extract, splits, task, step_s, opts, mesh, bars)
        test_posteriors[name] = results[name].pop("test_posteriors")
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        shown = ", ".join(f"{k} {fmt(v)}" for k, v in results[name]["metrics"].items())
        log(f"{name}: {shown} ({results[name]['seconds']:.1f} s)")
        earned(results)
    return results, test_posteriors


def _results(task, splits, features, source, opts: Options, emb, step_s, chunk_frames, cfg, results) -> dict:
    """The RESULTS dict (module docstring) but its ``"plots"``; ``complete`` False (:func:`evaluate` sets it
    once everything is done)."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    return {
        "complete": False,
        "task": task,
        "classes": list(train.classes),
        "source": source or {},
        "data": {
            "features": features,
            "train": {"path": train.path, "clips": len(train), "fingerprint": train.fingerprint},
            "val": {"path": val.path, "clips": len(val), "fingerprint": val.fingerprint},
            "test": {"path": test.path, "clips": len(test), "fingerprint": test.fingerprint},
        },
        "config": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()},
            "layers": emb.n_blocks,
            "time_step_s": step_s if task == "sed" else None,
            "median_steps": median_steps(opts.median_s, step_s) if task == "sed" else None,
            "chunk_frames": chunk_frames,
            "encoder": {"width": cfg.width, "depth": cfg.depth, "stem": cfg.stem, "use_cls": cfg.use_cls},
            "psds1": {**PSDS1, "max_efpr": MAX_EFPR},
            "psds2": {**PSDS2, "max_efpr": MAX_EFPR},
            "collar": COLLAR,
        },
        "encoders": results,
        "errors": {},
    }


def check_finite_weights(encoder, what: str) -> None:
    """Refuses (one line, before any work) an encoder with NaN or infinite parameters: its embeddings would
    be NaN and every probe meaningless."""
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))[0]
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)  # noqa: E731
    bad = [name(path) for path, v in flat if not np.isfinite(np.asarray(v)).all()]
    if bad:
        raise EvalError(
            f"{what}: non-finite (NaN/inf) weights in {len(bad)} of {len(flat)} parameter arrays "
            f"(first: {bad[0]}): the encoder cannot be probed"
        )


def _source_text(source: dict | None) -> str:
    source = source or {}
    if "weights" in source:
        return f"--weights {source['weights']}"
    if "workdir" in source:
        return f"{source['workdir']} step {source.get('step')} ({source.get('encoder', 'teacher')})"
    return "the encoder"


def evaluate(
    encoder,
    chunk_frames: int,
    features: str,
    train: LabelledSet,
    test: LabelledSet,
    val: LabelledSet | None = None,
    opts: Options | None = None,
    baselines=BASELINES,
    source: dict | None = None,
    log=print,
    plots: str | Path | None = None,
    out: str | Path | None = None,
) -> dict:
    """The whole evaluation (see the module docstring) → the RESULTS dict. With ``out``, ``RESULTS.json`` is
    written as results are earned: after each encoder (``"complete": false``, the encoders still to come in
    ``"pending"``), then whole before any picture is drawn, then with the pictures (``"complete": true``).
    With ``plots`` (a path prefix), the PNGs ``<plots>_per_class.png`` and, for SED, ``<plots>_sed.png``
    are written (listed under ``"plots"``; one that fails is an entry of ``"errors"``)."""
    from atst_jax.eval.embed import Embedder

    opts = opts or Options()
    given = {"--train": train, "--test": test} | ({"--val": val} if val is not None else {})
    check_sets(given, features, encoder.cfg.n_mels)
    check_finite_weights(encoder, _source_text(source))
    task = task_of(list(given.values()), opts.task)
    opts = _resolved_options(opts, task)
    if task == "sed":  # asked now, not after every probe has trained
        import_sed_scores_eval()
    if val is None:
        train, val = hold_out(train, opts.val_fraction)
    if opts.protocol == "official":  # the same centre crop for every split, as the official transform
        seconds = OFFICIAL_CROP_S["sed" if task == "sed" else "clip"]
        train, val, test = (crop_set(d, seconds) for d in (train, val, test))
    splits = {"train": train, "val": val, "test": test}
    fs = feature_sets.get(features)
    patch = inference.time_patch(encoder.cfg)
    step_s = patch * fs.hop_length / fs.sample_rate

    def embedder_of(enc):
        return Embedder(
            enc, opts.layers, max_chunks=opts.batch_chunks, chunk_frames=chunk_frames, features=features
        )

    emb = embedder_of(encoder)
    _check_memory(splits, task, emb.embedding_size if task == "sed" else emb.scene_embedding_size, patch)
    extractors = _extractors(encoder, emb, embedder_of, baselines, opts, patch)
    log(
        f"task {task}: {len(train.classes)} classes; train {len(train)} / val {len(val)} / test {len(test)} clips"
        + (f"; time steps of {step_s * 1000:g} ms" if task == "sed" else "")
        + f"; encoders {', '.join(extractors)}"
    )

    def results_of(done: dict) -> dict:
        res = _results(task, splits, features, source, opts, emb, step_s, chunk_frames, encoder.cfg, done)
        res["pending"] = [name for name in extractors if name not in done]
        return res

    return _probe_and_write(extractors, splits, task, step_s, opts, log, results_of, out, plots)


def _probe_and_write(extractors, splits, task, step_s, opts, log, results_of, out, plots) -> dict:
    """:func:`evaluate`'s probes, with ``RESULTS.json`` (``out``, if any) written as results are earned:
    from the start (nothing finished yet: the file is this evaluation's), after each encoder, whole before
    any picture, then with the pictures and ``"complete": true``."""

    def write(res: dict) -> None:
        if out is not None:
            write_results(Path(out), res)

    write(results_of({}))
    done, test_posteriors = _probe_all(
        extractors, splits, task, step_s, opts, log, lambda d: write(results_of(d))
    )
    res = results_of(done)
    if plots is not None:
        res["plots"], res["errors"] = write_plots(res, splits["test"], test_posteriors, step_s, plots)
    res["complete"] = True
    write(res)
    return res


def _check_memory(splits, task, dims, patch):
    """Refuses, before extracting anything, features that would not fit in host memory (SED keeps every
    time step of every clip)."""
    import psutil

    steps = sum((m.shape[1] // patch if task == "sed" else 1) for d in splits.values() for m in d.mels)
    need = steps * dims * 4 * 2  # float32, plus the stacked copy
    have = psutil.virtual_memory().available
    if need > 0.8 * have:
        raise EvalError(
            f"the features need ≈ {need / 2**30:.1f} GiB ({steps} vectors × {dims} dims) but "
            f"{have / 2**30:.1f} GiB are free: use fewer blocks (--layers 1)"
        )


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _parser():
    from atst_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m atst_jax.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run directory (its checkpoints/)")
    src.add_argument("--weights", help="an exported/official checkpoint (.safetensors, .ckpt, .pt) instead")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--encoder", default="teacher", choices=("teacher", "student"), help="default: teacher")
    p.add_argument("--train", required=True, help="prepared dataset the probes train on")
    p.add_argument("--test", required=True, help="prepared dataset the metrics come from")
    p.add_argument("--val", default=None, help="prepared validation set (default: held out from --train)")
    p.add_argument("--out", required=True, help="RESULTS.json to write")
    p.add_argument("--task", default="auto", choices=("auto", "clip", "sed"), help="default: from the labels")
    p.add_argument("--layers", type=int, default=None, help="concatenate the last N blocks (default: all)")
    p.add_argument("--baselines", default="random_init,logmel", help="comma-separated, or none")
    p.add_argument(
        "--protocol",
        default="probe",
        choices=PROTOCOLS,
        help="probe (default) or official: the official ATST linear evaluation (module docstring)",
    )
    p.add_argument(
        "--lrs", default=None, help="learning rates to sweep, comma-separated (default: 1e-3,3e-3,1e-2; "
        "official: the official scripts' values of the task, before the x batch/256 scaling)"
    )  # fmt: skip
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="per learning rate (default: 100 clips, 20 SED; official 100)",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="probe batch (default: 256 clips, official 1024; 4096 steps)"
    )
    p.add_argument(
        "--eval_every", type=int, default=None, help="validate every N epochs (default: epochs/10)"
    )
    p.add_argument("--median_s", type=float, default=0.28, help="SED median filter in seconds (0: none)")
    p.add_argument("--val_fraction", type=float, default=0.2, help="held out from --train without --val")
    p.add_argument("--seed", type=int, default=0, help="random init baseline, shuffling")
    p.add_argument("--batch_chunks", type=int, default=32, help="encoder chunks per call")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--no_plots", action="store_true", help="no PNGs next to RESULTS.json")
    p.add_argument(
        "--scores_dir",
        default=None,
        help="SED: write DCASE task 4 score tables (DIR/<encoder>/<clip>.tsv) with ground_truth.tsv and "
        "durations.tsv, for sed_scores_eval / DCASE's own scoring",
    )
    return p


def _options(args) -> tuple[Options, tuple]:
    lrs = None
    if args.lrs is not None:
        try:
            lrs = tuple(float(v) for v in args.lrs.split(",") if v.strip())
        except ValueError:
            raise EvalError(f"--lrs {args.lrs!r}: comma-separated numbers, e.g. 1e-3,1e-2") from None
        if not lrs or any(lr <= 0 for lr in lrs):
            raise EvalError(f"--lrs {args.lrs!r}: give positive learning rates")
    names = tuple(b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none")
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise EvalError(f"--baselines: unknown {unknown[0]!r} (choose from {', '.join(BASELINES)}, or none)")
    for flag in ("epochs", "batch", "eval_every", "batch_chunks", "layers"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise EvalError(f"--{flag} must be positive, got {v}")
    if not 0 < args.val_fraction < 1:
        raise EvalError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.median_s < 0:
        raise EvalError(f"--median_s must be >= 0, got {args.median_s}")
    opts = Options(
        task=args.task,
        layers=args.layers,
        lrs=lrs,
        epochs=args.epochs,
        batch=args.batch,
        eval_every=args.eval_every,
        median_s=args.median_s,
        val_fraction=args.val_fraction,
        seed=args.seed,
        batch_chunks=args.batch_chunks,
        progress=not args.no_progress,
        protocol=args.protocol,
        scores_dir=args.scores_dir,
    )
    return opts, names


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise EvalError(f"--out {out} is a directory: name the RESULTS.json file")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EvalError(f"--out {out}: no such directory {parent}")
    if not os.access(parent, os.W_OK):
        raise EvalError(f"--out {out}: {parent} is not writable")


def main(argv=None) -> int:
    from atst_jax.cli import check_output, fail

    args = _parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only-open warnings
    started = time.time()
    try:
        opts, baselines = _options(args)
        out = Path(args.out)
        _check_out(out)
        for flag in ("train", "test", "val"):
            path = getattr(args, flag)
            if path is not None and not os.path.isdir(path):
                raise EvalError(f"--{flag} {path}: no such directory")
        if args.workdir is not None and not os.path.isdir(args.workdir):
            raise EvalError(f"--workdir {args.workdir}: no such directory")
        if args.weights is not None and not os.path.isfile(args.weights):
            raise EvalError(f"--weights {args.weights}: no such file")
        encoder, chunk, features, source = load_encoder(args.workdir, args.step, args.weights, args.encoder)
        if opts.layers is not None and opts.layers > encoder.cfg.depth:
            raise EvalError(f"--layers {opts.layers}: the encoder has {encoder.cfg.depth} blocks")
        if args.scores_dir is not None:
            check_output(args.scores_dir, "--scores_dir", directory=True)
        train = read_labelled(args.train, "--train")
        test = read_labelled(args.test, "--test")
        if args.scores_dir is not None and test.events is None:
            raise EvalError(f"--scores_dir: {args.test} has no strong labels (onsets and offsets) to score")
        val = read_labelled(args.val, "--val") if args.val else None
        plots = None if args.no_plots else out.with_suffix("")
        results = evaluate(
            encoder, chunk, features, train, test, val, opts, baselines, source, plots=plots, out=out
        )
    except (OSError, ValueError, KeyError) as e:  # EvalError is a ValueError
        return fail(e)
    except KeyboardInterrupt:
        _interrupted(out, started)
    print(table(results))
    for line in error_lines(results):
        print(line, file=sys.stderr)
    print(f"wrote {out}" + "".join(f", {p}" for p in results.get("plots", [])))
    return 0


def _interrupted(out: Path, started: float):
    """Ctrl-C: one line saying what ``out`` holds, exit 130 at once. ``os._exit``: an interrupt lands anywhere,
    an XLA compilation among others, whose threads then crash the interpreter's shutdown (a segmentation
    fault after the message); the results are on disk already (written atomically as they are earned)."""
    what = "no results written"
    try:
        if out.stat().st_mtime >= started:  # not a file of an earlier run
            done = list(json.loads(out.read_text())["encoders"])
            what = f"{out} holds the encoders finished: {', '.join(done) or 'none yet'}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    print(f"interrupted: {what}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)
