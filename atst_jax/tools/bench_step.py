"""The train-step benchmark.

    python -m atst_jax.bench step --config configs/atst_frame.py:small --batch 8 [--steps 5] [--chip h100]
        [--set model.dtype=bfloat16 ...]

``step`` times the full jitted train step of the config's method (teacher and student over all its views,
heads, optimizer, EMA) on random log-mels of the method's crop lengths, after compilation and warm-up, and
prints seconds per step and clips per second.
Nothing is read from disk, so the figure is the compute cost alone.
"""

from __future__ import annotations

import statistics
import time

import jax


def make_config(config_spec: str, batch: int, sets=()):
    """The config at ``batch`` clips with ``KEY=VALUE`` overrides (the command line's ``--config.KEY=VALUE``,
    or ``--set KEY=VALUE``), checked for all devices (also used by ``bench_gpu`` and its planner rows, and by
    ``bench_parity``)."""
    from atst_jax.config import apply_overrides, check_config, load_config

    config = load_config(config_spec)
    config.train.global_batch = batch
    config.train.steps = max(config.train.steps, 1000)
    apply_overrides(config, set_pairs(sets))
    check_config(config, jax.device_count())
    return config


def set_pairs(sets) -> list[tuple[str, str]]:
    """``["a.b=v", ...]`` → ``[("a.b", "v"), ...]``, one line for an entry without ``=``."""
    from atst_jax.sharding import ConfigError

    pairs = []
    for override in sets or []:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"--set {override!r}: want KEY=VALUE, e.g. model.scan_layers=false")
        pairs.append((key, value))
    return pairs


def make_trainer(config_spec: str, batch: int, sets=()):
    """``(config, trainer)`` for timing: ``make_config`` on a mesh of all devices."""
    from atst_jax import sharding as shd
    from atst_jax.trainer import Trainer

    config = make_config(config_spec, batch, sets)
    return config, Trainer(config, shd.make_mesh(config.mesh))


def bench_step(args) -> dict:
    config, trainer = make_trainer(args.config, args.batch, args.set)
    state = trainer.init(config.seed)
    step_fn = trainer.jit_train_step()
    # The method's own inputs (crop names and lengths), random log-mels, full lengths.
    host = trainer.synthetic_batch(0)
    frames = {c.name: c.frames for c in trainer.method.inputs()}
    batch = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    from atst_jax.flops import CHIPS, chip_from_device

    tflops = trainer.step_flops / jax.device_count() / med / 1e12  # analytic, per device
    chip = args.chip or chip_from_device(jax.devices()[0])
    mfu = tflops / CHIPS[chip]["peak_tflops"] if chip else None
    result = {
        "config": args.config,
        "batch": args.batch,
        "method": config.method,
        "frames": frames,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "compile_s": compile_s,
        "step_s_median": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "clips_per_s": args.batch / med,
        "tflops_per_device": tflops,
        "chip": chip,
        "mfu": mfu,
    }
    print(
        f"{args.config} batch {args.batch} x {frames} frames on {result['devices']} {result['backend']} device(s): "
        f"{med:.3f} s/step (min {min(times):.3f}, max {max(times):.3f}, {args.steps} steps), "
        f"{result['clips_per_s']:.2f} clips/s, {tflops:.2f} TFLOP/s per device"
        + (f", MFU {mfu:.1%} of {chip}'s bf16 peak" if chip else "")
        + f", compile {compile_s:.1f} s"
    )
    return result


def parse_args(parser, argv, check: bool = True):
    """The suite's flags plus ``--config.KEY=VALUE`` overrides, which join ``args.set`` as ``KEY=VALUE``;
    ``check``: every override is checked against ``--config`` here (a suite that adds its own default
    overrides checks once they are all known)."""
    from atst_jax.config import parse_with_overrides

    args, overrides = parse_with_overrides(parser, argv)
    args.set = list(args.set or []) + [f"{k}={v}" for k, v in overrides]
    if check and getattr(args, "config", None):  # every override names a field: one line, before any work
        from atst_jax.config import apply_overrides, load_config

        apply_overrides(load_config(args.config), set_pairs(args.set))
    return args


def main(argv=None):
    from atst_jax.cli import ArgumentParser, fail
    from atst_jax.sharding import ConfigError

    p = ArgumentParser(prog="python -m atst_jax.bench step", description="time the full train step")
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chip", default="", help="peak for the MFU: v4 v5e v5p v6e h100 h200 (default: detect)")
    p.add_argument("--set", action="append", help="config override KEY=VALUE, as --config.KEY=VALUE")
    args = parse_args(p, argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        return fail("--batch and --steps must be positive, --warmup >= 0")
    try:
        bench_step(args)
    except ConfigError as e:
        return fail(e)
    return 0
