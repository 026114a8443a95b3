"""Pretraining loop: mesh, state, jitted sharded step, loop, logging, checkpoints.

    python -m atst_jax.train --config configs/atst_frame.py:tiny --workdir /tmp/run [--config.train.steps=20]

Read top to bottom: "Config checks" → "Set up mesh" → "Data" → "Build state" → "Update step" → "Loop".
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from atst_jax import distributed, features, methods, optim
from atst_jax import sharding as shd
from atst_jax.checkpoint import (
    Checkpointer,
    CheckpointRestoreError,
    IncompatibleCheckpointError,
    from_pure,
    read_checkpoint,
    run_dir,
    run_metadata,
    to_pure,
)
from atst_jax.data import pipeline, records
from atst_jax.flops import CHIPS, chip_from_device
from atst_jax.models import collapse
from atst_jax.models.encoder import FrameAST
from atst_jax.sharding import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/atst_frame.py:tiny")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard logs"
)


# ======================================================================================================
# Config checks (all before anything is compiled)
# ======================================================================================================
def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:variant]`` the way ``config_flags`` does, for programmatic use."""
    import importlib.util

    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec}: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_atst_config", path)
    if module_spec is None:
        raise ConfigError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except (ValueError, KeyError) as e:  # e.g. an unknown variant
        raise ConfigError(f"--config {spec}: {str(e).strip(chr(39))}") from None
    except Exception as e:  # noqa: BLE001 - a broken config file: its error, on one line
        raise ConfigError(f"--config {spec}: {type(e).__name__}: {e}") from None


def check_config(config, num_devices: int, process_count: int = 1) -> methods.Method:
    """Raises ``ConfigError`` (one line) for configs that cannot run; returns the built method."""
    mesh_sizes = shd.mesh_shape(config.mesh, num_devices)
    rules = shd.rules_from_config(config.sharding_rules)
    sizes = dict(zip(shd.MESH_AXES, mesh_sizes, strict=True))
    names = shd.batch_axes(rules)
    dp = shd.data_parallel_size(sizes, rules)
    gb = config.train.global_batch
    if gb <= 0:
        raise ConfigError(f"train.global_batch={gb} must be positive")
    if gb % dp:
        raise ConfigError(
            f"train.global_batch={gb} is not divisible by the data-parallel size {dp} "
            f"(mesh {sizes}, batch sharded over {names})"
        )
    if gb % process_count:
        raise ConfigError(f"train.global_batch={gb} is not divisible by the process count {process_count}")
    accum = int(config.train.get("grad_accum_steps", 1))
    if accum < 1 or gb % accum or (gb // accum) % dp:
        raise ConfigError(
            f"train.grad_accum_steps={accum}: the global batch {gb} must split into {accum} microbatches "
            f"that are each divisible by the data-parallel size {dp}"
        )
    chip = config.train.get("chip", "")
    if chip and chip not in CHIPS:
        raise ConfigError(f"train.chip={chip!r}: choose one of {', '.join(CHIPS)} (or '' to detect)")
    m = config.model
    if m.width % m.heads:
        raise ConfigError(f"model.width={m.width} is not divisible by model.heads={m.heads}")
    if m.remat not in ("none", "full", "save_dots"):
        raise ConfigError(f"model.remat={m.remat!r}: choose none, full or save_dots")
    if m.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={m.dtype!r}: choose float32 or bfloat16")
    optim.check_config(config.optim)
    method = methods.build(config)
    # The token rule belongs to the encoder's patch stem; an abstract encoder answers it without allocating.
    encoder = nnx.eval_shape(lambda: FrameAST(method.enc_cfg, rngs=nnx.Rngs(0)))
    for crop in method.inputs():
        if crop.frames < m.patch_w:
            raise ConfigError(
                f"the {crop.name!r} crop of {config.method} has {crop.frames} frames: crop lengths (the "
                f"*_seconds fields of config.{config.method}) must be positive and at least one patch long"
            )
        tokens = encoder.num_tokens(crop.frames)
        if tokens + 1 > m.num_pos:
            raise ConfigError(
                f"the {crop.name!r} crop of {config.method} ({crop.frames} frames) gives {tokens} tokens, more "
                f"than the {m.num_pos - 1} positional slots of the encoder (model.num_pos={m.num_pos})"
            )
    if config.train.steps <= 0:
        raise ConfigError(f"train.steps={config.train.steps} must be positive")
    if config.optim.warmup_steps >= config.train.steps:
        # Not an error for short demo runs: the schedule then never leaves warm-up. Warn only.
        logging.warning(
            "optim.warmup_steps=%d >= train.steps=%d", config.optim.warmup_steps, config.train.steps
        )
    return method


def check_data(config, method: methods.Method, files) -> str:
    """Refuses, before compiling, data the method cannot train on: another feature set than its crops want (or
    than the encoder's mel bins), or crops longer than every clip (it would train on padding). Returns the
    dataset's feature-set name."""
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
    if crop.frames > longest:
        sec = (longest - 1) * fs.hop_length / fs.sample_rate
        raise ConfigError(
            f"the {crop.name!r} crop of {config.method} ({crop.frames} frames) is longer than the clips in the "
            f"data (longest of the first {probe}: {longest} frames ≈ {sec:.2f} s)"
        )
    return name


# ======================================================================================================
# Data
# ======================================================================================================
def data_files(config, features_name: str | None = None) -> list[str]:
    """The record shards of the run. The embedded dataset is built with ``features_name``, by default the
    feature set of the method's crops (the contract: ``Method.inputs()``), so e.g. ASiT gets Kaldi fbanks."""
    d = config.data
    if d.source == "embedded":
        if features_name is None:
            wanted = sorted({crop.features for crop in methods.build(config).inputs()})
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
        )
    except ValueError as e:  # e.g. a subset larger than the data
        raise ConfigError(f"data: {e}") from None
    return pipeline.make_iterator(ds, worker_count=config.data.worker_count)


# ======================================================================================================
# Build state
# ======================================================================================================
class Trainer:
    """Holds what the jitted functions close over: graph definitions, the optimizer, the method.

    The train state is a dict: ``step``, student ``params`` and BN ``stats``, ``teacher`` parameters and
    ``teacher_stats``, ``opt`` (AdamW moments), the method's own ``method`` state (e.g. DINO centres; ``{}`` for
    the ATST methods) and the ``rng`` key data."""

    def __init__(self, config, mesh):
        self.config = config
        self.mesh = mesh
        self.rules = shd.rules_from_config(config.sharding_rules)
        self.method = methods.build(config)
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


# ======================================================================================================
# Loop
# ======================================================================================================
class MetricsWriter:
    """``metrics.jsonl`` and TensorBoard scalars, written by process 0 only.

    Object stores (a ``gs://`` workdir) cannot append, so for a remote workdir the JSONL lines go to a local
    copy (started from the remote file when resuming) that ``sync`` uploads whole at every checkpoint and at
    the end. TensorBoard writes ``gs://`` itself (with ``google-cloud-storage`` installed).

    ``resume_step``: the step the run (re)starts from. Lines of later steps (logged after the last checkpoint
    by a run that was then killed) are dropped and TensorBoard purges its later events, so after any restart
    each step appears once.
    """

    def __init__(self, workdir, resume_step: int | None = None):
        self.enabled = distributed.is_main()
        self.jsonl = None
        self.tb = None
        self.remote = workdir / "metrics.jsonl" if "://" in str(workdir) else None
        if self.enabled:
            local = workdir / "metrics.jsonl"
            if self.remote is not None:
                import hashlib
                import tempfile

                tag = hashlib.sha1(str(workdir).encode()).hexdigest()[:16]
                local = Path(tempfile.gettempdir()) / "atst_jax_metrics" / tag / "metrics.jsonl"
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(self.remote.read_text() if self.remote.exists() else "")
            self.local = local
            if resume_step is not None and local.exists():
                _truncate_jsonl(local, resume_step)
            self.jsonl = open(local, "a")  # noqa: SIM115 - closed in close()
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)
            except ImportError:  # optional: jsonl alone is enough
                self.tb = None

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def image(self, tag: str, panels, step: int):
        """A TensorBoard image of spectrogram panels ``[(title, spec, overlay)]`` (``plots.spectrogram_image``)."""
        if self.enabled and self.tb is not None:
            from atst_jax import plots

            self.tb.add_image(tag, plots.spectrogram_image(panels), step, dataformats="HWC")
            self.tb.add_text(f"{tag}/panels", " | ".join(title for title, _, _ in panels), step)

    def sync(self):
        """Uploads the JSONL for a remote workdir (no-op for a local one)."""
        if self.enabled and self.remote is not None:
            self.jsonl.flush()
            self.remote.write_text(self.local.read_text())

    def close(self):
        if self.jsonl:
            self.sync()
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the lines of steps <= ``last_step`` (and drops a torn last line), rewriting the file atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)


def fetch(tree):
    """Host copies of replicated scalars. ``jax.device_get`` refuses arrays that span other processes'
    devices; a replicated value is whole on any local device, so read this process's first shard."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), tree)


def _log(message: str) -> None:
    """Progress and status lines: printed by process 0 only (every process runs the same loop)."""
    if distributed.is_main():
        print(message, flush=True)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient stopped the run (train.nonfinite=halt, or too many skips)."""


class _StopSignal:
    """SIGTERM (preemption notice, ``scancel``, Kubernetes) and SIGINT (Ctrl-C) → finish the current step,
    save, exit 0. A second Ctrl-C aborts at once (``KeyboardInterrupt``; the CLI exits 130).

    The handler only sets a flag; the loop acts on it at the next step boundary, so a signal that arrives
    during start-up, compilation or a long evaluation is honoured right after it, at the first step boundary.
    """

    def __init__(self):
        self.requested = None
        self.interrupts = 0
        self._previous = {}

    def __enter__(self):
        import signal

        handlers = {signal.SIGTERM: self._handle, signal.SIGINT: self._handle}
        if jax.process_count() > 1:
            # Several processes must stop at the same step, or the ones still stepping hang in a collective.
            # JAX's preemption service (started by jax.distributed.initialize) catches SIGTERM itself and
            # agrees on a common step, which the loop reads through ``ckpt.reached_preemption``; a Python
            # handler here would replace it. Ctrl-C is passed to it as a SIGTERM to this process.
            handlers = {signal.SIGINT: self._interrupt_to_sigterm}
        for sig, handler in handlers.items():
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test harness thread): no handler
                pass
        return self

    def _count_interrupt(self, signum):
        import signal

        if signum != signal.SIGINT:
            return
        self.interrupts += 1
        if self.interrupts > 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a third one interrupts the clean-up
            raise KeyboardInterrupt
        print(
            "interrupted: finishing the current step, saving it and exiting (Ctrl-C again to abort without "
            "saving)",
            file=sys.stderr,
            flush=True,
        )

    def _handle(self, signum, frame):
        del frame
        self._count_interrupt(signum)
        self.requested = signum

    def _interrupt_to_sigterm(self, signum, frame):
        import signal

        del frame
        self._count_interrupt(signum)
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


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
        try:
            loaded = export_load.load_pretraining(src, heads=heads)
        except KeyError:
            try:
                encoder = export_load.load_encoder_params(src, heads=heads)
            except (KeyError, ValueError, OSError) as e:
                raise ConfigError(f"init_from={source}: not a file of encoder weights ({e})") from None
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
    _log(f"initialised parameters from {src} step {from_step}")
    return from_pure(trainer.abstract_state, pure)


def _lookup(tree, path):
    """The leaf of a nested dict at a key path, or None."""
    for entry in path:
        if not isinstance(tree, dict) or entry.key not in tree:
            return None
        tree = tree[entry.key]
    return tree


def _check_workdir(workdir) -> None:
    """One line, before anything is built, for a workdir that is a file or cannot be created or written."""
    if "://" in str(workdir):  # object stores: Orbax reports what it cannot write
        return
    existing = Path(workdir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--workdir {workdir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: {existing} is not writable")


def _make_workdir(workdir) -> None:
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


def _set_aside_run(workdir):
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


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) pretraining; returns ``{"step", "loss", "workdir", "preempted"}`` of the last step.

    SIGTERM or Ctrl-C from here on stops at the next step boundary with that step saved."""
    with _StopSignal() as stop:
        return _train(config, workdir, stop)


def _train(config, workdir, stop) -> dict:
    workdir = run_dir(workdir)  # a local path, or gs://… for pods writing straight to a bucket
    _check_workdir(workdir)
    t = config.train
    if t.nonfinite not in ("halt", "skip"):
        raise ConfigError(f"train.nonfinite={t.nonfinite!r}: choose halt or skip")

    # ---------------------------------------------------------------------------------- Set up mesh
    method = check_config(config, jax.device_count(), jax.process_count())
    mesh = shd.make_mesh(config.mesh)
    try:
        files = data_files(config)
    except (OSError, ValueError) as e:  # a missing or empty records_dir, an incomplete shard set: one line
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data: {' '.join(str(e).split())}") from None
    feature_set = check_data(config, method, files)

    # ---------------------------------------------------------------------------------- Build state
    trainer = Trainer(config, mesh)
    data_iter = make_data_iterator(config, trainer.method, files, feature_set)
    try:
        _make_workdir(workdir)  # only now: a config refused above leaves no workdir behind
    except ConfigError:
        data_iter.close()
        raise
    ckpt = Checkpointer(workdir, save_every=t.ckpt_every, keep=t.keep_checkpoints, keep_period=t.keep_every)
    # The workdir belongs to one run: a checkpoint of another config is refused (one line naming the fields)
    # unless train.fresh asks to start over, which moves the old run aside.
    run_config = json.loads(config.to_json_best_effort())
    foreign = None
    try:
        latest, state = ckpt.restore_latest(
            trainer.abstract_state, trainer.state_shardings, data_iter, run_config
        )
    except IncompatibleCheckpointError as e:
        if not t.get("fresh", False):
            ckpt.close()
            data_iter.close()
            raise
        latest, state, foreign = None, None, e
    if state is not None:
        _log(f"resumed from {ckpt.directory / str(latest)}")
        if t.get("fresh", False):
            _log(
                "train.fresh: the checkpoints here are this run's own, so it resumes (requeue-safe); move "
                f"{ckpt.directory} away to start over"
            )
    else:
        state = trainer.init(config.seed)
        if config.init_from:  # before a fresh start moves the old run: init_from may point at it
            state = init_from_checkpoint(state, trainer, config.init_from)
        if foreign is not None:
            ckpt.close()
            moved = _set_aside_run(workdir)
            ckpt = Checkpointer(
                workdir, save_every=t.ckpt_every, keep=t.keep_checkpoints, keep_period=t.keep_every
            )
            _log(f"train.fresh: the previous run in {workdir} was moved to {moved}; starting from step 0")
    step = int(fetch(state["step"]))
    if step >= t.steps:
        ckpt.close()
        data_iter.close()
        _log(f"nothing to do: the checkpoint at step {step} already reaches train.steps={t.steps}")
        return {"step": step, "loss": float("nan"), "workdir": str(workdir), "preempted": False}
    _log(
        f"{config.method} {config.variant}: {trainer.num_params:,} trainable parameters "
        f"({trainer.num_encoder_params:,} in the encoder), mesh {dict(mesh.shape)} over "
        f"{jax.process_count()} process(es), "
        f"global batch {t.global_batch}, {len(files)} record files",
    )
    train_step = trainer.jit_train_step()
    writer = MetricsWriter(workdir, resume_step=step)
    meta = run_metadata(mesh)
    image_every = int(t.get("image_every", 0))
    pictures = trainer.jit_pictures() if image_every > 0 else None
    probe = None
    if config.get("probe") and config.probe.train:
        from atst_jax import pretrain_probe

        probe_log = Path(str(workdir)) / "probe.jsonl"
        if distributed.is_main() and probe_log.exists():  # each probe appears once after a resume
            _truncate_jsonl(probe_log, step)
        probe = pretrain_probe.PretrainProbe(config, workdir, run_config, feature_set, log=_log)

    # ---------------------------------------------------------------------------------- Loop
    chip = t.get("chip", "") or chip_from_device(jax.devices()[0])
    peak = CHIPS[chip]["peak_tflops"] if chip else 0.0
    progress = Progress(
        t.steps,
        t.global_batch,
        step,
        trainer.step_flops / jax.device_count(),
        peak,
        trainer.method.progress_monitors,
        health_min=dict(t.get("health_min", collapse.HEALTH_MIN)),
        health_patience=int(t.get("health_patience", 200)),
    )
    pending = None  # (step, metrics): fetched one step late, so the host never waits on the device
    last = {"step": step, "loss": float("nan")}
    skipped = 0
    preempted = False

    def check_finite(step_done, metrics):
        nonlocal skipped
        if bool(fetch(metrics["finite"])):
            return
        if t.nonfinite == "skip" and skipped < t.max_skipped:
            skipped += 1
            print(
                f"warning: non-finite loss or gradient at step {step_done}: update skipped "
                f"({skipped}/{t.max_skipped})",
                file=sys.stderr,
                flush=True,
            )
            return
        good = [s for s in ckpt.all_steps() if s < step_done]
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step_done} (train.nonfinite={t.nonfinite}); "
            f"last checkpoint: {good[-1] if good else 'none'}"
        )

    def log_pending(force=False):
        """The pending step's line (after its finite check), if one is pending."""
        nonlocal pending, last
        if pending is not None:
            check_finite(*pending)
            last = progress.maybe_log(*pending, writer, t.log_every, force=force) or last
            pending = None

    try:
        while step < t.steps:
            waited = time.perf_counter()
            host = next(data_iter)
            batch = {
                k: pipeline.to_global_batch({k: host[k]}, s)[k] for k, s in trainer.batch_shardings.items()
            }
            progress.data_wait += time.perf_counter() - waited
            state, metrics = train_step(state, batch)
            step += 1
            if pictures is not None and step % image_every == 0:
                titles, draw = pictures
                panels = fetch(draw(state["rng"], step - 1, batch))
                writer.image("views", list(zip(titles, *zip(*panels, strict=True), strict=True)), step)
            log_pending()
            pending = (step, metrics)
            stopping = stop.requested is not None or ckpt.reached_preemption(step)
            if stopping or ckpt.should_save(step) or step == t.steps:
                # Checked first: never a checkpoint of a non-finite step. The step's line goes out before its
                # checkpoint: a run killed once the save has committed resumes after this step, so a line
                # still pending then would be lost for good.
                log_pending(force=stopping or step == t.steps)
                ckpt.save(step, state, data_iter, config, meta, force=True)
                writer.sync()
            if stopping:
                preempted = True
                break
            if probe is not None and probe.due(step, last=step == t.steps):
                log_pending(force=step == t.steps)
                progress.pause(functools.partial(probe.maybe_run, state, step, writer, last=step == t.steps))
        log_pending(force=True)
    finally:
        ckpt.close()  # waits for the last asynchronous save to commit
        writer.close()
        data_iter.close()
    if preempted:
        _log(f"stop requested: saved step {step} to {ckpt.directory}; exiting")
        return {"step": step, "loss": last["loss"], "workdir": str(workdir), "preempted": True}
    _log(
        f"checkpoints: {ckpt.directory}\nmetrics: {workdir / 'metrics.jsonl'}\ntensorboard: {workdir / 'tensorboard'}",
    )
    _log(
        f"done in {_fmt_time(progress.elapsed())}: final step {last['step']} loss {last['loss']:.6f}",
    )
    return {"step": last["step"], "loss": last["loss"], "workdir": str(workdir), "preempted": False}


class Progress:
    """The progress line and scalars: every ``log_every`` steps, the first step, and the last."""

    def __init__(
        self,
        total: int,
        global_batch: int,
        start_step: int,
        flops_per_device: float = 0.0,
        peak_tflops: float = 0.0,
        monitors: tuple[str, ...] = (),
        health_min: dict[str, float] | None = None,
        health_patience: int = 200,
    ):
        self.total, self.global_batch, self.start_step = total, global_batch, start_step
        self.monitors = monitors  # the method's collapse monitors, shown on the progress line
        # Encoder health (models/collapse.py): a monitor under its floor at every logged step for at least
        # ``health_patience`` steps puts a warning on the progress line (and ``health/warning`` = 1 in the
        # scalars); a single dip does not. Floors ≤ 0 are off.
        self.health_min = {k: float(v) for k, v in (health_min or {}).items() if float(v) > 0}
        self.health_patience = int(health_patience)
        self.below_since: dict[str, int] = {}  # monitor → first logged step of its run under the floor
        self.warned: set[str] = set()
        self.flops_per_device = flops_per_device  # analytic, per step
        self.peak_tflops = peak_tflops  # of the chip (flops.CHIPS); 0 = unknown (CPU): no MFU
        self.t0 = time.perf_counter()
        self.last_time, self.last_step = None, start_step  # the first window holds compilation: no rate
        # Host time spent waiting for the next batch (input pipeline + host→device transfer), summed over the
        # current logging window. The step itself is dispatched asynchronously, so this is data stall only
        # when the device is already idle; a large share means the input pipeline is the bottleneck.
        self.data_wait = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def pause(self, fn):
        """Runs ``fn()`` (e.g. a probe) off the clock: the step-time window does not count it."""
        started = time.perf_counter()
        try:
            return fn()
        finally:
            if self.last_time is not None:
                self.last_time += time.perf_counter() - started

    def maybe_log(self, step, metrics, writer, log_every, force=False):
        if not (force or step % log_every == 0 or step == self.start_step + 1):
            return None
        scalars = {k: float(v) for k, v in fetch(metrics).items()}  # the guard is check_finite
        now = time.perf_counter()
        rate = float("nan")
        if self.last_time is not None and step > self.last_step:
            rate = (step - self.last_step) * self.global_batch / (now - self.last_time)
            step_time = (now - self.last_time) / (step - self.last_step)
            scalars["perf/clips_per_s"] = rate
            scalars["perf/step_time_s"] = step_time
            scalars["perf/data_wait_s"] = self.data_wait / (step - self.last_step)
            scalars["perf/data_wait_frac"] = self.data_wait / (now - self.last_time)
            if self.flops_per_device:
                tflops = self.flops_per_device / step_time / 1e12
                scalars["perf/tflops_per_device"] = tflops
                if self.peak_tflops:
                    scalars["perf/mfu"] = tflops / self.peak_tflops
        self.last_time, self.last_step = now, step
        self.data_wait = 0.0
        alarms = self.health_alarms(step, scalars)
        if self.health_min:
            scalars["health/warning"] = float(bool(alarms))
        writer.write(step, scalars)
        eta = (self.total - step) * self.global_batch / rate if rate == rate else float("nan")
        _log(
            f"step {step:>6}/{self.total} | loss {scalars['loss']:.4f} | "
            + "".join(f"{name} {scalars[name]:.4f} | " for name in self.monitors if name in scalars)
            + f"lr {scalars['lr']:.2e} | {rate:7.1f} clips/s | "
            f"ETA {_fmt_time(eta) if eta == eta else '--'} | elapsed {_fmt_time(self.elapsed())}"
            + "".join(f" | WARNING {a}" for a in alarms),
        )
        return {"step": step, "loss": scalars["loss"]}

    def health_alarms(self, step: int, scalars: dict) -> list[str]:
        """The encoder-health warnings due at ``step``: each monitor that has been under its floor at every
        logged step since ``step − health_patience`` or earlier. The first warning of each monitor also gets
        a line of its own that says what it means."""
        alarms = []
        for name, floor in self.health_min.items():
            value = scalars.get(name)
            if value is None or not value < floor:
                self.below_since.pop(name, None)
                continue
            since = self.below_since.setdefault(name, step)
            if step - since < self.health_patience:
                continue
            alarms.append(f"{name} {value:.4f} < {floor:g} since step {since}")
            if name not in self.warned:
                self.warned.add(name)
                _log(
                    f"warning: {name} has stayed under {floor:g} since step {since}: the teacher's tokens are "
                    "collapsing (within_tea: their variance within clips; dim_tea: the directions they use) "
                    "while the loss may still look healthy. Set train.health_min.NAME=0 to silence."
                )
        return alarms


def main(argv):
    del argv
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


def config_spec_from_argv(argv: list[str]) -> str | None:
    """The value of ``--config`` (its last occurrence; absl also takes one dash), read before flags are parsed."""
    spec = None
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            spec = arg.split("=", 1)[1]
    return spec


def check_overrides(argv: list[str]) -> None:
    """Rejects ``--config.a.b=...`` for fields the config does not have, with one line (config_flags would
    raise a multi-screen traceback from inside flag parsing)."""
    import difflib

    config_spec = config_spec_from_argv(argv)
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if config_spec is None or not overrides:
        return
    config = load_config(config_spec)
    for path in overrides:
        node, walked = config, []
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, options, n=1)
                hint = f" (did you mean {'.'.join(walked + close)!r}?)" if close else ""
                raise ConfigError(f"unknown config field {path!r}{hint}")
            node = node[part]
            walked.append(part)


if __name__ == "__main__":
    cli(sys.argv)
