"""Ahead-of-time planner: compile the real train step for a target mesh on simulated CPU devices, before
renting the chips, and report per-device memory, FLOPs and the implied step time.

    python -m atst_jax.plan --config configs/atst_frame.py:base --mesh data=64,fsdp=4 [--chip v5p] [--mfu 0.5]
        [--devices N] [--json plan.json] [--config.FIELD=VALUE ...]

``--mesh`` replaces ``config.mesh`` (axes not named are 1); the trainer's spelling ``--config.mesh.data=64
--config.mesh.fsdp=4`` does the same. The number of simulated devices is the product
of its sizes, or ``--devices N`` (then one axis may be -1). Exit codes: 0 = planned (and fits the chip's HBM
when ``--chip`` is given), 2 = bad mesh or config, 3 = the step does not fit the chip's HBM.

Memory is XLA:CPU's buffer assignment of the compiled step; TPU/GPU compilers fuse, schedule and lay out
differently, so treat it as an estimate (the state part is exact: it follows from the shardings alone).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from absl import flags

from atst_jax.errors import UserError

# JAX must not be imported at module level: the simulated device count has to be in XLA_FLAGS before JAX
# starts, and it is only known once --mesh is parsed. For the same reason the --config flag (and --workdir)
# come from atst_jax.train, imported inside main(): defining "config" here too would collide with it.
_MESH = flags.DEFINE_string("mesh", None, "Target mesh, e.g. data=64,fsdp=4[,tensor=1]; replaces config.mesh")
_DEVICES = flags.DEFINE_integer("devices", None, "Simulated device count (default: the product of --mesh)")
_CHIP = flags.DEFINE_string(
    "chip", None, "Target chip for step time and the HBM check: v4 v5e v5p v6e h100 h200"
)
_MFU = flags.DEFINE_float("mfu", 0.5, "Model FLOPs utilisation assumed for the implied step time")
_JSON = flags.DEFINE_string("json", None, "Also write every number to this JSON file")

MESH_AXES = ("data", "fsdp", "tensor")  # = atst_jax.sharding.MESH_AXES (that module imports JAX)
EXIT_CONFIG, EXIT_NO_FIT = 2, 3


class PlanError(UserError):
    """A bad command line; reported as one line, exit 2."""


def parse_mesh(text: str | None) -> dict[str, int]:
    """``"data=64,fsdp=4"`` → ``{"data": 64, "fsdp": 4, "tensor": 1}``; sizes positive, or one -1."""
    if not text:
        raise PlanError(
            "--mesh is required, e.g. --mesh data=64,fsdp=4 (or --config.mesh.data=64 --config.mesh.fsdp=4)"
        )
    sizes: dict[str, int] = {}
    for entry in text.split(","):
        name, sep, value = (s.strip() for s in entry.partition("="))
        if not sep or not name or not re.fullmatch(r"-?\d+", value):
            raise PlanError(
                f"--mesh={text}: malformed entry {entry!r}, expected AXIS=SIZE, e.g. data=64,fsdp=4"
            )
        if name not in MESH_AXES:
            raise PlanError(f"--mesh={text}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise PlanError(f"--mesh={text}: axis {name!r} given twice")
        size = int(value)
        if size == 0 or size < -1:
            raise PlanError(f"--mesh={text}: {name}={size}; sizes must be positive (or -1 with --devices)")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise PlanError(f"--mesh={text}: at most one axis may be -1")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def mesh_text(flag: str | None, argv: list[str]) -> str | None:
    """The target mesh as ``--mesh`` spells it, from ``--mesh`` or from the trainer's own overrides
    ``--config.mesh.AXIS=SIZE`` (one or the other; axes not named are 1 either way)."""
    from atst_jax.config import split_overrides

    axes = [
        f"{path[len('mesh.') :]}={text}"
        for path, text in split_overrides(argv)[1]
        if path.startswith("mesh.")
    ]
    if flag and axes:
        raise PlanError("give the target mesh once: --mesh AXIS=SIZE,... or --config.mesh.AXIS=SIZE")
    return flag or ",".join(axes) or None


def device_count(mesh: dict[str, int], devices: int | None) -> int:
    if devices is not None:
        if devices <= 0:
            raise PlanError(f"--devices={devices} must be positive")
        return devices
    if -1 in mesh.values():
        raise PlanError("--mesh with a -1 axis needs --devices N")
    return math.prod(mesh.values())


def _force_cpu_devices(n: int) -> None:
    xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def seconds(t: float) -> str:
    if t != t:
        return "n/a"
    return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.1f} ms" if t >= 1e-3 else f"{t * 1e6:.0f} µs"


def human(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ======================================================================================================
# Measure
# ======================================================================================================
# Which entries of the train state make up each reported part.
STATE_PARTS = {
    "params": ("params", "stats"),  # student parameters + BN running statistics
    "optimizer": ("opt",),  # AdamW mu, nu, count
    "teacher": ("teacher", "teacher_stats"),
    "other": ("step", "rng", "method"),  # the method's own state (e.g. DINO centres) counts here
}


def state_bytes(abstract_state, shardings):
    """Per-device and total bytes of each part of the state, from every leaf's shard shape, and the leaves
    that stay whole on every device (replicated)."""
    import jax
    import numpy as np

    per_device, total, replicated = {}, {}, []
    num_devices = None
    for part, keys in STATE_PARTS.items():
        per_device[part] = total[part] = 0
        for key in keys:
            leaves = jax.tree_util.tree_flatten_with_path(abstract_state[key])[0]
            shards = jax.tree.leaves(shardings[key])
            for (path, leaf), sharding in zip(leaves, shards, strict=True):
                itemsize = np.dtype(leaf.dtype).itemsize
                whole = math.prod(leaf.shape) * itemsize
                # Shardings are even (sharding._fit_spec drops axes that do not divide), so one shard's
                # shape is every device's.
                local = math.prod(sharding.shard_shape(leaf.shape)) * itemsize
                per_device[part] += local
                total[part] += whole
                num_devices = len(sharding.device_set)
                if local == whole and num_devices > 1:
                    name = re.sub(r"\.(value|raw_value)$", "", f"{key}{jax.tree_util.keystr(path)}")
                    replicated.append({"name": name, "bytes": whole})
    per_device["state"] = sum(per_device[p] for p in STATE_PARTS)
    total["state"] = sum(total[p] for p in STATE_PARTS)
    replicated.sort(key=lambda r: -r["bytes"])
    return per_device, total, replicated


def compile_step(config):
    """Lowers and compiles the real train step for abstract, sharded inputs (nothing is allocated)."""
    import numpy as np

    from atst_jax import sharding as shd
    from atst_jax.trainer import Trainer

    mesh = shd.make_mesh(config.mesh)
    trainer = Trainer(config, mesh)
    frames = {c.name: c.frames for c in trainer.method.inputs()}
    state, batch = trainer.abstract_step_inputs()
    t0 = time.perf_counter()
    lowered = trainer.jit_train_step().lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    batch_bytes = sum(
        math.prod(b.sharding.shard_shape(b.shape)) * np.dtype(b.dtype).itemsize for b in batch.values()
    )
    return trainer, compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1}, batch_bytes, frames


def xla_memory(compiled) -> tuple[dict, int | None]:
    """XLA's buffer sizes (bytes per device) of a compiled step and the peak they imply (None without a
    memory analysis). Arguments (state + batch) stay live for the whole step; the donated state's outputs
    alias them, so only the unaliased outputs (metrics) come on top of the temporaries."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}, None
    xla = {
        f: int(getattr(mem, f"{f}_size_in_bytes", 0) or 0)
        for f in ("argument", "output", "alias", "temp", "generated_code")
    }
    return xla, xla["argument"] + xla["temp"] + max(xla["output"] - xla["alias"], 0)


def plan(config, config_spec: str, num_devices: int, chip: str | None, mfu: float) -> dict:
    from atst_jax import sharding as shd
    from atst_jax.flops import CHIPS

    trainer, compiled, times, batch_bytes, frames = compile_step(config)
    per_device, total, replicated = state_bytes(trainer.abstract_state, trainer.state_shardings)
    per_device["batch"] = batch_bytes

    xla, peak = xla_memory(compiled)
    if peak is None:  # a backend without memory analysis: the state and the batch are all we know
        peak = per_device["state"] + batch_bytes
    per_device["peak"] = peak

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    analytic = float(trainer.step_flops)

    sizes = dict(zip(shd.MESH_AXES, shd.mesh_shape(config.mesh, num_devices), strict=True))
    dp = shd.data_parallel_size(sizes, trainer.rules)
    result = {
        "config": config_spec,
        "method": config.method,
        "variant": config.get("variant", ""),
        "mesh": sizes,
        "num_devices": num_devices,
        "global_batch": config.train.global_batch,
        "clips_per_device": config.train.global_batch / dp,
        "frames": frames,
        "num_params": trainer.num_params,
        "num_encoder_params": trainer.num_encoder_params,
        "model_dtype": config.model.dtype,
        "remat": config.model.remat,
        **times,
        "memory": {
            "per_device": per_device,
            "total": total,
            # 1.0 = perfectly sharded state; above it, replicated leaves (listed below) cost extra.
            "state_ratio": per_device["state"] / (total["state"] / num_devices),
            "replicated": replicated,
            "xla": xla,
        },
        "flops": {
            "analytic_per_step": analytic,
            "analytic_per_device": analytic / num_devices,
            "xla_per_device": xla_flops,
            "scan_layers": bool(config.model.scan_layers),
        },
        "chip": None,
    }
    if chip:
        spec = CHIPS[chip]
        per_dev = analytic / num_devices
        times_at = {}
        for m in sorted({0.3, mfu, 0.6}):
            step_s = per_dev / (spec["peak_tflops"] * 1e12 * m) if per_dev else float("nan")
            times_at[f"{m:g}"] = {"step_time_s": step_s, "clips_per_s": config.train.global_batch / step_s}
        result["chip"] = {
            "name": chip,
            "peak_tflops": spec["peak_tflops"],
            "hbm_bytes": spec["hbm_bytes"],
            "mfu": mfu,
            "step_time_s": times_at[f"{mfu:g}"]["step_time_s"],
            "clips_per_s": times_at[f"{mfu:g}"]["clips_per_s"],
            "by_mfu": times_at,
            "fits": peak <= spec["hbm_bytes"],
        }
    return result


# ======================================================================================================
# Report
# ======================================================================================================
def report(r: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    m, pd, tot = r["memory"], r["memory"]["per_device"], r["memory"]["total"]
    xla = m["xla"]
    lines = [
        f"plan: {r['method']} {r['variant']} on mesh {mesh} ({r['num_devices']} simulated CPU devices)",
        "  memory is XLA:CPU's buffer assignment for the real train step: an estimate of what the TPU/GPU",
        "  compilers will allocate (the state rows are exact; temporaries depend on the compiler).",
        f"  global batch {r['global_batch']} ({r['clips_per_device']:g} clips per data-parallel shard), "
        f"crops {', '.join(f'{k} {v}' for k, v in r['frames'].items())} frames per clip, {r['num_params']:,} trainable parameters, "
        f"model.dtype={r['model_dtype']}, model.remat={r['remat']}",
        f"  lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s",
        "",
        f"  {'memory':<44}{'per device':>14}{'total':>14}",
    ]
    rows = [
        ("parameters (student params + BN stats)", "params"),
        ("optimizer state (AdamW mu + nu + count)", "optimizer"),
        ("teacher (params + BN stats)", "teacher"),
        ("other (step, rng, method state)", "other"),
        ("state", "state"),
    ]
    for label, key in rows:
        lines.append(f"  {label:<44}{human(pd[key]):>14}{human(tot[key]):>14}")
    note = ""
    if r["mesh"]["data"] > 1:  # the rules shard state over fsdp/tensor only; data replicates it
        note = (
            f" (state is replicated over data={r['mesh']['data']}, so about {r['mesh']['data']} is expected)"
        )
    elif r["num_devices"] > 1:
        note = " (1.0 = every byte sharded over all devices)"
    lines.append(f"  state per device / (total / {r['num_devices']}) = {m['state_ratio']:.3f}{note}")
    rep = sum(x["bytes"] for x in m["replicated"])
    if rep > 0.01 * pd["state"]:  # worth a line only when it is a visible share of the state
        top = ", ".join(f"{x['name']} {human(x['bytes'])}" for x in m["replicated"][:3])
        lines.append(f"  replicated on every device: {human(rep)} (largest: {top})")
    lines.append(f"  {'batch':<44}{human(pd['batch']):>14}")
    if xla:
        lines += [
            f"  {'XLA arguments (state + batch)':<44}{human(xla['argument']):>14}",
            f"  {'XLA outputs (aliased to donated state)':<44}{human(xla['output']):>14}"
            f"  ({human(xla['alias'])} aliased)",
            f"  {'XLA temporaries':<44}{human(xla['temp']):>14}",
        ]
        if xla["generated_code"]:  # always 0 on XLA:CPU
            lines.append(f"  {'XLA generated code':<44}{human(xla['generated_code']):>14}")
    lines.append(f"  {'peak estimate (arguments + temporaries)':<44}{human(pd['peak']):>14}")
    f = r["flops"]
    lines += ["", "  FLOPs per step (matmuls, analytic):"]
    if f["analytic_per_step"]:
        lines.append(
            f"    {f['analytic_per_step'] / 1e12:,.2f} TFLOP total, {f['analytic_per_device'] / 1e12:,.3f} "
            "TFLOP per device"
        )
    else:
        lines.append(f"    n/a for method {r['method']}")
    note = (
        "the scanned layer body is counted once, so this undercounts" if f["scan_layers"] else "for reference"
    )
    lines.append(f"    XLA cost_analysis: {f['xla_per_device'] / 1e12:,.3f} TFLOP per device ({note})")
    c = r["chip"]
    if c:
        lines += [
            "",
            f"  {c['name']}: {c['peak_tflops']:g} TFLOP/s peak (dense bf16), {human(c['hbm_bytes'])} HBM",
        ]
        for mfu, t in c["by_mfu"].items():
            mark = "  <-- --mfu" if float(mfu) == c["mfu"] else ""
            lines.append(
                f"    at MFU {float(mfu):.2f}: {seconds(t['step_time_s'])} per step, "
                f"{t['clips_per_s']:,.0f} clips/s{mark}"
            )
        if r["model_dtype"] == "float32":
            lines.append("    (model.dtype=float32: the bf16 peak above is out of reach; expect a lower MFU)")
        verdict = "fits" if c["fits"] else "DOES NOT FIT"
        lines.append(f"    HBM: peak estimate {human(pd['peak'])} of {human(c['hbm_bytes'])}: {verdict}")
    lines.append("")
    lines.append(summary(r))
    return "\n".join(lines)


def summary(r: dict) -> str:
    pd, c = r["memory"]["per_device"], r["chip"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    text = (
        f"summary: {r['variant']} mesh {mesh}: peak {human(pd['peak'])}/device "
        f"(state {human(pd['state'])}, temporaries {human(r['memory']['xla'].get('temp', 0))}), "
        f"{r['flops']['analytic_per_device'] / 1e12:,.2f} TFLOP/device/step"
    )
    if c:
        text += (
            f"; {c['name']} at MFU {c['mfu']:g}: {seconds(c['step_time_s'])}/step, "
            f"{c['clips_per_s']:,.0f} clips/s; {'fits' if c['fits'] else 'does not fit'} in "
            f"{human(c['hbm_bytes'])}"
        )
    return text


def no_fit_message(r: dict, config) -> str:
    pd, c, xla = r["memory"]["per_device"], r["chip"], r["memory"]["xla"]
    temp = xla.get("temp", 0)
    state_hint = (
        f"raise fsdp in --mesh (now {r['mesh']['fsdp']}): the state ({human(pd['state'])} per device) shrinks "
        "in proportion"
    )
    act_hints = []
    if config.model.remat != "full":
        act_hints.append(f"--config.model.remat=full or save_dots (now {config.model.remat})")
    if config.model.dtype != "bfloat16":
        act_hints.append("--config.model.dtype=bfloat16 (activations in bf16; params stay float32)")
    act_hints.append(
        f"fewer clips per device (now {r['clips_per_device']:g}): a smaller train.global_batch, more "
        "data-parallel devices, or train.grad_accum_steps>1"
    )
    # Lead with what dominates the peak.
    hints = [state_hint, *act_hints] if pd["state"] >= temp else [*act_hints, state_hint]
    return (
        f"error: the {r['variant']} train step does not fit on {c['name']}: it needs about "
        f"{human(pd['peak'])} per device (state {human(pd['state'])}, batch {human(pd['batch'])}, "
        f"temporaries {human(temp)}) but a {c['name']} chip has {human(c['hbm_bytes'])} of HBM. "
        f"Try: {'; '.join(hints)}."
    )


# ======================================================================================================
# Main
# ======================================================================================================
def _fail(message: str, code: int = EXIT_CONFIG):
    print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> int:
    # config_flags reads --config.* overrides from sys.argv itself, so the planner always parses sys.argv.
    argv = list(sys.argv)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(__doc__.strip())
        return 0
    try:
        flags.FLAGS(argv, known_only=True)  # --mesh and --devices, before JAX exists
        mesh = parse_mesh(mesh_text(_MESH.value, argv[1:]))
        num_devices = device_count(mesh, _DEVICES.value)
    except (flags.Error, PlanError) as e:
        _fail(str(e))
    _force_cpu_devices(num_devices)

    from absl import logging

    from atst_jax import train  # defines --config and --workdir
    from atst_jax.flops import CHIPS
    from atst_jax.sharding import ConfigError

    try:
        spec = train.config_spec_from_argv(argv)
        if spec is None:
            raise PlanError("--config is required, e.g. --config configs/atst_frame.py:base")
        if not os.path.isfile(spec.partition(":")[0]):
            raise PlanError(f"--config={spec}: no such file {spec.partition(':')[0]!r}")
        train.check_overrides(argv[1:])
        rest = flags.FLAGS(argv)
        if len(rest) > 1:
            raise PlanError(f"unexpected arguments: {' '.join(rest[1:])}")
        if _CHIP.value is not None and _CHIP.value not in CHIPS:
            raise PlanError(f"--chip={_CHIP.value}: choose one of {', '.join(CHIPS)}")
        if not 0 < _MFU.value <= 1:
            raise PlanError(f"--mfu={_MFU.value} must be in (0, 1]")
        if _JSON.value:  # before the compile: a path that cannot be written fails now, not after it
            from atst_jax.cli import check_output

            check_output(_JSON.value, "--json", directory=False)
        config = flags.FLAGS["config"].value
        import jax

        if jax.device_count() != num_devices:  # JAX was started before main() could set the device count
            raise PlanError(f"JAX has {jax.device_count()} devices, the plan needs {num_devices}")
        for axis, size in mesh.items():
            config.mesh[axis] = size
        train.check_config(config, num_devices)
    except (flags.Error, UserError) as e:  # UserError: PlanError, ConfigError, an unwritable --json
        message = str(e)
        if "Traceback" in message:  # config_flags wraps the config file's own exception in its traceback
            message = f"--config={spec}: {message.strip().splitlines()[-1].strip()}"
        _fail(message.replace("\n", " "))
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    try:
        result = plan(config, spec, num_devices, _CHIP.value, _MFU.value)
    except ConfigError as e:
        _fail(str(e))
    print(report(result), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as fh:
            json.dump(result, fh, indent=1)
    if result["chip"] is not None and not result["chip"]["fits"]:
        _fail(no_fit_message(result, config), EXIT_NO_FIT)
    return 0


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
