"""The pretraining command: turns a config into a run of the trainer library.

    python -m atst_jax.train --config configs/atst_frame.py:tiny --workdir runs/tiny [--config.train.steps=20]

Read top to bottom, as the run goes: check the config and build the method once (``atst_jax.config``), the
mesh and the data (``atst_jax.trainer``), the state — resumed, refused, fresh or set aside
(``checkpoint.resume_or_start``; ``init_from`` for a fresh start) — then the loop (``trainer.Loop``) with its
hooks: checkpoints (every ``train.ckpt_every`` steps, at a stop request and at the end), pictures of the views
(``train.image_every``) and the pretraining-time probe (``config.probe``). Progress, metrics and TensorBoard
are ``atst_jax.metrics``, as is what the run has cost over all its starts (``ComputeMeter``: device-hours,
FLOPs, mean MFU in metrics.jsonl and each checkpoint's metadata); SIGTERM / Ctrl-C are
``distributed.StopSignal``.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from atst_jax import distributed
from atst_jax import sharding as shd
from atst_jax.checkpoint import (
    CheckpointRestoreError,
    check_workdir,
    from_pure,
    make_workdir,
    read_checkpoint,
    resume_or_start,
    run_dir,
    run_metadata,
    to_pure,
)
from atst_jax.config import check_config, check_overrides, config_spec_from_argv, load_config
from atst_jax.data import lineage
from atst_jax.eval import pretrain_probe
from atst_jax.flops import CHIPS, chip_from_device
from atst_jax.metrics import ComputeMeter, MetricsWriter, Progress, fetch, fmt_time, log, truncate_jsonl
from atst_jax.models import collapse
from atst_jax.sharding import ConfigError
from atst_jax.trainer import Loop, NonFiniteError, Trainer, check_data, data_files, make_data_iterator

__all__ = ["Trainer", "check_config", "init_from_checkpoint", "load_config", "train"]

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/atst_frame.py:tiny")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard logs"
)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) pretraining; returns ``{"step", "loss", "workdir", "preempted"}`` of the last step.

    SIGTERM or Ctrl-C from here on stops at the next step boundary with that step saved."""
    with distributed.StopSignal() as stop:
        return _train(config, workdir, stop)


def _loop(config, trainer, mesh, files, data_iter, ckpt, stop, workdir, step, meter):
    """``(loop, writer, progress)``: the training loop from ``step`` with its metrics, pictures and checkpoint
    hooks (the probe hook is the caller's)."""
    t = config.train
    writer = MetricsWriter(workdir, resume_step=step)
    progress = _progress(config, trainer, step, meter)
    loop = Loop(
        trainer.jit_train_step(),
        data_iter,
        trainer.batch_shardings,
        progress,
        writer,
        total=t.steps,
        log_every=t.log_every,
        nonfinite=t.nonfinite,
        max_skipped=t.max_skipped,
        should_stop=lambda s: stop.requested is not None or ckpt.reached_preemption(s),
        checkpoint_steps=ckpt.all_steps,
    )
    if int(t.get("image_every", 0)) > 0:
        loop.add_hook(_pictures_hook(trainer, writer), every=int(t.image_every))
    # Which clips the run trains on (atst_jax.data.lineage), in every checkpoint and in metrics.jsonl.
    data = lineage.training_data(
        files, int(config.data.get("subset", 0)), int(config.data.get("subset_seed", 1234))
    )
    writer.annotate_next_row(data=data)  # the first metrics.jsonl row of this start
    meta = {**run_metadata(mesh, trainer.method), "data": data}  # and the crops it trains on, for inference
    loop.add_hook(_checkpoint_hook(ckpt, data_iter, config, meta, writer, meter))
    return loop, writer, progress


def _train(config, workdir, stop) -> dict:
    started = time.perf_counter()  # this start's device time begins here (ComputeMeter)
    workdir = run_dir(workdir)  # a local path, or gs://… for pods writing straight to a bucket
    check_workdir(workdir)
    t = config.train
    if t.nonfinite not in ("halt", "skip"):
        raise ConfigError(f"train.nonfinite={t.nonfinite!r}: choose halt or skip")

    # -------------------------------------------------------------------------- Config, mesh, data
    method = check_config(config, jax.device_count(), jax.process_count())
    mesh = shd.make_mesh(config.mesh)
    try:
        files = data_files(config, method=method)
    except (OSError, ValueError) as e:  # a missing or empty records_dir, an incomplete shard set: one line
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data: {' '.join(str(e).split())}") from None
    feature_set = check_data(config, method, files)

    # -------------------------------------------------------------------------- State
    trainer = Trainer(config, mesh, method)
    data_iter = make_data_iterator(config, method, files, feature_set)
    try:
        make_workdir(workdir)  # only now: a config refused above leaves no workdir behind
        run_config = json.loads(config.to_json_best_effort())
        ckpt, state = resume_or_start(
            workdir, t, trainer, data_iter, run_config, functools.partial(_start, config, trainer), log=log
        )
    except ConfigError:
        data_iter.close()
        raise
    step = int(fetch(state["step"]))
    if step >= t.steps:
        ckpt.close()
        data_iter.close()
        # The final probe is part of the run: one that was interrupted or crashed is produced now.
        if not pretrain_probe.run_missing_final(config, workdir, run_config, feature_set, state, step, log):
            log(f"nothing to do: the checkpoint at step {step} already reaches train.steps={t.steps}")
        return {"step": step, "loss": float("nan"), "workdir": str(workdir), "preempted": False}
    log(
        f"{config.method} {config.variant}: {trainer.num_params:,} trainable parameters "
        f"({trainer.num_encoder_params:,} in the encoder), mesh {dict(mesh.shape)} over "
        f"{jax.process_count()} process(es), global batch {t.global_batch}, {len(files)} record files",
    )

    # -------------------------------------------------------------------------- Loop and hooks
    meter = _meter(config, trainer, ckpt, step, started)
    loop, writer, progress = _loop(config, trainer, mesh, files, data_iter, ckpt, stop, workdir, step, meter)
    if config.get("probe") and config.probe.train:
        loop.add_hook(_probe_hook(config, workdir, run_config, feature_set, step, writer))
    try:
        state, step = loop.run(state, step)
    finally:
        ckpt.close()  # waits for the last asynchronous save to commit
        writer.close()
        data_iter.close()
    last = loop.last
    if loop.stopping:
        log(f"stop requested: saved step {step} to {ckpt.directory}; exiting")
        return {"step": step, "loss": last["loss"], "workdir": str(workdir), "preempted": True}
    log(
        f"checkpoints: {ckpt.directory}\nmetrics: {workdir / 'metrics.jsonl'}\ntensorboard: {workdir / 'tensorboard'}",
    )
    log(f"compute: {ComputeMeter.describe(meter.totals(step))}")
    log(f"done in {fmt_time(progress.elapsed())}: final step {last['step']} loss {last['loss']:.6f}")
    return {"step": last["step"], "loss": last["loss"], "workdir": str(workdir), "preempted": False}


def _start(config, trainer):
    """A fresh state: the seed's initialisation, then ``init_from``'s parameters if one is named."""
    state = trainer.init(config.seed)
    if config.init_from:
        state = init_from_checkpoint(state, trainer, config.init_from)
    return state


def _meter(config, trainer, ckpt, step, started):
    """The run's compute totals (``metrics.ComputeMeter``) against the chip's peak (``train.chip``, or
    detected; none on CPUs), continued from those saved with the checkpoint this start resumes."""
    chip = config.train.get("chip", "") or chip_from_device(jax.devices()[0])
    saved = ckpt.saved_meta(step).get("compute") if step else None
    peak = CHIPS[chip]["peak_tflops"] if chip else 0.0
    devices = trainer.mesh.devices.size  # the devices the run holds
    return ComputeMeter(
        trainer.step_flops, devices, peak, start_step=step, saved=saved, started=started, chip=chip
    )


def _progress(config, trainer, step, meter):
    """The progress line's bookkeeping: MFU against the chip's peak (the meter's), the method's monitors, the
    encoder-health floors and the run's compute totals."""
    t = config.train
    return Progress(
        t.steps,
        t.global_batch,
        step,
        trainer.step_flops / jax.device_count(),
        meter.peak_tflops,
        trainer.method.progress_monitors,
        health_min=dict(t.get("health_min", collapse.HEALTH_MIN)),
        health_patience=int(t.get("health_patience", 200)),
        compute=meter,
    )


def _checkpoint_hook(ckpt, data_iter, config, meta, writer, meter):
    """Saves every ``train.ckpt_every`` steps, at a stop request and at the last step. Checked first: never a
    checkpoint of a non-finite step. The step's line goes out before its checkpoint: a run killed once the
    save has committed resumes after this step, so a line still pending then would be lost for good. The
    metadata carries the compute totals as of the step: what a resume from it continues."""

    def hook(loop, step, state, batch):
        final = step == loop.total
        if loop.stopping or ckpt.should_save(step) or final:
            loop.flush(force=loop.stopping or final)
            meta_now = {**meta, "compute": meter.totals(step)}
            ckpt.save(step, state, data_iter, config, meta_now, force=True)
            writer.sync()

    return hook


def _pictures_hook(trainer, writer):
    """The method's pictures of the first clip, as the step that just ran drew its views and masks."""
    titles, draw = trainer.jit_pictures()

    def hook(loop, step, state, batch):
        panels = fetch(draw(state["rng"], step - 1, batch))
        writer.image("views", list(zip(titles, *zip(*panels, strict=True), strict=True)), step)

    return hook


def _probe_hook(config, workdir, run_config, feature_set, start_step, writer):
    """The pretraining-time probe (``config.probe``), off the step-time clock; each probe appears once in
    ``probe.jsonl`` after a resume."""
    probe_log = Path(str(workdir)) / "probe.jsonl"
    if distributed.is_main() and probe_log.exists():
        truncate_jsonl(probe_log, start_step)
    probe = pretrain_probe.PretrainProbe(config, workdir, run_config, feature_set, log=log)

    def hook(loop, step, state, batch):
        final = step == loop.total
        if not loop.stopping and probe.due(step, last=final):
            loop.flush(force=final)
            loop.progress.pause(functools.partial(probe.maybe_run, state, step, writer, last=final))

    return hook


def init_from_checkpoint(state, trainer, source: str):
    """Replaces student/teacher parameters and BN buffers of a fresh ``state`` by those of another run's
    checkpoint (a run directory, newest step, or ``RUN/checkpoints/<step>``) or of an exported / official PyTorch
    file (a Lightning pretraining checkpoint gives encoders and heads; an encoder-only file sets both student and
    teacher encoders and keeps the heads' fresh init). Optimizer and step stay fresh."""
    src = Path(source)
    partial = False  # an encoder-only file leaves the heads freshly initialised
    if src.is_file():  # an exported / official PyTorch file (safetensors, ATST-SED or Lightning layout)
        from atst_jax.export import load as export_load

        heads = trainer.enc_cfg.heads
        unreadable = lambda e: ConfigError(f"init_from={source}: {' '.join(str(e).split())}")  # noqa: E731
        try:
            loaded = export_load.load_pretraining(src, heads=heads)
        except (ValueError, OSError) as e:  # damaged, empty, or a torch file of more than weights
            raise unreadable(e) from None
        except KeyError:
            try:
                encoder = export_load.load_encoder_params(src, heads=heads)
            except (KeyError, ValueError, OSError) as e:
                raise ConfigError(f"init_from={source}: not a file of encoder weights ({e})") from None
            # Missing leaves keep their fresh init (the heads), so a trunk of the other layout would load
            # half its norms silently, and an AaPE branch present on one side only would stay random or be
            # dropped: compare the layouts first.
            theirs = "post" if "embed_norm" in encoder else "pre"
            if theirs != trainer.enc_cfg.norm_style:
                raise ConfigError(
                    f"init_from={source}: the file's encoder is {theirs}-norm, this model is "
                    f"model.norm_style={trainer.enc_cfg.norm_style!r}"
                ) from None
            if ("aape" in encoder) != (trainer.enc_cfg.aape is not None):
                has = "has an AaPE branch" if "aape" in encoder else "has no AaPE branch"
                raise ConfigError(
                    f"init_from={source}: the file's encoder {has}, this model "
                    + (
                        "has one (model.aape)"
                        if trainer.enc_cfg.aape is not None
                        else "has none (model.aape=None)"
                    )
                ) from None
            loaded = {
                "params": {"encoder": encoder},
                "teacher": {"encoder": encoder},
                "stats": {},
                "teacher_stats": {},
            }
            partial = True
        from_step = "(file)"
    else:
        step = None
        if src.name.isdigit() and src.parent.name == "checkpoints":
            step, src = int(src.name), src.parent.parent
        try:
            from_step, _, loaded = read_checkpoint(src, step)
        except (FileNotFoundError, CheckpointRestoreError) as e:
            raise ConfigError(f"init_from={source}: {' '.join(str(e).split())}") from None
    pure = to_pure(state)
    shardings = to_pure(trainer.state_shardings)
    for part in ("params", "stats", "teacher", "teacher_stats"):
        flat = jax.tree_util.tree_flatten_with_path(pure[part])[0]
        targets = jax.tree.leaves(shardings[part])
        leaves = []
        for (path, value), sharding in zip(flat, targets, strict=True):
            theirs = _lookup(loaded[part], path)
            if theirs is None and partial:
                leaves.append(value)
                continue
            if theirs is None or np.shape(theirs) != value.shape:
                got = "missing" if theirs is None else np.shape(theirs)
                key = jax.tree_util.keystr(path)
                raise ConfigError(
                    f"init_from={source}: {part}{key} is {got} there, this model needs {value.shape}"
                )
            leaves.append(jax.device_put(np.asarray(theirs, value.dtype), sharding))
        pure[part] = jax.tree.unflatten(jax.tree.structure(pure[part]), leaves)
    log(f"initialised parameters from {src} step {from_step}")
    return from_pure(trainer.abstract_state, pure)


def _lookup(tree, path):
    """The leaf of a nested dict at a key path, or None."""
    for entry in path:
        if not isinstance(tree, dict) or entry.key not in tree:
            return None
        tree = tree[entry.key]
    return tree


def main(argv):
    if len(argv) > 1:  # e.g. "--config configs/compose.py:tiny, patch2d": the shell split the value
        print(f"error: unexpected arguments {' '.join(argv[1:])!r} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    if not flags.FLAGS["verbosity"].present:  # Orbax/JAX INFO chatter would drown the progress line
        logging.set_verbosity(logging.WARNING)
    if _WORKDIR.value is None:
        print("error: --workdir is required", file=sys.stderr)
        sys.exit(2)
    try:
        distributed.initialize()
        train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except pretrain_probe.FinalProbeInterrupted as e:  # the step is saved: say so, and how to get the probe
        print(f"error: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # the second Ctrl-C (the first one saves and exits 0)
        print("error: interrupted twice: stopped without saving the step in progress", file=sys.stderr)
        sys.exit(130)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (exit 2) instead of its FATAL block, also for a config file
    whose loading raises (``config_flags`` wraps that exception's traceback into the message)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        message = lines[-1] if lines and "Traceback" in str(e) else " ".join(lines)
        if "--config must have a value" in message:
            message = "--config is required, e.g. --config configs/atst_frame.py:tiny"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def cli(argv: list[str]) -> None:
    """``python -m atst_jax.train``: config-file, variant and override errors are checked before absl parses
    the flags, so each is one line with exit status 2."""
    try:
        spec = config_spec_from_argv(argv[1:])
        if spec is not None:
            load_config(spec)  # a missing file or an unknown variant: one line
        check_overrides(argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    flags.mark_flags_as_required(["config"])
    app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli(sys.argv)
