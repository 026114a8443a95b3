"""Orbax checkpoints of the whole training state, the Grain iterator, the config and run metadata.

One composite checkpoint per saved step under ``WORKDIR/checkpoints/<step>/``:

- ``state``: step, student/teacher parameters and BN buffers, optimizer state, rng key — plain nested dicts of
  arrays (Orbax's tensorstore format; nothing on any load path uses pickle);
- ``data``: the Grain iterator position (one JSON per process);
- ``config``: the run's config (JSON); ``meta``: mesh, device/process counts, library versions.

Saves are asynchronous; Orbax writes each step into a temporary directory and renames it only once every
item is complete, so a crash mid-save leaves no step that looks finished, and old steps are deleted only
after a newer one has committed. A step whose files were damaged later (truncated, deleted) fails to
restore: ``restore_latest`` then warns and falls back to the previous step.

CLI::

    python -m atst_jax.checkpoint list   --workdir DIR
    python -m atst_jax.checkpoint digest --workdir DIR [--step N]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from atst_jax.optim import HFAdamWState

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


def run_metadata(mesh=None) -> dict:
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
    }


class CheckpointRestoreError(RuntimeError):
    pass


def run_dir(workdir):
    """A run directory as a path object: ``gs://``/``s3://`` URLs (TPU pods write straight to a bucket)
    become ``etils.epath`` paths, which Orbax reads and writes; local paths become absolute."""
    text = str(workdir)
    if "://" in text:
        from etils import epath

        return epath.Path(text)
    return Path(text).absolute()


class Checkpointer:
    """Saves every ``save_every`` steps (plus forced saves), keeps the newest ``keep`` and every
    ``keep_period``-th step (0 = none)."""

    def __init__(
        self, workdir: str | Path, *, save_every: int, keep: int, keep_period: int = 0, async_save=True
    ):
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
        if step in self.manager.all_steps():
            return False
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

    def restore(self, step: int, abstract_state, shardings, data_iter=None):
        """Restores ``state`` (and the iterator in place) for ``step`` onto the given shardings."""
        target = _abstract(to_pure(abstract_state), to_pure(shardings))
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return from_pure(abstract_state, restored["state"])

    def restore_latest(self, abstract_state, shardings, data_iter=None):
        """``(step, state)`` from the newest step that restores cleanly, or ``(None, None)`` if there is none.

        A damaged newest step (truncated or missing files) is skipped with a warning; older steps are tried in
        turn. The data iterator is restored together with the state it belongs to.
        """
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state, shardings, data_iter)
            except Exception as e:  # noqa: BLE001 - any read/decode failure means this step is unusable
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("checkpoint step %d is unreadable (%s); trying an older one", step, msg[:300])
                print(
                    f"warning: checkpoint step {step} is unreadable ({msg[:200]}); trying an older one",
                    file=sys.stderr,
                    flush=True,
                )
        return None, None

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
def _read_manager(workdir: str | Path) -> ocp.CheckpointManager:
    directory = run_dir(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {directory})")
    return ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )


def read_checkpoint(workdir: str | Path, step: int | None = None):
    """``(step, config_dict, state)`` of a run's checkpoint, state as nested dicts of NumPy arrays.

    Needs no model, mesh or iterator: what export, digests and ``init_from`` use. ``step=None`` takes the
    newest checkpoint.
    """
    manager = _read_manager(workdir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {workdir} (have {sorted(manager.all_steps())})"
            )
        # Restore onto this process's first device whatever mesh wrote the checkpoint (a read-only tool may
        # run with fewer devices than the training job had).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        meta = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        items = {"state": ocp.args.StandardRestore(target)}
        if (manager.directory / str(step) / "config").is_dir():  # runs save it; bare state saves may not
            items["config"] = ocp.args.JsonRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    finally:
        manager.close()
    state = jax.tree.map(lambda x: np.asarray(x), restored["state"])
    return step, restored.get("config") if "config" in items else None, state


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
    directory or a step missing its items) or damaged (present but unreadable)."""
    directory = run_dir(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir}")
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
            step, _, state = read_checkpoint(workdir, int(p.name))
            bad = [
                k
                for k in ("params", "teacher")
                if not all(np.isfinite(x).all() for x in jax.tree.leaves(state[k]))
            ]
            rows.append((p.name, "good" if not bad else "non-finite"))
        except Exception as e:  # noqa: BLE001
            rows.append((p.name, f"damaged ({type(e).__name__})"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atst_jax.checkpoint")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="list checkpoint steps with their state")
    p_list.add_argument("--workdir", required=True)
    p_dig = sub.add_parser("digest", help="SHA-256 over student and teacher parameters")
    p_dig.add_argument("--workdir", required=True)
    p_dig.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "list":
            for name, status in list_steps(args.workdir):
                print(f"{name}\t{status}")
        else:
            step, _, state = read_checkpoint(args.workdir, args.step)
            print(f"step {step} sha256 {params_digest(state)}")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
