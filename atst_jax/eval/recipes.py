"""Per-task fine-tuning presets for ``python -m atst_jax.finetune --recipe NAME``: the values the official
audiossl fine-tuning scripts use for each downstream task, in this command's terms.

**Keyed by (family, task).** The official scripts set different values for the same task depending on what
is fine-tuned, so each task has up to three entries, and a run takes the entry of the model it trains:

- ``clip``: ATST-Clip weights (``audiossl/methods/atst/shell/downtream/finetune/``, and for the frame-level
  tasks the ``clipatst`` runs of ``atstframe/shell/downtream/finetune_dcase|finetune_as_strong/``);
- ``frame``: ATST-Frame weights (``audiossl/methods/atstframe/shell/downtream/finetune/`` and the
  ``frameatst`` runs of ``finetune_dcase`` / ``finetune_as_strong``);
- ``c2f``: the distilled ATST-Frame model of ATST-C2F (``audiossl/methods/atstframe/shell/distill/``, run by
  ``train_distill_other.py``; ``finetune_as_strong/finetune_distill_atst.bash`` for AudioSet-strong).

``finetune`` picks the family per model it trains: a plain run by its encoder (one with a CLS token takes the
``clip`` entry — the ATST-Clip layout —, one without the ``frame`` entry); ``--c2f_clip`` its ``clip/`` run
from ``clip``, ``frame/`` from ``frame`` and ``frame_distilled/`` from ``c2f``; ``--teacher`` the undistilled
run by its encoder and the distilled one from ``c2f``. Flags given on the command line override any preset
value.

**Translating the official numbers.** Their ``learning_rate`` is, as ``--lr`` here, the rate of a batch of
256 (``train_finetune.py`` / ``train_distill_other.py`` multiply it by ``nproc · batch_size_per_gpu / 256``),
so ``lr`` is theirs as written and ``batch`` is ``nproc · batch_size_per_gpu`` of the driver script
(``eval_batch.sh``: 4 × 128 = 512 for all three families; ATST-Clip's README also asks for a global batch of
512, and ATST-Frame's ``eval_env.sh`` gives 1 × 512). The frame-level trainers (``train_dcase.py``,
``train_as_strong.py``) use ``learning_rate`` as the peak rate itself, unscaled, so there ``lr`` is theirs
× 256 / global batch. ``mixup`` is their ``alpha`` where ``mixup_training`` is on and 0 where it is off
(their mixup always comes with the resize-crop, as ``--mixup`` here); ``layer_decay`` their ``layerwise_lr``
/ ``lr_scale`` (0.75 wherever it is on; the Clip code hard-codes 0.75); ``crop_s`` the chunk their encoder
runs in (6 s for ATST-Clip's clip tasks, ``PretrainedEncoderPLModule``'s fixed ``6.``; the 10 s
``anchor_len`` of the released ATST-Frame; 10 s for the C2F student, ``module_distill_other.py``'s chunk
of 1001 frames; ``audio_max_len: 10`` of the frame-level configs); ``median_s`` the SED median filter, in
40 ms steps (7 for AudioSet-strong, 3 for DCASE — ``model_dcase.py`` replaces the config's 7 with 3);
``distill_lambda`` C2F's ``lambda_d`` (0.5 in ``module_distill_other.py``, and the equal halves of
``model_distill_as_strong.py``).

**Sweeps.** Where a script loops over several values, the preset takes the configuration the C2F scripts
load as their fine-tuned ATST-Clip teacher, when that is one of the script's current configurations (its
directory name spells the run's settings: ATST-Clip nsynth ``lr1e-3_mixup_True … alpha0.5``), as the run
the authors built on; otherwise the first value of the loop. Each entry's comment says which.

**Not representable here** (left out; see ``NOT_REPRESENTED``): the 12 s centre crop their clip-level
training runs in chunks (one crop of at most the chunk here); AudioSet-2M's balanced sampler and mixing only
half the examples (``mixup_ratio`` 0.5); DCASE's training of the last block alone, its weak-label branch and
its 10 000-clip synthetic subset; AudioSet-strong's early stopping on the validation loss; the folds of
US8K (10-fold cross-validation there, one split here); the step-based AS-2M C2F run (``train_distill.py``,
λ = 1).
"""

from __future__ import annotations

import dataclasses

CLIP_SH = "audiossl/methods/atst/shell/downtream/finetune/"
FRAME_SH = "audiossl/methods/atstframe/shell/downtream/finetune/"
C2F_SH = "audiossl/methods/atstframe/shell/distill/"
DCASE_SH = "audiossl/methods/atstframe/shell/downtream/finetune_dcase/"
STRONG_SH = "audiossl/methods/atstframe/shell/downtream/finetune_as_strong/"

FAMILIES = {"clip": "ATST-Clip", "frame": "ATST-Frame", "c2f": "ATST-C2F distilled Frame"}

# The options a preset may set (each a ``finetune`` flag of the same name).
FIELDS = ("epochs", "batch", "lr", "warmup_epochs", "layer_decay", "mixup", "crop_s", "median_s")
FIELDS += ("distill_lambda",)

# Other names for the official dataset names.
ALIASES = {"as2m": "audioset", "as20k": "audioset_b", "desed": "dcase", "audioset_strong": "as_strong"}


@dataclasses.dataclass(frozen=True)
class Preset:
    values: dict  # option name -> value
    source: str  # the official script(s) the values are read from (paths in the audiossl repository)
    note: str = ""  # how a swept value was chosen, or what the preset cannot carry


# Shared by every clip-level task of a family: the global batch of the driver scripts (4 GPUs × 128), their
# layer-wise decay and the chunk the encoder runs in.
_CLIP = dict(batch=512, layer_decay=0.75, crop_s=6.0)
_FRAME = dict(batch=512, layer_decay=0.75, crop_s=10.0)
_C2F = dict(batch=512, layer_decay=0.75, crop_s=10.0, distill_lambda=0.5)


def _p(base: dict, source: str, note: str = "", **values) -> Preset:
    """A preset: ``base``'s values under the task's own; a family base adds the driver script beside
    ``source``, whose GPUs × per-GPU batch gives ``batch``."""
    if any(base is b for b in (_CLIP, _FRAME, _C2F)):
        source = f"{source} + eval_batch.sh (the batch)"
    return Preset({**base, **values}, source, note)


RECIPES: dict[str, dict[str, Preset]] = {
    "audioset": {
        # lr loop 0.5, 1.0, 2.0: the first. On the AudioSet path the script's alpha is not passed on; the
        # mixup there draws Beta(10, 10) (FinetuneTargetTransformAudioset's default) for half the examples.
        "clip": _p(
            _CLIP,
            CLIP_SH + "eval_audioset.sh",
            "lr: first of 0.5/1.0/2.0; mixup alpha 10 on half the examples (ratio not representable)",
            lr=0.5,
            epochs=10,
            warmup_epochs=2,
            mixup=10.0,
        ),
        # lr loop 0.5, 1.0: the first; alpha 10, mixup_ratio 0.5.
        "frame": _p(
            _FRAME,
            FRAME_SH + "eval_audioset.sh",
            "lr: first of 0.5/1.0; mixup alpha 10 on half the examples (ratio not representable)",
            lr=0.5,
            epochs=11,
            warmup_epochs=2,
            mixup=10.0,
        ),
    },
    "audioset_b": {
        # lr loop 1.0, 0.5 × alpha 0.5, 10: lr 1.0 is the C2F teacher's run (and the first), alpha the first.
        "clip": _p(
            _CLIP,
            CLIP_SH + "eval_audioset_b.sh",
            "lr: the C2F teacher's (first of 1.0/0.5); alpha: first of 0.5/10",
            lr=1.0,
            epochs=200,
            warmup_epochs=5,
            mixup=0.5,
        ),
        "frame": _p(_FRAME, FRAME_SH + "eval_audioset_b.sh", lr=1.0, epochs=200, warmup_epochs=5, mixup=0.5),
        "c2f": _p(_C2F, C2F_SH + "eval_audioset_b.sh", lr=3.0, epochs=200, warmup_epochs=5, mixup=0.5),
    },
    "fsd50k": {
        # lr loop 0.5, 1.0 × alpha 0.5, 10: lr 0.5 is the C2F teacher's run (and the first), alpha the first.
        "clip": _p(
            _CLIP,
            CLIP_SH + "eval_fsd50k.sh",
            "lr: the C2F teacher's (first of 0.5/1.0); alpha: first of 0.5/10",
            lr=0.5,
            epochs=100,
            warmup_epochs=5,
            mixup=0.5,
        ),
        # lr loop 0.5, 1.0 × alpha 10, 0.5: the first of each.
        "frame": _p(
            _FRAME,
            FRAME_SH + "eval_fsd50k.sh",
            "lr: first of 0.5/1.0; alpha: first of 10/0.5",
            lr=0.5,
            epochs=100,
            warmup_epochs=5,
            mixup=10.0,
        ),
        "c2f": _p(_C2F, C2F_SH + "eval_fsd50k.sh", lr=2.0, epochs=100, warmup_epochs=5, mixup=10.0),
    },
    "nsynth": {
        # Two loops, lr 5e-4, 2.5e-4, 1e-3 with mixup on, then off: the C2F teacher is lr 1e-3 with mixup
        # (alpha 0.5), one of the loop's runs.
        "clip": _p(
            _CLIP,
            CLIP_SH + "eval_nsynth.sh",
            "lr, mixup: the C2F teacher's run (1e-3, on) of the 5e-4/2.5e-4/1e-3 × mixup on/off loops",
            lr=1e-3,
            epochs=50,
            warmup_epochs=5,
            mixup=0.5,
        ),
        # Two loops, lr 5e-4, 2.5e-4, 1e-3 with mixup off, then on: the first run.
        "frame": _p(
            _FRAME,
            FRAME_SH + "eval_nsynth.sh",
            "lr, mixup: the first run (5e-4, off) of the 5e-4/2.5e-4/1e-3 × mixup off/on loops",
            lr=5e-4,
            epochs=50,
            warmup_epochs=5,
            mixup=0.0,
        ),
        # lr loop 1e-2, 2e-2: the first.
        "c2f": _p(
            _C2F,
            C2F_SH + "eval_nsynth.sh",
            "lr: first of 1e-2/2e-2",
            lr=1e-2,
            epochs=50,
            warmup_epochs=5,
            mixup=0.5,
        ),
    },
    "spcv2": {
        "clip": _p(_CLIP, CLIP_SH + "eval_spcv2.sh", lr=0.5, epochs=50, warmup_epochs=5, mixup=0.5),
        "frame": _p(_FRAME, FRAME_SH + "eval_spcv2.sh", lr=1.0, epochs=50, warmup_epochs=5, mixup=10.0),
        "c2f": _p(_C2F, C2F_SH + "eval_spcv2.sh", lr=2.0, epochs=50, warmup_epochs=5, mixup=0.5),
    },
    "us8k": {
        # One lr, mixup on then off: the first (on).
        "clip": _p(
            _CLIP,
            CLIP_SH + "eval_us8k.sh",
            "mixup: the first of on/off; the official run is 10-fold cross-validation",
            lr=2e-3,
            epochs=50,
            warmup_epochs=5,
            mixup=0.5,
        ),
        "frame": _p(
            _FRAME,
            FRAME_SH + "eval_us8k.sh",
            "the official run is 10-fold cross-validation",
            lr=2e-3,
            epochs=50,
            warmup_epochs=5,
            mixup=0.5,
        ),
    },
    "voxceleb1": {
        # lr loop 0.1, 5e-2: the first. (The C2F teacher, lr 5e-2 without layer-wise decay, is not one of
        # the script's current runs, which all use the decay.)
        "clip": _p(
            _CLIP,
            CLIP_SH + "eval_voxceleb1.sh",
            "lr: first of 0.1/5e-2",
            lr=0.1,
            epochs=50,
            warmup_epochs=5,
            mixup=0.0,
        ),
        # lr loop 0.1, 5e-2 (× the teacher and the student encoder): the first, with the teacher encoder.
        "frame": _p(
            _FRAME,
            FRAME_SH + "eval_voxceleb1.sh",
            "lr: first of 0.1/5e-2",
            lr=0.1,
            epochs=50,
            warmup_epochs=5,
            mixup=0.0,
        ),
        # The shell script (lr 5e-2, mixup off), not the README's example command (lr 1e-2, mixup 0.5).
        "c2f": _p(
            _C2F,
            C2F_SH + "eval_voxceleb1.sh",
            "the shell script's values, not the README example's",
            lr=5e-2,
            epochs=50,
            warmup_epochs=5,
            mixup=0.0,
        ),
    },
    # Frame level. train_as_strong.py: unscaled learning rate, 4 GPUs, warm-up 5 epochs (its default),
    # lr_scale 0.75, median filter 7 steps, 10 s clips.
    "as_strong": {
        "clip": _p(
            {},
            STRONG_SH + "finetune_clip_atst.bash",
            "lr 0.5 at a global batch of 4 × 64; crop capped at the encoder's chunk",
            lr=0.5,
            batch=256,
            epochs=100,
            warmup_epochs=5,
            layer_decay=0.75,
            mixup=0.0,
            crop_s=10.0,
            median_s=0.28,
        ),
        "frame": _p(
            {},
            STRONG_SH + "finetune_frame_atst.bash",
            "lr 1e-3 at a global batch of 4 × 8 = lr 8e-3 at 256",
            lr=1e-3 * 256 / 32,
            batch=32,
            epochs=100,
            warmup_epochs=5,
            layer_decay=0.75,
            mixup=0.0,
            crop_s=10.0,
            median_s=0.28,
        ),
        "c2f": _p(
            {},
            STRONG_SH + "finetune_distill_atst.bash",
            "lr 0.5 at a global batch of 4 × 64; loss = halves of task and distillation",
            lr=0.5,
            batch=256,
            epochs=100,
            warmup_epochs=5,
            layer_decay=0.75,
            mixup=0.0,
            crop_s=10.0,
            median_s=0.28,
            distill_lambda=0.5,
        ),
    },
    # train_dcase.py: unscaled learning rate, one GPU, batches of 128 synthetic strong + 128 weak clips,
    # 100 epochs and warm-up 5 (its defaults), no layer-wise decay — it trains the last block, its norm and
    # the head only, which ``layer_decay`` cannot express, so the preset leaves ``layer_decay`` alone.
    "dcase": {
        "clip": _p(
            {},
            DCASE_SH + "clip_atst.sh",
            "official: last block + head only, weak branch; neither representable",
            lr=0.1,
            batch=256,
            epochs=100,
            warmup_epochs=5,
            mixup=0.0,
            crop_s=10.0,
            median_s=0.12,
        ),
        "frame": _p(
            {},
            DCASE_SH + "frame_atst.sh",
            "official: last block + head only, weak branch; neither representable",
            lr=0.1,
            batch=256,
            epochs=100,
            warmup_epochs=5,
            mixup=0.0,
            crop_s=10.0,
            median_s=0.12,
        ),
    },
}

NOT_REPRESENTED = (
    "12 s centre crop run as chunks (one random crop of at most the encoder's chunk here)",
    "AudioSet-2M: balanced (weighted) sampling; mixup on half the examples only",
    "DCASE: only the last block, its norm and the head trained; the weak-label loss; 10k synthetic clips",
    "AudioSet-strong: early stopping (patience 10) and model selection on the validation loss",
    "US8K: 10-fold cross-validation",
    "AudioSet-2M C2F (train_distill.py): step-based schedule and lambda 1",
)


def names() -> list[str]:
    return sorted(RECIPES)


def canonical(name: str) -> str | None:
    """The official task name of ``name`` (itself or an alias), or None when unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in RECIPES else None


def known_text() -> str:
    aliases = ", ".join(f"{a} = {t}" for a, t in sorted(ALIASES.items()))
    return f"{', '.join(names())} (aliases: {aliases})"


def families_of(task: str) -> list[str]:
    return [f for f in FAMILIES if f in RECIPES[task]]


def preset(task: str, family: str) -> Preset | None:
    return RECIPES[task].get(family)
