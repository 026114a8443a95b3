"""Orbax checkpoints of the whole training state, the Grain iterator, the config and run metadata.

One composite checkpoint per saved step under ``WORKDIR/checkpoints/<step>/``:

- ``state``: step, student/teacher parameters and BN buffers, optimizer state, rng key — plain nested dicts of
  arrays (Orbax's tensorstore format; nothing on any load path uses pickle);
- ``data``: the Grain iterator position (one JSON per process);
- ``config``: the run's config (JSON); ``meta``: mesh, device/process counts, library versions, and what the
  trainer adds: the data fingerprint (``data``) and the run's compute totals as of the step (``compute``:
  device-hours, training FLOPs, mean MFU; ``metrics.ComputeMeter``), which a resume continues from; and the
  crops the method trains on (``inputs``: ``[{"name", "frames", "features"}]``, :func:`trained_inputs`), from
  which inference takes the encoder's chunk length and front end without rebuilding the method.

Saves are asynchronous; Orbax writes each step into a temporary directory and renames it only once every
item is complete, so a crash mid-save leaves no step that looks finished, and old steps are deleted only
after a newer one has committed. A step whose files were damaged later (truncated, deleted) fails to
restore: ``restore_latest`` then warns, falls back to the previous step and moves the unreadable one aside to
``WORKDIR/set_aside/`` (kept, never deleted), so a later save of that step number is never skipped.

A workdir belongs to one run. Before restoring, each step's saved config and state structure are compared with
the new run's: a checkpoint of another run (another model, method, crop, optimizer, data, seed, batch — any
field outside ``RESUMABLE_FIELDS``, or any difference in the state's paths, shapes and dtypes) is refused with
one line naming the differing fields (``IncompatibleCheckpointError``), never restored, never overwritten.
An unreadable step (damaged or missing files) is told apart from an incompatible one.

CLI::

    python -m atst_jax.checkpoint list   --workdir DIR
    python -m atst_jax.checkpoint digest --workdir DIR [--step N]
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from atst_jax import distributed
from atst_jax.cli import ArgumentParser, OutputError, check_output
from atst_jax.errors import UserError
from atst_jax.optim import HFAdamWState
from atst_jax.sharding import ConfigError

log = logging.getLogger(__name__)


# --- train state <-> plain nested dicts -----------------------------------------------------------------
def to_pure(tree):
    """Replaces ``nnx.State`` / optimizer containers by plain nested dicts of arrays (what Orbax stores)."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    if isinstance(tree, HFAdamWState):
        return {"count": tree.count, "mu": to_pure(tree.mu), "nu": to_pure(tree.nu)}
    if isinstance(tree, dict):
        return {k: to_pure(v) for k, v in tree.items()}
    return tree


def from_pure(template, pure):
    """Inverse of ``to_pure`` given a template with the original containers (e.g. the abstract state)."""
    if isinstance(template, nnx.State):
        out = jax.tree.map(lambda x: x, template, is_leaf=lambda x: isinstance(x, nnx.Variable))
        nnx.replace_by_pure_dict(out, pure)
        return out
    if isinstance(template, HFAdamWState):
        return HFAdamWState(
            pure["count"], from_pure(template.mu, pure["mu"]), from_pure(template.nu, pure["nu"])
        )
    if isinstance(template, dict):
        return {k: from_pure(template[k], pure[k]) for k in template}
    return pure


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: restore places every array where the current mesh
    wants it, whatever mesh (or device count) wrote the checkpoint."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def trained_inputs(method) -> list[dict]:
    """The metadata's ``inputs`` entry: the crops ``method`` trains on (``Method.inputs()``, the contract), in
    its order, each ``{"name": str, "frames": int, "features": str}`` (``features``: the training feature set,
    ``atst_jax.features``). ``atst_jax.inference`` takes the longest as the encoder's trained crop."""
    return [
        {"name": str(c.name), "frames": int(c.frames), "features": str(c.features)} for c in method.inputs()
    ]


def run_metadata(mesh=None, method=None) -> dict:
    """The run metadata of a checkpoint (``meta``), without what the trainer adds per step. ``method``: the
    run's method, whose crops it records (``inputs``, :func:`trained_inputs`)."""
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "platform": jax.default_backend(),
        "versions": versions,
        **({"inputs": trained_inputs(method)} if method is not None else {}),
    }


class CheckpointRestoreError(UserError):
    """A checkpoint step that cannot be read (missing, empty or damaged files); the message is one line."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A run, or the step asked for, has no finished checkpoint (a ``FileNotFoundError`` too, for callers that
    treat it as a missing file)."""


class IncompatibleCheckpointError(ConfigError):
    """The workdir's checkpoint belongs to another run (another config or state structure)."""


# Config fields that may change when a run resumes: how long it runs, how often it logs and saves, where and on
# what mesh it runs, compute dtype and memory knobs. Every other field (model shapes, the method and its crops,
# optimizer, data, seed, batch) defines the run: a checkpoint saved under other values belongs to another run.
RESUMABLE_FIELDS = (
    "init_from",  # only read when a run starts
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.keep_every",
    "train.nonfinite",
    "train.max_skipped",
    "train.inject_nan_at_step",
    "train.grad_accum_steps",
    "train.chip",
    "train.fresh",
    "train.image_every",
    "mesh",
    "sharding_rules",
    "model.dtype",
    "model.remat",
    "model.scan_layers",
    "data.cache_dir",
    "data.records_dir",
    "data.worker_count",
    "probe",  # the frozen-encoder probe reads the state, never changes it
)


def _flatten_config(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """``["model.width: 128 -> 256", ...]``: the run-defining fields (outside ``RESUMABLE_FIELDS``) that both
    configs have and that differ. A field only one side has (added by newer code) is not compared."""
    a, b = _flatten_config(saved), _flatten_config(current)
    free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys()) if not free(k) and a[k] != b[k]]


def tree_differences(saved_tree, abstract_tree) -> list[str]:
    """Leaves whose path, shape or dtype differ between a checkpoint's state metadata and a state template."""

    def leaves(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype).name) for p, x in flat}

    theirs, ours = leaves(saved_tree), leaves(abstract_tree)
    out = []
    for k in sorted(theirs.keys() | ours.keys()):
        if k not in ours:
            out.append(f"{k} only in the checkpoint")
        elif k not in theirs:
            out.append(f"{k} missing from the checkpoint")
        elif theirs[k] != ours[k]:
            out.append(
                f"{k} is {theirs[k][1]}{list(theirs[k][0])} there, {ours[k][1]}{list(ours[k][0])} here"
            )
    return out


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of the innermost cause (TensorStore's own message names the file and byte range)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _silence_closed_loop_callbacks() -> None:
    """After a failed TensorStore read (a damaged step), Orbax closes its event loop while the reads of the
    other arrays are still in flight. Their completion callbacks then raise ``RuntimeError('Event loop is
    closed')`` in TensorStore's threads, and the abandoned read coroutines and tasks complain when collected;
    Python prints all of it as dozens of stray tracebacks after our one-line message. This drops exactly
    those (any other unraisable exception, task error or warning still gets through). Installed before every
    read; idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "_atst_quiet", False):
        return

    def hook(unraisable):
        e, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:  # an abandoned Orbax read
            return
        previous(unraisable)

    hook._atst_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_not_an_abandoned_orbax_read)
    warnings.filterwarnings("ignore", message=r"coroutine '_read_array\w*' was never awaited")


def _not_an_abandoned_orbax_read(record: logging.LogRecord) -> bool:
    """asyncio's "Task/Future exception was never retrieved" for a read Orbax abandoned: False (dropped)."""
    if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
        return True
    tb = record.exc_info[2]
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True


def _read_json(path):
    """A JSON item of a step, or a ``CheckpointRestoreError`` naming the file (empty / not JSON)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointRestoreError(
            f"{path.parent.name}/{path.name}: unreadable ({_first_line(e)})"
        ) from None
    if not text.strip():
        raise CheckpointRestoreError(f"{path.parent.name}/{path.name}: empty file")
    try:
        return json.loads(text)
    except ValueError as e:
        raise CheckpointRestoreError(f"{path.parent.name}/{path.name}: not JSON ({_first_line(e)})") from None


def check_step(step_dir, process_index: int | None = None, process_count: int | None = None) -> dict | None:
    """What every restore path checks before reading arrays, shared by the trainer and ``checkpoint list``:
    the commit metadata and the state's metadata exist and parse, and every JSON item (the Grain positions of
    each process, the config, the run metadata) is non-empty JSON. With ``process_index``/``process_count``
    the data position of that process must exist. Returns the saved config (or None); raises
    ``CheckpointRestoreError``."""
    if not (step_dir / "_CHECKPOINT_METADATA").exists():
        raise CheckpointRestoreError("_CHECKPOINT_METADATA missing (an unfinished save?)")
    _read_json(step_dir / "_CHECKPOINT_METADATA")
    if not (step_dir / "state" / "_METADATA").exists():
        raise CheckpointRestoreError("state/_METADATA missing")
    _read_json(step_dir / "state" / "_METADATA")
    data = step_dir / "data"
    if data.is_dir():
        for f in sorted(data.glob("process_*.json")):
            _read_json(f)
    for item in ("meta", "config"):
        if (step_dir / item / "metadata").exists():
            _read_json(step_dir / item / "metadata")
    if process_count is not None and data.is_dir():
        mine = data / f"process_{process_index}-of-{process_count}.json"
        if not mine.exists():
            names = sorted(f.name for f in data.glob("process_*.json"))
            raise IncompatibleCheckpointError(
                f"checkpoint {step_dir} holds data positions {names}, none for process {process_index} of "
                f"{process_count}: resume it with the process count that wrote it"
            )
    config = step_dir / "config" / "metadata"
    return _read_json(config) if config.exists() else None


def run_dir(workdir):
    """A run directory as a path object: ``gs://``/``s3://`` URLs (TPU pods write straight to a bucket)
    become ``etils.epath`` paths, which Orbax reads and writes; local paths become absolute."""
    text = str(workdir)
    if "://" in text:
        from etils import epath

        return epath.Path(text)
    return Path(text).absolute()


# Orbax splits the writing of a replicated array between its replicas (replica-parallel saving): each device
# slices out its part. Every slice is an op compiled per shape and device, so the first save of a model with
# many small replicated arrays (norms, biases, heads) on 8 devices compiled ~100 slices (7 s on XLA:CPU) —
# for parts of a few hundred bytes, where splitting saves nothing. Slices under this size are not split: one
# replica writes the whole array; large replicated arrays are still written in parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _write_small_replicated_arrays_whole() -> None:
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == MIN_REPLICA_SLICE_BYTES:
        return
    handler = ocp.type_handlers.ArrayHandler(
        # Orbax's default handler records per-array metadata in this store; keep it, so the format is the same.
        array_metadata_store=getattr(current, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
    )
    absl_log = logging.getLogger("absl")  # Orbax warns on stderr when a handler is replaced, as it is here
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_log.setLevel(level)


class Checkpointer:
    """Saves every ``save_every`` steps (plus forced saves), keeps the newest ``keep`` and every
    ``keep_period``-th step (0 = none)."""

    def __init__(
        self, workdir: str | Path, *, save_every: int, keep: int, keep_period: int = 0, async_save=True
    ):
        _silence_closed_loop_callbacks()
        _write_small_replicated_arrays_whole()
        self.directory = run_dir(workdir) / "checkpoints"
        self.save_every = max(1, save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            save_interval_steps=1,  # cadence is ours (Orbax would also save the first step of a run)
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state, data_iter=None, config=None, meta=None, *, force: bool = False) -> bool:
        if not (force or self.should_save(step)):
            return False
        if step in self.manager.all_steps() or (self.directory / str(step)).exists():
            # Never skip a save: this run resumed from an older step, so what sits at this number is not its own
            # (a damaged step, or another run's). It is kept, moved aside, and the new step written.
            self.set_aside([(step, "replaced")])
        items = {"state": ocp.args.StandardSave(to_pure(state))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            log.info("checkpoint for step %d started in %s", step, self.directory)
        return saved

    def saved_meta(self, step: int) -> dict:
        """The run metadata saved with ``step`` (``{}`` when the step has none or it is unreadable: a resume
        from it then goes on without what the metadata would have said, e.g. earlier compute totals)."""
        try:
            meta = json.loads((self.directory / str(step) / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def restore(self, step: int, abstract_state, shardings, data_iter=None):
        """Restores ``state`` (and the iterator in place) for ``step`` onto the given shardings."""
        target = _abstract(to_pure(abstract_state), to_pure(shardings))
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return from_pure(abstract_state, restored["state"])

    def compatibility(self, step: int, abstract_state, config: dict | None = None) -> list[str]:
        """What keeps ``step`` from being this run's: the differing run-defining config fields (when both
        configs are known) and the state leaves whose path, shape or dtype differ. Raises
        ``CheckpointRestoreError`` when the step cannot be read that far."""
        step_dir = self.directory / str(step)
        saved = check_step(step_dir, jax.process_index(), jax.process_count())
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - unreadable metadata: the step is damaged
            raise CheckpointRestoreError(f"state metadata unreadable ({_first_line(e)})") from None
        problems = config_differences(saved, config) if saved is not None and config is not None else []
        leaves = tree_differences(meta, to_pure(abstract_state))
        if leaves and not problems:  # the configs agree (or are unknown): name the leaves
            problems = leaves[:4] + ([f"{len(leaves) - 4} more leaves"] if len(leaves) > 4 else [])
        return problems

    def restore_latest(self, abstract_state, shardings, data_iter=None, config: dict | None = None):
        """``(step, state)`` from the newest step that restores cleanly, or ``(None, None)`` if there is none.

        A damaged step (truncated, empty or missing files) is skipped with a warning and older steps are tried
        in turn; the skipped ones are then moved aside (``set_aside``), so a later save at their number writes
        a fresh step instead of finding it taken. The newest readable step must belong to this run: if its
        saved config (``config``, the run's config as a plain dict) or its state structure differ, this raises
        ``IncompatibleCheckpointError`` naming the fields and touches nothing. The data iterator is restored
        together with the state it belongs to.
        """
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                problems = self.compatibility(step, abstract_state, config)
                if problems:
                    shown = "; ".join(problems[:6]) + (
                        f"; {len(problems) - 6} more" if len(problems) > 6 else ""
                    )
                    raise IncompatibleCheckpointError(
                        f"{self.directory.parent} holds another run: its checkpoint step {step} differs in {shown}. "
                        "Resume it with its own config, start over with --config.train.fresh=true (the old run "
                        "is moved to set_aside/, not deleted), or use another --workdir (with "
                        f"--config.init_from={self.directory.parent} to start from its parameters)"
                    )
                state = self.restore(step, abstract_state, shardings, data_iter)
            except CheckpointRestoreError as e:
                msg = str(e)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read/decode failure means this step is unusable
                msg = _first_line(e)
            else:
                self.set_aside([(s, "unreadable") for s in unreadable])
                return step, state
            unreadable.append(step)
            log.warning("checkpoint step %d is unreadable (%s); trying an older one", step, msg)
            print(
                f"warning: checkpoint step {step} is unreadable ({msg}); trying an older one", file=sys.stderr
            )
        self.set_aside([(s, "unreadable") for s in unreadable])
        return None, None

    def set_aside(self, steps: list[tuple[int, str]]) -> None:
        """Moves steps out of ``checkpoints/`` into ``WORKDIR/set_aside/<step>-<why>-<time>`` (kept, never
        deleted), so that Orbax neither restores them, counts them towards ``keep``, nor finds their step
        number taken. Process 0 moves; every process then rereads the directory."""
        if not steps:
            return
        self.manager.wait_until_finished()  # no save of this manager may be in flight while steps move
        if distributed.is_main():
            aside = self.directory.parent / "set_aside"
            aside.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step, why in steps:
                source = self.directory / str(step)
                if not source.exists():
                    continue
                target, k = aside / f"{step}-{why}-{stamp}", 1
                while target.exists():
                    target, k = aside / f"{step}-{why}-{stamp}.{k}", k + 1
                source.rename(target)
                print(
                    f"warning: checkpoint step {step} ({why}) moved to {target}", file=sys.stderr, flush=True
                )
        distributed.barrier("checkpoint_set_aside")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True on TPU when the platform announced a preemption (Orbax's multi-host sync point)."""
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 - not available on every platform
            return False

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


# --- read-only access (export, digests, init_from) -------------------------------------------------------
# ------------------------------------------------------------------------------------------------------
# The workdir lifecycle
# ------------------------------------------------------------------------------------------------------
def check_workdir(workdir) -> None:
    """One line, before anything is built, for a workdir that is a file or cannot be created or written (the
    check every tool makes of its output folder, ``cli.check_output``)."""
    if "://" in str(workdir):  # object stores: Orbax reports what it cannot write
        return
    try:
        check_output(workdir, "--workdir", directory=True)
    except OutputError as e:  # the trainer's bad-input error, as every other config problem
        raise ConfigError(str(e)) from None


def make_workdir(workdir) -> None:
    """Creates the workdir (after every config check passed, so a refused run leaves nothing behind) and
    proves it writable."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if "://" not in str(workdir):
            probe = workdir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable ({e.strerror or e})") from None


def set_aside_run(workdir):
    """``train.fresh``: moves the previous run's checkpoints, metrics and TensorBoard logs to
    ``WORKDIR/set_aside/run-<time>/`` (kept, never deleted). Returns that directory."""
    target = workdir / "set_aside" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    k = 1
    while target.exists():
        target, k = target.with_name(f"{target.name}.{k}"), k + 1
    if distributed.is_main():
        target.mkdir(parents=True)
        for name in ("checkpoints", "metrics.jsonl", "tensorboard"):
            if (workdir / name).exists():
                (workdir / name).rename(target / name)
    distributed.barrier("set_aside_run")
    return target


def resume_or_start(workdir, train_config, trainer, data_iter, run_config: dict, start, log=print):
    """The workdir lifecycle at start-up: ``(checkpointer, state)``.

    - **resume**: the newest checkpoint of this run (same config, same state tree) is restored, data position
      included;
    - **refuse**: a checkpoint of another config raises ``IncompatibleCheckpointError`` (one line naming the
      fields that differ), unless ``train.fresh``;
    - **fresh**: no checkpoint: ``start()`` gives the initial state;
    - **set aside**: with ``train.fresh``, another run's checkpoints, metrics and TensorBoard logs move to
      ``WORKDIR/set_aside/run-<time>/`` after ``start()`` (which may read them: ``init_from`` may point at
      the old run) and the run starts from step 0. Its own checkpoints resume as usual (requeue-safe).
    """
    t = train_config

    def checkpointer():
        return Checkpointer(
            workdir, save_every=t.ckpt_every, keep=t.keep_checkpoints, keep_period=t.keep_every
        )

    ckpt = checkpointer()
    foreign = None
    try:
        latest, state = ckpt.restore_latest(
            trainer.abstract_state, trainer.state_shardings, data_iter, run_config
        )
    except IncompatibleCheckpointError as e:
        if not t.get("fresh", False):
            ckpt.close()
            raise
        latest, state, foreign = None, None, e
    if state is not None:
        log(f"resumed from {ckpt.directory / str(latest)}")
        if t.get("fresh", False):
            log(
                "train.fresh: the checkpoints here are this run's own, so it resumes (requeue-safe); move "
                f"{ckpt.directory} away to start over"
            )
        return ckpt, state
    try:
        state = start()
    except BaseException:
        ckpt.close()
        raise
    if foreign is not None:
        ckpt.close()
        moved = set_aside_run(workdir)
        ckpt = checkpointer()
        log(f"train.fresh: the previous run in {workdir} was moved to {moved}; starting from step 0")
    return ckpt, state


def _read_manager(workdir: str | Path) -> ocp.CheckpointManager:
    _silence_closed_loop_callbacks()
    directory = run_dir(workdir) / "checkpoints"
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{workdir} has no checkpoints (expected {directory})")
    return ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )


def _missing_step(workdir, step: int | None, have: list[int]) -> str:
    if not have:
        return f"{workdir} has no finished checkpoint yet"
    return f"{workdir} has no checkpoint at step {step}; its checkpoints are at steps {', '.join(map(str, have))}"


def read_checkpoint(workdir: str | Path, step: int | None = None):
    """``(step, config_dict, state)`` of a run's checkpoint, state as nested dicts of NumPy arrays.

    Needs no model, mesh or iterator: what export, digests and ``init_from`` use. ``step=None`` takes the
    newest checkpoint.
    """
    manager = _read_manager(workdir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointNotFoundError(_missing_step(workdir, step, sorted(manager.all_steps())))
        # Restore onto this process's first device whatever mesh wrote the checkpoint (a read-only tool may
        # run with fewer devices than the training job had).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        meta = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        items = {"state": ocp.args.StandardRestore(target)}
        if (manager.directory / str(step) / "config").is_dir():  # runs save it; bare state saves may not
            items["config"] = ocp.args.JsonRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (FileNotFoundError, UserError):
        raise
    except Exception as e:  # noqa: BLE001 - truncated, empty or missing files: one line, not a traceback
        raise CheckpointRestoreError(
            f"checkpoint step {step} in {workdir} is unreadable ({_first_line(e)})"
        ) from None
    finally:
        manager.close()
    state = jax.tree.map(lambda x: np.asarray(x), restored["state"])
    return step, restored.get("config") if "config" in items else None, state


def read_meta(workdir, step: int) -> dict:
    """The run metadata saved with ``step`` of a run (``{}`` when the step has none or it is unreadable)."""
    try:
        meta = json.loads((run_dir(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def recorded_inputs(workdir, step: int) -> list[dict] | None:
    """The crops ``step`` of a run records (its metadata's ``inputs``, :func:`trained_inputs`), or None for a
    checkpoint written before the entry existed (inference then rebuilds the method from the saved config)."""
    inputs = read_meta(workdir, step).get("inputs")
    return inputs if isinstance(inputs, list) and inputs else None


def params_digest(state) -> str:
    """SHA-256 over the student and teacher parameters: sorted key paths, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for part in ("params", "teacher"):
        flat = jax.tree_util.tree_flatten_with_path(state[part])[0]
        for path, value in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
            a = np.ascontiguousarray(np.asarray(value))
            h.update(f"{part}{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def list_steps(workdir: str | Path) -> list[tuple[str, str]]:
    """``[(name, status)]`` for everything under ``checkpoints/``: good, incomplete (an unfinished temporary
    directory or a step missing its items), damaged (present but unreadable: the checks of ``check_step``,
    which the trainer applies before restoring, then a full read of the state) or non-finite; then the steps
    moved to ``set_aside/`` (``set aside``)."""
    directory = run_dir(workdir) / "checkpoints"
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{workdir} has no checkpoints")
    rows = []
    for p in sorted(
        directory.iterdir(), key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0)
    ):
        if not p.is_dir():
            continue
        if not p.name.isdigit():
            rows.append((p.name, "incomplete"))
            continue
        if not (p / "state").is_dir() or not (p / "_CHECKPOINT_METADATA").exists():
            rows.append((p.name, "incomplete"))
            continue
        try:
            check_step(p)
            step, _, state = read_checkpoint(workdir, int(p.name))
            bad = [
                k
                for k in ("params", "teacher")
                if not all(np.isfinite(x).all() for x in jax.tree.leaves(state[k]))
            ]
            rows.append((p.name, "good" if not bad else "non-finite"))
        except CheckpointRestoreError as e:
            reason = str(e).split(" is unreadable (", 1)[-1].rstrip(")")  # read_checkpoint's own wrapping
            rows.append((p.name, f"damaged ({reason})"))
        except Exception as e:  # noqa: BLE001
            rows.append((p.name, f"damaged ({type(e).__name__}: {_first_line(e, 120)})"))
    aside = run_dir(workdir) / "set_aside"
    if aside.is_dir():
        rows += [(f"set_aside/{p.name}", "set aside") for p in sorted(aside.iterdir(), key=lambda p: p.name)]
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m atst_jax.checkpoint")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="list checkpoint steps with their state")
    p_list.add_argument("--workdir", required=True)
    p_dig = sub.add_parser("digest", help="SHA-256 over student and teacher parameters")
    p_dig.add_argument("--workdir", required=True)
    p_dig.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    # Orbax logs absl warnings on every read-only open (read_only options, items not restored): noise here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        if args.cmd == "list":
            for name, status in list_steps(args.workdir):
                print(f"{name}\t{status}")
        else:
            step, _, state = read_checkpoint(args.workdir, args.step)
            print(f"step {step} sha256 {params_digest(state)}")
    except (OSError, CheckpointRestoreError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
