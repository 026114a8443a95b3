"""The fine-tuning command, ``python -m atst_jax.finetune`` (the method is :mod:`atst_jax.eval.finetune`):
its options and ``--recipe`` presets, the checks made before any work, and the run's life cycle.

    python -m atst_jax.finetune (--workdir RUN [--step N] [--encoder teacher|student] | --weights FILE) \\
        --train DATA --test DATA [--val DATA] --out DIR \\
        [--teacher FT_DIR | --c2f_clip CLIP_RUN_OR_FILE] [--distill_lambda 0.5] [--no_undistilled] \\
        [--teacher_mode official|eval|train] [--teacher_chunks official|valid] [--recipe TASK] \\
        [--task auto|clip|sed] [--epochs 10] [--batch 16] [--lr 0.16] [--layer_decay 0.75] \\
        [--momentum 0.9] [--clip_norm 3.0] [--warmup_epochs 1] [--mixup ALPHA] [--mixup_partner memory|batch] \\
        [--mixup_memory 5000] [--crop_s S] [--drop_path 0.1]

**Before any work** (:func:`prepare`) everything the command will read is read and checked, so a mistake
costs seconds, compiles nothing and leaves nothing behind: the options; ``--out`` (a directory, or one that
can be made — not below a file —, writable, and neither the folder of the ``--teacher`` nor inside it, nor
holding it); the data sets (and the validation hold-out); every run, step and file a model starts from — the
student, and with ``--c2f_clip`` the Clip run, which must be an ATST-Clip encoder (a CLS token) — with its
feature set, and for frame-level distillation the time grids; ``--teacher``'s model and its task.

**An --out folder belongs to one run.** ``OUT/RUN.json`` records it: its models in order, each one's
options (presets resolved) and source (a run's step resolved), the data sets and the teacher. The same
command again continues the run; a command that differs is refused with one line naming what differs, and a
non-empty folder without ``RUN.json`` (another command's output, a run of an older version) is refused too:
nothing in it is replaced.

**Checkpoints and stops.** Each model trains in ``OUT/<model>/`` (``finetuned``; with a teacher ``frame``
and ``frame_distilled``, after ``clip`` with ``--c2f_clip``), with an Orbax checkpoint in
``OUT/<model>/checkpoints/`` (:class:`StageCheckpoints`) after every epoch: parameters, BatchNorm statistics,
optimizer state, the best epoch's parameters, the ``--mixup`` memory (with the memory partner) and the
position (epoch, step, the epoch's losses so far, the validation history; an epoch's order and a step's crops
and mixup draws are drawn from the seed and the position).
SIGTERM or Ctrl-C (:class:`atst_jax.distributed.StopSignal`) saves at the next step boundary and exits 0; a
second Ctrl-C aborts (exit 130). The same command then continues bit for bit. A model that finishes is
written at once — ``OUT/<model>/model/`` and its entry in ``OUT/RESULTS.json``, whose ``pending`` lists the
models still to come — and its checkpoints removed; a rerun skips it. So a run stopped and continued, in
any model, ends with the RESULTS.json of an uninterrupted run (but the ``seconds`` each model took).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from atst_jax import distributed, inference
from atst_jax import features as feature_sets
from atst_jax.checkpoint import Checkpointer, CheckpointRestoreError, config_differences
from atst_jax.errors import UserError
from atst_jax.eval import recipes
from atst_jax.eval.data import check_sets, hold_out, read_labelled, task_of
from atst_jax.eval.finetune import (
    MIXUP_PARTNERS,
    RUN_FILE,
    TEACHER_CHUNKS,
    TEACHER_MODES,
    FinetuneError,
    FinetuneOptions,
    FitState,
    check_teacher,
    finetune,
    finetuned_dir,
    load_finetuned,
    peak_lr,
)
from atst_jax.eval.metrics import json_num
from atst_jax.eval.probe import load_encoder
from atst_jax.eval.report import fmt
from atst_jax.models.encoder import EncoderConfig

RUN_FORMAT = "atst_jax finetune run v1"
RESULTS_FILE = "RESULTS.json"


# ----------------------------------------------------------------------------------------------------------
# Options and presets
# ----------------------------------------------------------------------------------------------------------


def _parser():
    from atst_jax.cli import ArgumentParser

    p = ArgumentParser(
        prog="python -m atst_jax.finetune",
        description="Full fine-tuning of a pretrained encoder on a labelled task, and ATST-C2F.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a pretraining run directory")
    src.add_argument("--weights", help="an exported or official encoder file")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--encoder", choices=("teacher", "student"), default="teacher")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--val", default=None)
    p.add_argument("--out", required=True, help="the run's folder (RUN.json, RESULTS.json, <model>/)")
    dist = p.add_mutually_exclusive_group()
    dist.add_argument(
        "--teacher", default=None, help="a fine-tuned model to distil from (its folder, or its run's --out)"
    )
    dist.add_argument("--c2f_clip", default=None, help="an ATST-Clip run (or file): the whole C2F recipe")
    p.add_argument("--distill_lambda", type=float, default=None, help="(default 0.5)")
    p.add_argument("--no_undistilled", action="store_true", help="with a teacher: skip the λ = 0 run")
    p.add_argument(
        "--teacher_mode",
        choices=TEACHER_MODES,
        default="official",
        help="the teacher's mode while distilling (official: train at clip level, eval at frame level)",
    )
    p.add_argument(
        "--teacher_chunks",
        choices=TEACHER_CHUNKS,
        default="official",
        help="the clip-level teacher's chunk average (official: equal weights, a trailing chunk of at most half "
        "a chunk dropped; valid: weighted by valid tokens)",
    )
    defaults = FinetuneOptions()
    p.add_argument(
        "--recipe",
        default=None,
        metavar="TASK",
        help=f"the official per-task values ({', '.join(recipes.names())}); flags given win",
    )
    p.add_argument("--task", choices=("auto", "clip", "sed"), default="auto")

    # A flag a preset may set defaults to None (= not given): given flags win over the preset, the preset
    # over the FinetuneOptions default.
    def dflt(name):
        return None if name in recipes.FIELDS else getattr(defaults, name)

    for name in ("epochs", "batch"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"(default {getattr(defaults, name)})")
    for name in ("lr", "layer_decay", "momentum", "clip_norm", "warmup_epochs", "mixup", "val_fraction"):
        shown = f"(default {getattr(defaults, name)})"
        if name == "mixup":
            shown = (
                "the official mixup_training: α of mixup λ ~ Beta(α, α), then (clips) RandomResizeCrop "
                + shown
            )
        p.add_argument(f"--{name}", type=float, default=dflt(name), help=shown)
    p.add_argument(
        "--mixup_partner",
        choices=MIXUP_PARTNERS,
        default=defaults.mixup_partner,
        help="with --mixup, clip tasks: whom an example is mixed with (memory: one drawn uniformly from a FIFO "
        "memory of the last --mixup_memory training examples, the official MixupSpecLabel; batch: another "
        "example of the same batch). SED always mixes within the batch",
    )
    p.add_argument(
        "--mixup_memory",
        type=int,
        default=defaults.mixup_memory,
        help=f"the memory partner's size in examples (default {defaults.mixup_memory}: the official n_memory)",
    )
    p.add_argument("--median_s", type=float, default=None, help=f"(default {defaults.median_s})")
    p.add_argument("--crop_s", type=float, default=None, help="(default: the encoder's chunk)")
    p.add_argument("--drop_path", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true")
    return p


def _options(args, preset: dict | None = None) -> FinetuneOptions:
    """The options of ``args``: a preset-able flag not given (None) takes ``preset``'s value, else the
    default."""
    defaults = FinetuneOptions()
    # Every option but ``progress`` is a flag of the same name.
    fields = [f.name for f in dataclasses.fields(FinetuneOptions) if f.name != "progress"]
    v = {}
    for name in fields:
        v[name] = getattr(args, name)
        if v[name] is None and name in recipes.FIELDS:
            v[name] = (preset or {}).get(name, getattr(defaults, name))
    checks = [
        (v["epochs"] >= 1, "--epochs must be >= 1"),
        (v["batch"] >= 1, "--batch must be >= 1"),
        (v["lr"] > 0, "--lr must be > 0"),
        (0 < v["layer_decay"] <= 1, "--layer_decay must be in (0, 1]"),
        (0 <= v["momentum"] < 1, "--momentum must be in [0, 1)"),
        (v["clip_norm"] >= 0, "--clip_norm must be >= 0 (0 = no clipping)"),
        (v["warmup_epochs"] >= 0, "--warmup_epochs must be >= 0"),
        (v["mixup"] >= 0, "--mixup must be >= 0 (0 = off)"),
        (v["mixup_memory"] >= 1, "--mixup_memory must be >= 1"),
        (0 <= v["distill_lambda"] <= 1, "--distill_lambda must be in [0, 1]"),
        (0 < v["val_fraction"] < 1, "--val_fraction must be in (0, 1)"),
        (v["crop_s"] is None or v["crop_s"] > 0, "--crop_s must be > 0"),
        (v["drop_path"] is None or 0 <= v["drop_path"] < 1, "--drop_path must be in [0, 1)"),
        (v["seed"] >= 0, "--seed must be >= 0"),  # it seeds NumPy's generators, which take no negative seed
    ]
    for ok, msg in checks:
        if not ok:
            raise FinetuneError(msg)
    return FinetuneOptions(**v, progress=not args.no_progress)


def recipe_task(args) -> str | None:
    """The official task name of ``--recipe`` (None without it); an unknown name, or a distillation run of a
    task without official C2F values, is a :class:`FinetuneError`."""
    name = getattr(args, "recipe", None)
    if name is None:
        return None
    task = recipes.canonical(name)
    if task is None:
        raise FinetuneError(f"unknown --recipe {name!r}; known: {recipes.known_text()}")
    distilled = getattr(args, "teacher", None) or getattr(args, "c2f_clip", None)
    if distilled and recipes.preset(task, "c2f") is None:
        have = ", ".join(t for t in recipes.names() if recipes.preset(t, "c2f"))
        raise FinetuneError(
            f"--recipe {task}: the official scripts give no ATST-C2F (distillation) values for it; "
            f"those with C2F values: {have}"
        )
    return task


def resolve_options(args, family: str | None = None) -> tuple[FinetuneOptions, dict | None]:
    """The options of a model of ``family`` (``clip`` | ``frame`` | ``c2f``; see :mod:`atst_jax.eval.recipes`):
    each preset-able flag as given on the command line, else the ``--recipe`` preset's value for that
    family, else the default; and the recipe record (name, family, source script, the preset's values, the
    flags given), None without ``--recipe``."""
    task = recipe_task(args)
    if task is None or family is None:
        return _options(args), None
    preset = recipes.preset(task, family)
    if preset is None:
        label = recipes.FAMILIES[family]
        raise FinetuneError(f"--recipe {task}: the official scripts give no {label} values")
    given = [f"--{n}" for n in recipes.FIELDS if getattr(args, n, None) is not None]
    record = {
        "name": task,
        "family": family,
        "source": preset.source,
        "note": preset.note,
        "preset": dict(preset.values),
        "given": given,
    }
    return _options(args, preset.values), record


def recipe_line(name: str, opts: FinetuneOptions, record: dict) -> str:
    """One line: the recipe, its family and source, and the values the model runs with."""

    def val(k):
        x = getattr(opts, k)
        return "the encoder's chunk" if x is None else f"{x:g}"

    shown = ", ".join(f"{k} {val(k)}" for k in recipes.FIELDS)
    given = ", ".join(record["given"]) or "none"
    return (
        f"{name}: recipe {record['name']} ({recipes.FAMILIES[record['family']]} values, {record['source']}): "
        f"{shown} (peak lr {peak_lr(opts):g}); flags given: {given}"
    )


# ----------------------------------------------------------------------------------------------------------
# Before any work: every input read and checked
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One model the command trains: its folder name, the encoder it starts from (``student`` | ``clip``),
    whether it is distilled, its options and ``--recipe`` record."""

    name: str
    source: str
    distilled: bool
    opts: FinetuneOptions
    recipe: dict | None


@dataclasses.dataclass
class Plan:
    """What :func:`prepare` read and checked: the data, the encoders (``(encoder, chunk frames, feature set,
    source record)`` by source), ``--teacher``'s ``(model, meta)``, the models to train in order, and the
    record of the run (``RUN.json``)."""

    out: Path
    sets: dict
    sources: dict
    teacher: tuple | None
    stages: list
    recipe: str | None
    identity: dict


def check_out(out: Path) -> None:
    """One line for an ``--out`` that is a file, lies below a file, or cannot be written."""
    from atst_jax.cli import check_output

    check_output(out, "--out", directory=True)


def teacher_folder(given, model_dir: Path) -> Path:
    """The folder a ``--teacher`` belongs to: the ``--out`` folder of the run that made it (the one holding
    ``RUN.json`` or ``RESULTS.json`` above ``<model>/model``), else the folder given."""
    for folder in (model_dir.parent, model_dir.parent.parent):
        if (folder / RUN_FILE).is_file() or (folder / RESULTS_FILE).is_file():
            return folder
    return Path(given)


def check_overlap(out: Path, teacher: Path) -> None:
    """``--out`` is never the teacher's folder, inside it, or around it: the run would write over the
    teacher's own results (``RESULTS.json``, ``<model>/``) or models."""
    a, b = out.resolve(), teacher.resolve()
    if a == b or b in a.parents or a in b.parents:
        raise FinetuneError(
            f"--out {out} overlaps the --teacher's folder {teacher}: this run would write over the teacher's "
            "results; choose an --out outside it"
        )


def _read_sets(args, opts: FinetuneOptions) -> dict:
    sets = {
        "train": read_labelled(args.train, "--train"),
        "test": read_labelled(args.test, "--test"),
        "val": read_labelled(args.val, "--val") if args.val else None,
    }
    if sets["val"] is None:
        hold_out(sets["train"], opts.val_fraction)  # too few clips to hold out: one line now, not later
    return sets


def _load(workdir, weights, step, encoder, what):
    try:
        return load_encoder(workdir=workdir, step=step, weights=weights, encoder=encoder)
    except (FileNotFoundError, ValueError) as e:
        raise FinetuneError(f"{what}: {' '.join(str(e).split())}") from None


def _load_sources(args) -> dict:
    """Every encoder the models start from, loaded (and so every run, step and file checked) now."""
    what = f"--workdir {args.workdir}" if args.workdir else f"--weights {args.weights}"
    sources = {"student": _load(args.workdir, args.weights, args.step, args.encoder, what)}
    if args.c2f_clip:
        clip = args.c2f_clip
        src = (None, clip, None, "teacher") if os.path.isfile(clip) else (clip, None, None, "teacher")
        sources["clip"] = _load(*src, f"--c2f_clip {clip}")
        if not sources["clip"][0].cfg.use_cls:
            raise FinetuneError(
                f"--c2f_clip {clip}: an encoder without a CLS token (an ATST-Frame run?), not ATST-Clip: "
                "ATST-C2F distils a fine-tuned ATST-Clip model into the Frame one; pass the ATST-Clip run"
            )
    return sources


def _time_step(enc, features: str) -> float:
    fs = feature_sets.get(features)
    return inference.time_patch(enc.cfg) * fs.hop_length / fs.sample_rate


def _check_sources(args, sets: dict, sources: dict, teacher) -> None:
    """Each encoder's feature set against the data's; the Clip teacher's time grid against the student's
    (frame-level distillation); ``--teacher``'s task, classes, features and grid against this run's."""
    given = {"--train": sets["train"], "--test": sets["test"]}
    given |= {"--val": sets["val"]} if sets["val"] is not None else {}
    task = task_of(list(given.values()), args.task)
    level = "frame" if task == "sed" else "clip"
    enc, _, features, _ = sources["student"]
    check_sets(given, features, enc.cfg.n_mels)
    step_s = _time_step(enc, features)
    if "clip" in sources:
        c_enc, _, c_features, _ = sources["clip"]
        try:
            check_sets(given, c_features, c_enc.cfg.n_mels)
        except UserError as e:
            raise FinetuneError(f"--c2f_clip {args.c2f_clip}: {e}") from None
        c_step = _time_step(c_enc, c_features)
        if level == "frame" and abs(c_step - step_s) > 1e-9:
            raise FinetuneError(
                f"--c2f_clip {args.c2f_clip}: frame-level distillation needs one time grid: the Clip "
                f"encoder's steps are {c_step * 1000:g} ms, the student's {step_s * 1000:g} ms"
            )
    if teacher is not None:
        check_teacher(teacher[1], sets["train"], task, features, level, step_s)


def family_of(cfg: EncoderConfig) -> str:
    """The recipe family of a plain fine-tuning run of an encoder: ``clip`` with a CLS token (the ATST-Clip
    layout), ``frame`` without."""
    return "clip" if cfg.use_cls else "frame"


def _stages(args, sources: dict) -> list[Stage]:
    """The models to train, in order, each with its family's options."""
    own = family_of(sources["student"][0].cfg)
    plan = [("clip", "clip", False, "clip")] if args.c2f_clip else []
    if args.c2f_clip or args.teacher:
        plan += [] if args.no_undistilled else [("frame", "student", False, own)]
        plan += [("frame_distilled", "student", True, "c2f")]
    else:
        plan += [("finetuned", "student", False, own)]
    return [Stage(name, src, dist, *resolve_options(args, family)) for name, src, dist, family in plan]


def _identity(args, sources: dict, teacher_dir, stages: list[Stage], recipe: str | None) -> dict:
    """What ``RUN.json`` records of a run: what defines it (never how it is shown, ``--no_progress``)."""

    def where(p):
        return None if p is None else str(Path(p).resolve())

    def source(rec: dict) -> dict:
        return {k: where(v) if k in ("workdir", "weights") else v for k, v in rec.items()}

    options = {s.name: dataclasses.asdict(s.opts) for s in stages}
    return {
        "format": RUN_FORMAT,
        "models": [s.name for s in stages],
        "recipe": recipe,
        "data": {"train": where(args.train), "test": where(args.test), "val": where(args.val)},
        "teacher": where(teacher_dir),
        "sources": {s.name: source(sources[s.source][3]) for s in stages},
        "options": {n: {k: v for k, v in o.items() if k != "progress"} for n, o in options.items()},
    }


def prepare(args) -> Plan:
    """Every check of the module docstring, in order of cost; nothing is written."""
    recipe = recipe_task(args)
    opts = _options(args)  # the flags' own checks, before any data is read
    for family in recipes.families_of(recipe) if recipe else ():
        resolve_options(args, family)
    out = Path(args.out)
    check_out(out)
    teacher_dir = finetuned_dir(args.teacher) if args.teacher else None
    if teacher_dir is not None:
        check_overlap(out, teacher_folder(args.teacher, teacher_dir))
    sets = _read_sets(args, opts)
    sources = _load_sources(args)
    teacher = load_finetuned(teacher_dir) if teacher_dir is not None else None
    _check_sources(args, sets, sources, teacher)
    stages = _stages(args, sources)
    identity = _identity(args, sources, teacher_dir, stages, recipe)
    return Plan(out, sets, sources, teacher, stages, recipe, identity)


# ----------------------------------------------------------------------------------------------------------
# The run's folder: its owner, its results, its checkpoints
# ----------------------------------------------------------------------------------------------------------


def claim_out(out: Path, identity: dict) -> bool:
    """Makes ``out`` this run's folder; True when it already was (the run continues). Another run's folder,
    or a non-empty one without ``RUN.json``, is refused in one line and left untouched."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text())
        except (OSError, ValueError) as e:
            raise FinetuneError(
                f"--out {out}: {RUN_FILE} is unreadable ({e}); choose another --out"
            ) from None
        diffs = config_differences(saved, identity)
        if saved.get("format") != RUN_FORMAT:
            diffs = [f"format: {saved.get('format')!r} -> {RUN_FORMAT!r}"] + diffs
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise FinetuneError(
                f"--out {out} holds another fine-tuning run, which differs in {shown}: run its own command "
                "to continue it, or choose another --out"
            )
        return True
    if out.is_dir() and any(out.iterdir()):
        raise FinetuneError(
            f"--out {out} is not empty and holds no fine-tuning run ({RUN_FILE}): choose a new or empty "
            "folder (nothing in it is replaced)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(run_file, identity)
    except OSError as e:
        raise FinetuneError(f"--out {out} is not writable ({e.strerror or e})") from None
    return False


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=json_num))
    os.replace(tmp, path)  # a kill mid-write leaves the previous file whole


def finished_models(plan: Plan) -> dict:
    """The results entries of the models a previous run of this folder finished (``RESULTS.json``, with
    their saved model)."""
    path = plan.out / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        models = json.loads(path.read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"--out {plan.out}: {RESULTS_FILE} is unreadable ({e})") from None
    saved = lambda n: (plan.out / n / "model" / "params.msgpack").is_file()  # noqa: E731
    return {s.name: models[s.name] for s in plan.stages if s.name in models and saved(s.name)}


def results_doc(plan: Plan, done: dict) -> dict:
    """``RESULTS.json``: task, classes, recipe, options (the first model's), the finished models' entries in
    the run's order, and the models still ``pending``."""
    models = {s.name: done[s.name] for s in plan.stages if s.name in done}
    first = next(iter(models.values()), None)
    return {
        "recipe": plan.recipe,
        "options": first["options"] if first else None,
        "models": models,
        "task": first["task"] if first else None,
        "classes": list(plan.sets["train"].classes),
        "pending": [s.name for s in plan.stages if s.name not in done],
    }


class StageCheckpoints:
    """One model's checkpoints, ``OUT/<model>/checkpoints/<step>/`` (Orbax through
    :class:`atst_jax.checkpoint.Checkpointer`: asynchronous, committed atomically, the newest kept, a
    damaged step set aside): :meth:`FitState.arrays` and its position as JSON. What
    :meth:`atst_jax.eval.finetune.Finetuner.fit` calls; ``after_step(model, epoch, steps)`` (tests) runs
    after every step."""

    def __init__(self, folder: Path, name: str, stop=None, after_step=None, log=print):
        self.name, self.stop, self.after_step, self.log = name, stop, after_step, log
        self.ckpt = Checkpointer(folder, save_every=1, keep=1)
        self.saved = 0  # the step of the newest checkpoint; a fresh start (step 0) needs none
        self.where = None  # (epoch, step in it) of the newest checkpoint; None: there is none

    def restore(self, st: FitState) -> FitState:
        arrays = st.arrays()
        latest = self.ckpt.latest_step()
        if latest is None:
            return st
        try:
            problems = self.ckpt.compatibility(latest, arrays)
        except CheckpointRestoreError:
            problems = []  # damaged: restore_latest warns and falls back to an older step
        if problems:
            raise FinetuneError(
                f"{self.ckpt.directory}: checkpoint step {latest} is not of this model "
                f"({'; '.join(problems[:4])}); move {self.ckpt.directory.parent} away to train it afresh"
            )
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        step, restored = self.ckpt.restore_latest(arrays, jax.tree.map(lambda _: device, arrays))
        if restored is None:
            return st
        # Uncommitted arrays, as a fresh run's: the steps then compile to the very programs an uninterrupted
        # run uses (arrays pinned to a device are another signature: another compile, or cache entry).
        restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
        items = ocp.args.Composite(meta=ocp.args.JsonRestore())
        st = st.restored(restored, self.ckpt.manager.restore(step, args=items)["meta"])
        self.saved, self.where = st.step, (st.epoch, st.batch)
        self.log(f"{self.name}: continuing from {self.ckpt.directory / str(step)} ({self._at()})")
        return st

    def save(self, st: FitState) -> None:
        if st.step == self.saved:
            return  # nothing new since the newest checkpoint
        self.ckpt.save(st.step, st.arrays(), meta=st.position(), force=True)
        self.saved, self.where = st.step, (st.epoch, st.batch)

    def should_stop(self) -> bool:
        return self.stop is not None and self.stop.requested is not None

    def stepped(self, st: FitState) -> None:
        if self.after_step is not None:
            self.after_step(self.name, st.epoch, st.batch)

    def _at(self) -> str:
        epoch, batch = self.where
        return f"epoch {epoch + 1}, after step {batch} of it" if batch else f"after epoch {epoch}"

    def stopped_line(self) -> str:
        if self.where is None:
            return (
                f"stop requested before {self.name}'s first step: nothing to save; run the same command again"
            )
        return (
            f"stop requested: {self.name} saved ({self._at()}) to {self.ckpt.directory}; run the same command "
            "again to continue"
        )

    def close(self) -> None:
        self.ckpt.close()  # waits for the last asynchronous save to commit

    def remove(self) -> None:
        """After :meth:`close`, once the model and its results are written: its checkpoints are no longer
        needed."""
        shutil.rmtree(self.ckpt.directory, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def _train_stage(plan: Plan, stage: Stage, ckpt: StageCheckpoints, log) -> dict | None:
    """One model fine-tuned (None: stopped on request, saved), from a copy of its encoder."""
    enc, chunk, features, source = plan.sources[stage.source]
    teacher = None
    if stage.distilled:  # --teacher's model, or the Clip model this run fine-tuned first
        teacher = plan.teacher if plan.teacher is not None else load_finetuned(plan.out / "clip")
    if stage.recipe is not None:
        log(recipe_line(stage.name, stage.opts, stage.recipe))
    sets = plan.sets
    folder = plan.out / stage.name
    return finetune(
        nnx.clone(enc),
        chunk,
        features,
        sets["train"],
        sets["test"],
        sets["val"],
        stage.opts,
        folder,
        teacher,
        source,
        stage.name,
        log,
        stage.recipe,
        ckpt=ckpt,
    )


def run(args, log=print, after_step=None) -> dict:
    """The command: :func:`prepare`, :func:`claim_out`, then each model not finished yet, its results written
    as it finishes; returns the ``RESULTS.json`` document (``pending`` non-empty: stopped on request).
    SIGTERM / Ctrl-C from here on stop at the next step boundary with the model's state saved."""
    with distributed.StopSignal() as stop:
        plan = prepare(args)
        done = finished_models(plan) if claim_out(plan.out, plan.identity) else {}
        for stage in plan.stages:
            if stage.name in done:
                log(
                    f"{stage.name}: finished by an earlier run of this command (in {plan.out / RESULTS_FILE})"
                )
                continue
            if stop.requested is not None:
                log(f"stop requested: exiting before {stage.name}; run the same command again to continue")
                return results_doc(plan, done)
            ckpt = StageCheckpoints(plan.out / stage.name, stage.name, stop, after_step, log)
            try:
                entry = _train_stage(plan, stage, ckpt, log)
            finally:
                ckpt.close()
            if entry is None:
                log(ckpt.stopped_line())
                return results_doc(plan, done)
            done[stage.name] = entry
            _write_json(plan.out / RESULTS_FILE, results_doc(plan, done))
            ckpt.remove()
        results = results_doc(plan, done)
        _write_json(plan.out / RESULTS_FILE, results)
    log(table(results))
    return results


def table(results: dict) -> str:
    models = results["models"]
    keys = list(next(iter(models.values()))["metrics"])
    rows = [["model", *keys]] + [[n, *(fmt(m["metrics"][k]) for k in keys)] for n, m in models.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv=None, after_step=None) -> int:
    """Exit status 0 when the run finished or stopped on request (saved), 2 with one line for a user error.
    ``after_step``: see :class:`StageCheckpoints`."""
    from atst_jax.cli import fail

    args = _parser().parse_args(argv)
    try:
        run(args, after_step=after_step)
    except UserError as e:
        return fail(str(e))
    return 0
