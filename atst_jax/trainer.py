"""The trainer library: the data a run reads, the train state and its shardings, the jitted sharded step
(gradient accumulation, the non-finite guard, the EMA teacher) and the loop that runs it with hooks.

Read top to bottom: "Data" → "State and step" (``Trainer``) → "Loop" (``Loop``: the step, the progress line a
step late, the non-finite policy, and hooks that run every N steps: checkpoints, pictures, probes). The run
script that wires a config into these is ``atst_jax/train.py``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from atst_jax import distributed, features, methods, optim
from atst_jax import sharding as shd
from atst_jax.data import pipeline, records
from atst_jax.metrics import Progress, fetch
from atst_jax.sharding import ConfigError


# ======================================================================================================
# Data
# ======================================================================================================
def check_data(config, method: methods.Method, files) -> str:
    """Refuses, before compiling, data the method cannot train on: another feature set than its crops want (or
    than the encoder's mel bins), or crops longer than every clip (it would train on padding; a method that
    counts padding as audio may exceed the longest clip by a tenth). Returns the dataset's feature-set name."""
    try:
        name = records.read_features(files)
    except ValueError as e:  # unreadable metadata or an unknown front end: one line, not a traceback
        raise ConfigError(f"data: {e}") from None
    fs = features.get(name)
    for crop in method.inputs():
        if crop.features != name:
            raise ConfigError(
                f"{config.method} wants {crop.features!r} features for its {crop.name!r} crop, but the data "
                f"was prepared with {name!r} ({fs.description})"
            )
    if fs.n_mels != config.model.n_mels:
        raise ConfigError(
            f"model.n_mels={config.model.n_mels} but the data has {fs.n_mels} mel bins ({name})"
        )
    source = pipeline.make_source(files)
    probe = min(len(source), 64)
    longest = max(int(records.decode_example(source[i])["length"]) for i in range(probe))
    crop = max(method.inputs(), key=lambda c: c.frames)
    # A method that counts a short clip's padding as audio, as the official data code does, may take crops a
    # little longer than every clip (EAT: 10 s AudioSet clips, 998 frames of its 16 kHz fbank, padded to 1024).
    if crop.frames > longest and not (method.pad_is_signal() and longest >= 0.9 * crop.frames):
        sec = (longest - 1) * fs.hop_length / fs.sample_rate
        raise ConfigError(
            f"the {crop.name!r} crop of {config.method} ({crop.frames} frames) is longer than the clips in the "
            f"data (longest of the first {probe}: {longest} frames ≈ {sec:.2f} s)"
        )
    return name


def data_files(config, features_name: str | None = None, method: methods.Method | None = None) -> list[str]:
    """The record shards of the run. The embedded dataset is built with ``features_name``, by default the
    feature set of the method's crops (the contract: ``Method.inputs()``), so e.g. ASiT gets Kaldi fbanks."""
    d = config.data
    if d.source == "embedded":
        if features_name is None:
            method = method if method is not None else methods.build(config)
            wanted = sorted({crop.features for crop in method.inputs()})
            if len(wanted) != 1:
                raise ConfigError(
                    f"{config.method}: its crops want several feature sets {wanted}; one dataset has one"
                )
            (features_name,) = wanted
        cache = d.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "atst_jax", "embedded")
        # Process 0 builds; the others then find it finished (shared file system) or, on hosts with their
        # own disks, build the same bytes locally. Never two builders of one directory at once.
        if distributed.is_main():
            pipeline.ensure_embedded_dataset(cache, num_clips=d.num_clips, seed=0, features=features_name)
        distributed.barrier("embedded_data")
        return pipeline.ensure_embedded_dataset(cache, num_clips=d.num_clips, seed=0, features=features_name)
    if d.source == "records":
        if not d.records_dir:
            raise ConfigError("data.source=records needs data.records_dir")
        files = records.list_record_files(d.records_dir)
        if not files:
            raise ConfigError(f"no ArrayRecord shards found in data.records_dir={d.records_dir}")
        return files
    raise ConfigError(f"data.source={d.source!r}: choose embedded or records")


def make_data_iterator(config, method: methods.Method, files, feature_set: str):
    per_host = config.train.global_batch // jax.process_count()
    try:
        ds = pipeline.make_dataset(
            files,
            seed=config.seed,
            crops=[(c.name, c.frames) for c in method.inputs()],
            per_host_batch=per_host,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            features=feature_set,
            subset=int(config.data.subset),
            subset_seed=int(config.data.subset_seed),
            roll_prob=method.roll_prob(),
        )
    except ValueError as e:  # e.g. a subset larger than the data
        raise ConfigError(f"data: {e}") from None
    return pipeline.make_iterator(ds, worker_count=config.data.worker_count)


# ======================================================================================================
# State and step
# ======================================================================================================
class Trainer:
    """Holds what the jitted functions close over: graph definitions, the optimizer, the method.

    The train state is a dict: ``step``, student ``params`` and BN ``stats``, ``teacher`` parameters and
    ``teacher_stats``, ``opt`` (AdamW moments), the method's own ``method`` state (e.g. DINO centres; ``{}`` for
    the ATST methods) and the ``rng`` key data."""

    def __init__(self, config, mesh, method: methods.Method | None = None):
        self.config = config
        self.mesh = mesh
        self.rules = shd.rules_from_config(config.sharding_rules)
        # The method ``check_config`` built (passed down so a run builds it once), or a fresh one.
        self.method = method if method is not None else methods.build(config)
        self.enc_cfg = self.method.enc_cfg
        o, t = config.optim, config.train
        self.peak_lr = optim.peak_lr(o.base_lr, t.global_batch)
        self.lr_fn = lambda s: optim.warmup_cosine(s, self.peak_lr, o.final_lr, o.warmup_steps, t.steps)
        self.wd_fn = optim.weight_decay_schedule(o, t.steps)
        self.ema_fn = self.method.ema_momentum
        self.inject_nan_at = int(t.get("inject_nan_at_step", -1))
        self.accum = int(t.get("grad_accum_steps", 1))

        # Abstract model: shapes and logical axes without allocating anything.
        student, teacher, _ = nnx.eval_shape(lambda: self.method.init(jax.random.key(0)))
        self.student_def, abs_params, abs_stats = nnx.split(student, nnx.Param, nnx.BatchStat)
        self.teacher_def, abs_tparams, abs_tstats = nnx.split(teacher, nnx.Param, nnx.BatchStat)
        self.tx = optim.make_optimizer(o, self.lr_fn, self.wd_fn, optim.decay_mask(abs_params))
        self.abstract_state = jax.eval_shape(self._init_state, jax.random.key_data(jax.random.key(0)))
        self.state_shardings = self._shardings(abs_params, abs_stats, abs_tparams, abs_tstats)
        gb = t.global_batch
        self.input_shapes = self.method.input_shapes(gb)
        self.batch_shardings = {
            k: shd.batch_sharding(mesh, self.rules, len(shape)) for k, (shape, _) in self.input_shapes.items()
        }
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_params))
        self.step_flops = self.method.step_flops(gb)
        self.num_encoder_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_params["encoder"]))

    def _init_state(self, rng_data):
        rng = jax.random.wrap_key_data(rng_data)
        student, teacher, method_state = self.method.init(jax.random.fold_in(rng, 0))
        _, params, stats = nnx.split(student, nnx.Param, nnx.BatchStat)
        _, tparams, tstats = nnx.split(teacher, nnx.Param, nnx.BatchStat)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "stats": stats,
            "teacher": tparams,
            "teacher_stats": tstats,
            "opt": self.tx.init(params),
            "method": method_state,
            "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
        }

    def _shardings(self, params, stats, tparams, tstats):
        mesh, rules = self.mesh, self.rules
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        p = shd.state_shardings(params, mesh, rules)
        # Teacher and optimizer moments shard exactly like the student, so the EMA and the update are local.
        return {
            "step": rep,
            "params": p,
            "stats": shd.state_shardings(stats, mesh, rules),
            "teacher": shd.state_shardings(tparams, mesh, rules),
            "teacher_stats": shd.state_shardings(tstats, mesh, rules),
            "opt": optim.HFAdamWState(rep, p, p),
            "method": shd.state_shardings(self.abstract_state["method"], mesh, rules),
            "rng": rep,
        }

    def init(self, seed: int):
        init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        return init(jax.random.key_data(jax.random.key(seed)))

    # ==================================================================================================
    # Update step
    # ==================================================================================================
    def _loss_and_grads(self, params, stats, teacher, tstats, method_state, batch, key, step):
        def loss_fn(params):
            student = nnx.merge(self.student_def, params, stats, copy=True)
            teacher_m = nnx.merge(self.teacher_def, teacher, tstats, copy=True)
            loss, metrics, new_mstate = self.method.loss(student, teacher_m, method_state, batch, key, step)
            new_stats = nnx.state(student, nnx.BatchStat)
            new_tstats = nnx.state(teacher_m, nnx.BatchStat)
            return loss, (metrics, new_stats, new_tstats, new_mstate)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def _accumulate(self, state, batch, key):
        """Mean loss and gradients over ``accum`` microbatches, run one after another under ``lax.scan`` so only
        one microbatch's activations are live. Microbatch j holds examples j, j+k, j+2k, … of the global batch:
        with the batch sharded on its leading axis that split is local to every device (no resharding).

        Equal to the full-batch step for losses that are means over examples; for the ATST methods the
        BatchNorm statistics (and the masked-token normalisation) are per microbatch, as with gradient
        accumulation in PyTorch, and the BN buffers and the method state are updated once per microbatch."""
        k = self.accum
        spec = {name: s.spec for name, s in self.batch_shardings.items()}

        def split(name, x):
            x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
            target = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, *spec[name]))
            return jax.lax.with_sharding_constraint(x, target)

        micro = {name: split(name, x) for name, x in batch.items()}
        params, step = state["params"], state["step"]

        def body(carry, inputs):
            stats, tstats, mstate, grad_sum, loss_sum, metric_sum = carry
            j, mb = inputs
            (loss, (metrics, stats, tstats, mstate)), grads = self._loss_and_grads(
                params, stats, state["teacher"], tstats, mstate, mb, jax.random.fold_in(key, j), step
            )
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            metric_sum = jax.tree.map(jnp.add, metric_sum, metrics)
            return (stats, tstats, mstate, grad_sum, loss_sum + loss, metric_sum), None

        zeros_like = lambda tree: jax.tree.map(jnp.zeros_like, tree)
        first_metrics = jax.eval_shape(
            lambda: self._loss_and_grads(
                params,
                state["stats"],
                state["teacher"],
                state["teacher_stats"],
                state["method"],
                jax.tree.map(lambda x: x[0], micro),
                key,
                step,
            )[0][1][0]
        )
        carry = (
            state["stats"],
            state["teacher_stats"],
            state["method"],
            zeros_like(params),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first_metrics),
        )
        (stats, tstats, mstate, grad_sum, loss_sum, metric_sum), _ = jax.lax.scan(
            body, carry, (jnp.arange(k), micro)
        )
        mean = lambda x: x / k
        metrics = jax.tree.map(mean, metric_sum)
        return mean(loss_sum), metrics, stats, tstats, mstate, jax.tree.map(mean, grad_sum)

    def train_step(self, state, batch):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        if self.accum == 1:
            (loss, (metrics, stats, tstats, mstate)), grads = self._loss_and_grads(
                state["params"],
                state["stats"],
                state["teacher"],
                state["teacher_stats"],
                state["method"],
                batch,
                key,
                step,
            )
        else:
            loss, metrics, stats, tstats, mstate, grads = self._accumulate(state, batch, key)
        if self.inject_nan_at >= 0:  # fault injection for tests: a NaN loss (and gradients) at one step
            poison = jnp.where(step + 1 == self.inject_nan_at, jnp.nan, 1.0)  # 1-based, as logged
            loss = loss * poison
            grads = jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optax.tree.norm(grads)  # before any clipping: the monitor and the finiteness check
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        momentum = self.ema_fn(step)
        teacher = ema_update(state["teacher"], params, momentum, self.method.ema_covers)
        # Non-finite guard: a step whose loss or gradient is not finite leaves the state untouched (only the
        # counter moves), so non-finite values never reach the parameters, the method state or a checkpoint.
        # The host reads ``finite`` one step late and halts or counts skips (train.nonfinite).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = dict(params=params, stats=stats, teacher=teacher, teacher_stats=tstats, opt=opt, method=mstate)
        old = {k: state[k] for k in new}
        kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = dict(metrics, loss=loss)
        metrics.update(
            lr=self.lr_fn(step),
            wd=self.wd_fn(step),
            ema=momentum,
            grad_norm=grad_norm,
            param_norm=optax.tree.norm(kept["params"]),
            finite=finite,
        )
        new_state = dict(kept, step=step + 1, rng=state["rng"])
        return new_state, metrics

    def jit_pictures(self):
        """``(titles, fn)``: ``fn(rng, step, batch)`` → the method's pictures of the first clip for the step
        ``step`` (0-based) that ran on ``batch`` with the run's ``rng``: the same key the step derived, so the
        same views and masks. With gradient accumulation: microbatch 0 (rows ``0::k``) and its key."""
        titles: list[str] = []

        def fn(rng, step, batch):
            key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
            if self.accum > 1:
                batch = {name: x[0 :: self.accum] for name, x in batch.items()}
                key = jax.random.fold_in(key, 0)
            with shd.activation_sharding(self.mesh, self.rules):
                pics = self.method.pictures(batch, key, step)
            titles[:] = [t for t, _, _ in pics]
            return [(spec, overlay) for _, spec, overlay in pics]

        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return titles, jax.jit(fn, out_shardings=replicated)

    def _step_with_activation_sharding(self, state, batch):
        with shd.activation_sharding(self.mesh, self.rules):  # active while jit traces the step
            return self.train_step(state, batch)

    def abstract_step_inputs(self):
        """``(state, batch)`` as sharded ``ShapeDtypeStruct``s: what ``jit_train_step().lower`` needs to
        compile the step ahead of time (the planner, cost and memory tests) without allocating anything."""
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )
        batch = {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_shardings[k])
            for k, (shape, dtype) in self.input_shapes.items()
        }
        return state, batch

    def synthetic_batch(self, seed: int = 0):
        """A host batch of the method's inputs: uniform random log-mels in [-1, 1), full lengths (bench)."""
        rng = np.random.default_rng(seed)
        gb, n_mels = self.config.train.global_batch, self.enc_cfg.n_mels
        out = {}
        for crop in self.method.inputs():
            out[crop.name] = rng.uniform(-1, 1, (gb, n_mels, crop.frames)).astype(np.float32)
            out[crop.length_key] = np.full((gb,), crop.frames, np.int32)
        return out

    def jit_train_step(self):
        return jax.jit(
            self._step_with_activation_sharding,
            in_shardings=(self.state_shardings, self.batch_shardings),
            # Metrics replicated, so every process can read them without a cross-host gather.
            out_shardings=(
                self.state_shardings,
                jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()),
            ),
            donate_argnums=(0,),
        )


def ema_update(teacher, student_params, momentum, covers):
    """``teacher ← m·teacher + (1−m)·student`` on the covered sub-modules (same tree on both sides)."""
    source = nnx.State({name: student_params.raw_mapping[name] for name in covers})
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, source)


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient stopped the run (train.nonfinite=halt, or too many skips)."""


# ======================================================================================================
# Loop
# ======================================================================================================
@dataclasses.dataclass
class Hook:
    """``fn(loop, step, state, batch)`` after every ``every``-th step (1-based, as logged)."""

    fn: Callable
    every: int = 1


class Loop:
    """Runs the jitted step over the data iterator until ``total`` steps or a stop request, with hooks.

    After each step, in order: the previous step's metrics are read (one step late, so the host never waits on
    the device), checked for finiteness (``nonfinite``: ``halt`` raises ``NonFiniteError``; ``skip`` counts up
    to ``max_skipped`` skipped updates — the step left the state untouched) and logged by ``progress``; then
    ``stopping`` is set when ``should_stop(step)``; then the hooks run in the order they were added. A hook
    that needs the step's own line first (a checkpoint, a probe) calls ``loop.flush()``. After a stop request
    the loop ends at that step boundary, once its hooks have run.
    """

    def __init__(
        self,
        step_fn,
        data_iter,
        batch_shardings: dict,
        progress: Progress,
        writer,
        *,
        total: int,
        log_every: int,
        nonfinite: str = "halt",
        max_skipped: int = 0,
        should_stop: Callable[[int], bool] = lambda step: False,
        checkpoint_steps: Callable[[], list[int]] = list,
    ):
        self.step_fn, self.data_iter, self.batch_shardings = step_fn, data_iter, batch_shardings
        self.progress, self.writer = progress, writer
        self.total, self.log_every = total, log_every
        self.nonfinite, self.max_skipped = nonfinite, max_skipped
        self.should_stop, self.checkpoint_steps = should_stop, checkpoint_steps
        self.hooks: list[Hook] = []
        self.pending = None  # (step, metrics) not yet logged
        self.last = {"step": None, "loss": float("nan")}  # the last logged step
        self.skipped = 0
        self.stopping = False

    def add_hook(self, fn, every: int = 1) -> None:
        self.hooks.append(Hook(fn, max(int(every), 1)))

    def _check_finite(self, step_done, metrics) -> None:
        if bool(fetch(metrics["finite"])):
            return
        if self.nonfinite == "skip" and self.skipped < self.max_skipped:
            self.skipped += 1
            print(
                f"warning: non-finite loss or gradient at step {step_done}: update skipped "
                f"({self.skipped}/{self.max_skipped})",
                file=sys.stderr,
                flush=True,
            )
            return
        good = [s for s in self.checkpoint_steps() if s < step_done]
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step_done} (train.nonfinite={self.nonfinite}); "
            f"last checkpoint: {good[-1] if good else 'none'}"
        )

    def flush(self, force: bool = False) -> None:
        """The pending step's line (after its finite check), if one is pending."""
        if self.pending is not None:
            self._check_finite(*self.pending)
            logged = self.progress.maybe_log(*self.pending, self.writer, self.log_every, force=force)
            self.last = logged or self.last
            self.pending = None

    def run(self, state, step: int):
        """Steps from ``step`` to ``total`` (or a stop); returns ``(state, step)``. The last line is flushed."""
        self.last["step"] = step
        while step < self.total:
            waited = time.perf_counter()
            host = next(self.data_iter)
            batch = {k: pipeline.to_global_batch({k: host[k]}, s)[k] for k, s in self.batch_shardings.items()}
            self.progress.data_wait += time.perf_counter() - waited
            state, metrics = self.step_fn(state, batch)
            step += 1
            self.flush()
            self.pending = (step, metrics)
            self.stopping = self.should_stop(step)
            for hook in self.hooks:
                if step % hook.every == 0:
                    hook.fn(self, step, state, batch)
            if self.stopping:
                break
        self.flush(force=True)
        return state, step
