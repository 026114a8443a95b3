"""Orbax checkpoints of the whole training state, the Grain iterator and the config.

One composite checkpoint per saved step under ``WORKDIR/checkpoints/<step>/``:
``state`` (step, student/teacher parameters and BN buffers, optimizer state, rng key — as plain nested dicts
of arrays, no pickle), ``data`` (the Grain iterator position, one JSON per process) and ``config`` (JSON).
Saves are asynchronous; ``wait()`` blocks until the last one has committed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grain
import jax
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
    wants it, whatever mesh wrote the checkpoint."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, workdir: str | Path, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.save_every = max(1, save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, save_every),
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
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iter=None, config=None, *, force: bool = False) -> bool:
        # Our own cadence: Orbax would also save the very first step of a run.
        if not (force or step % self.save_every == 0):
            return False
        items = {"state": ocp.args.StandardSave(to_pure(state))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
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

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
