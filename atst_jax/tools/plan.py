"""Ahead-of-time planner: compile the real train step before renting the chips, and report per-device
memory, FLOPs, collectives and the implied step time.

    python -m atst_jax.plan --config configs/atst_frame.py:base --target v5p-256 [--mesh data=1,fsdp=128]
        [--max-batch] [--json plan.json] [--config.FIELD=VALUE ...]
    python -m atst_jax.plan --config configs/atst_frame.py:base --mesh data=64,fsdp=4 [--chip v5p] [--mfu 0.5]
        [--devices N] [--json plan.json] [--config.FIELD=VALUE ...]

``--target`` names a cloud accelerator type (``v4-N``, ``v5p-N``: N TensorCores, 2 per chip;
``v5litepod-N``, ``v6e-N``: N chips; ``h100-N``, ``h200-N``, ``a100-N``: N GPUs, 8 per host) and compiles the
step with that target's own compiler (libtpu, or XLA's CUDA back end with ptxas) over the slice's devices:
no hardware needed, but the extras ``.[tpu]`` / ``.[cuda]`` must be installed. The default mesh is pure FSDP
over all chips. ``--max-batch`` then searches the largest global batch that fits.

Without ``--target`` the step is compiled for simulated XLA:CPU devices (an estimate). ``--mesh`` replaces
``config.mesh`` (axes not named are 1); the trainer's spelling ``--config.mesh.data=64
--config.mesh.fsdp=4`` does the same. The number of simulated devices is the product of its sizes, or
``--devices N`` (then one axis may be -1). Exit codes: 0 = planned (and fits the chip's HBM when ``--chip``
or ``--target`` is given), 2 = bad mesh, config or target, 3 = the step does not fit the chip's HBM.

Memory on XLA:CPU is its buffer assignment; TPU/GPU compilers fuse, schedule and lay out differently, so
treat it as an estimate (the state part is exact: it follows from the shardings alone).
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
_HLO = flags.DEFINE_string("hlo", None, "Also write the compiled step's optimized HLO text to this file")
_TARGET = flags.DEFINE_string(
    "target", None, "Compile for this accelerator type with its own compiler: v5p-256, v6e-64, h100-64, ..."
)
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "With --target: search the largest global batch that fits (bisection over compiles)"
)

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


class NoFit(Exception):
    """The target's compiler itself refused the step for want of memory (TPU: RESOURCE_EXHAUSTED)."""

    def __init__(self, needed: float | None, available: float | None, text: str):
        super().__init__(text)
        self.needed, self.available = needed, available


def _resource_exhausted(e: Exception) -> NoFit | None:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    # libtpu: "... HLO temporaries (36.17G) exceeds available HBM (15.75G) ..."; sizes in GiB.
    sizes = re.findall(r"\(([\d.]+)([KMGT])\)", text)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    values = [float(v) * scale[u] for v, u in sizes]
    available = values[-1] if len(values) >= 2 else None
    needed = max(values[:-1]) if len(values) >= 2 else None
    line = next((ln.strip() for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln), text.splitlines()[0])
    return NoFit(needed, available, line)


def compile_step(config, devices=None, target=None):
    """Lowers and compiles the real train step for abstract, sharded inputs (nothing is allocated), over
    ``devices`` (a target's topology) or JAX's own devices."""
    import contextlib
    from unittest import mock

    import numpy as np

    from atst_jax import sharding as shd
    from atst_jax.models import attention
    from atst_jax.tools import targets
    from atst_jax.trainer import Trainer

    mesh = shd.make_mesh(config.mesh, devices)
    trainer = Trainer(config, mesh)
    frames = {c.name: c.frames for c in trainer.method.inputs()}
    state, batch = trainer.abstract_step_inputs()
    patches = contextlib.ExitStack()
    if target is not None and target.platform == "cuda":
        # The step is traced on this CPU-only host for a GPU: the model asks the default backend whether
        # cuDNN attention can run, and JAX's cuDNN attention asks the local cuDNN library and device for
        # their versions. Answer all three for the target, as they would be answered on it.
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        cc = targets.compute_capability(target)
        patches.enter_context(
            mock.patch.object(
                attention, "cudnn_usable", lambda dtype: np.dtype(dtype).name in ("bfloat16", "float16")
            )
        )
        patches.enter_context(
            mock.patch.object(cudnn_attention, "check_cudnn_version", lambda: targets.CUDNN_VERSION)
        )
        patches.enter_context(
            mock.patch.object(
                cudnn_attention,
                "check_compute_capability",
                lambda capability: cc >= tuple(int(x) for x in capability.split(".")),
            )
        )
    t0 = time.perf_counter()
    with patches:
        lowered = trainer.jit_train_step().lower(state, batch)
    t1 = time.perf_counter()
    options = {}
    if target is not None and target.platform == "cuda":
        # With no GPU there is no autotuning, and XLA's untuned Triton GEMM tiling fails on some of the
        # step's dots ("Couldn't find output tile sizes"); cuBLAS, the autotuner's own fallback, compiles.
        options["xla_gpu_enable_triton_gemm"] = False
    try:
        compiled = lowered.compile(compiler_options=options or None)
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory refusal is a result, not a crash
        no_fit = _resource_exhausted(e)
        if no_fit is None:
            raise
        raise no_fit from None
    t2 = time.perf_counter()
    batch_bytes = sum(
        math.prod(b.sharding.shard_shape(b.shape)) * np.dtype(b.dtype).itemsize for b in batch.values()
    )
    return trainer, compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1}, batch_bytes, frames


def xla_memory(compiled, compiler_peak: bool = False) -> tuple[dict, int | None]:
    """XLA's buffer sizes (bytes per device) of a compiled step and its peak (None without a memory
    analysis). ``compiler_peak`` (a target's own compiler): the peak the compiler reports for its buffer
    assignment. Otherwise (the simulated-CPU estimate) the sum: arguments (state + batch) stay live for the
    whole step; the donated state's outputs alias them, so only the unaliased outputs (metrics) come on top of
    the temporaries."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}, None
    xla = {
        f: int(getattr(mem, f"{f}_size_in_bytes", 0) or 0)
        for f in ("argument", "output", "alias", "temp", "generated_code")
    }
    # libtpu's own peak: what the chip must hold at once, buffers of disjoint lifetimes sharing memory, plus
    # what it reserves (≈ 0.1 GiB). Its temp size is no guide (0 for programs that plainly need scratch), and
    # the sum above both under- and overstates what it refuses with RESOURCE_EXHAUSTED.
    xla["compiler_peak"] = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) if compiler_peak else 0
    if xla["compiler_peak"]:
        return xla, xla["compiler_peak"]
    return xla, xla["argument"] + xla["temp"] + max(xla["output"] - xla["alias"], 0)


def plan(
    config,
    config_spec: str,
    num_devices: int,
    chip: str | None,
    mfu: float,
    target=None,
    devices=None,
    keep_compiled: bool = False,
) -> dict:
    """Compiles the step and returns every number of the report (with ``keep_compiled``, also the compiled
    object under ``"compiled"``, for callers that inspect it further; it is not JSON)."""
    from atst_jax import sharding as shd
    from atst_jax.flops import CHIPS

    trainer, compiled, times, batch_bytes, frames = compile_step(config, devices, target)
    per_device, total, replicated = state_bytes(trainer.abstract_state, trainer.state_shardings)
    per_device["batch"] = batch_bytes

    xla, peak = xla_memory(compiled, compiler_peak=target is not None)
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
        "target": None,
    }
    if target is not None:
        result["target"] = target_section(compiled, result, target, config, trainer)
        result["flops"]["xla_per_device"] = result["target"]["compiled_flops_per_device"]
    if keep_compiled:
        result["compiled"] = compiled
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


def target_section(compiled, r: dict, target, config, trainer) -> dict:
    """What the target's compiler made of the step: memory against the chip's HBM, FLOPs and collectives
    per step from the optimized HLO (loops times their trip counts), and the roofline step time."""
    from atst_jax.tools import hlo_stats

    text = compiled.as_text()
    stats = hlo_stats.analyze(text, r["num_devices"])
    spec = target.spec
    peak = r["memory"]["per_device"]["peak"]
    analytic = r["flops"]["analytic_per_device"]
    compute_s = stats["flops"] / (spec.peak_tflops * 1e12)
    wire = sum(c["wire_bytes"] for c in stats["collectives"].values())
    comm_s = wire / target.collective_bytes_per_s
    # No overlap assumed: an upper bound of the roofline; XLA overlaps part of the FSDP gathers with compute.
    step_s = compute_s + comm_s
    section = {
        "name": target.name,
        "platform": target.platform,
        "topology": target.topology,
        "chips": target.chips,
        "hbm_bytes": spec.hbm_bytes,
        "peak_tflops": spec.peak_tflops,
        "collective_bytes_per_s": target.collective_bytes_per_s,
        "peak_bytes": peak,
        "headroom_bytes": spec.hbm_bytes - peak,
        # libtpu refuses (RESOURCE_EXHAUSTED) what does not fit its usable HBM, so a TPU step that compiled
        # fits by the compiler's own accounting (which can be below the sum of its reported buffers). The
        # GPU compiler never refuses: there the peak is checked against the card's memory.
        "fits": target.platform == "tpu" or peak <= spec.hbm_bytes,
        "compiled_flops_per_device": stats["flops"],
        "compiled_flops_per_step": stats["flops"] * r["num_devices"],
        "flops_ratio": stats["flops"] / analytic if analytic else float("nan"),
        "unknown_trip_counts": stats["unknown_trip_counts"],
        "collectives": stats["collectives"],
        "custom_calls": stats["custom_calls"],
        "roofline": {
            "compute_s": compute_s,
            "comm_s": comm_s,
            "step_time_s": step_s,
            "clips_per_s": r["global_batch"] / step_s if step_s else float("nan"),
            "comm_share": comm_s / step_s if step_s else 0.0,
        },
        "fast_path": None,
    }
    if target.platform == "cuda":
        import jax

        # The state's leaves in argument order (the state is the step's first argument).
        paths = jax.tree_util.tree_flatten_with_path(trainer.abstract_state)[0]
        leaves = [re.sub(r"[\[\]']", "", jax.tree_util.keystr(p)).replace(".value", "") for p, _ in paths]
        section["fast_path"] = gpu_fast_path(
            text,
            bf16=config.model.dtype == "bfloat16",
            cudnn_attention=config.model.get("attention", "xla") == "cudnn",
            state_leaves=leaves,
        )
    return section


def gpu_fast_path(
    hlo_text: str, *, bf16: bool, cudnn_attention: bool, state_leaves: list[str] | None = None
) -> list[dict]:
    """Checks an optimized GPU step (``compiled.as_text()``) for the H100 fast path; one finding per check:
    ``{"check", "ok" (True/False, None = not applicable), "detail"}``.

    - bf16 GEMMs: with ``model.dtype=bfloat16`` no matmul of the encoder multiplies f32 by f32 (f32 results
      of bf16 operands are the fp32 accumulation, wanted);
    - cuDNN attention: with ``model.attention=cudnn`` the attention is cuDNN's fused kernel (``__cudnn$fmha*``);
    - no host transfer: no send/recv/infeed/outfeed or host-offload custom call inside the step;
    - donation: the donated state's buffers are aliased to the outputs (``input_output_alias``), so the
      update happens in place. ``state_leaves`` (names of the flattened state, in argument order) say
      which parameters are the state."""
    from atst_jax.tools import hlo_stats

    comps, entry = hlo_stats.parse(hlo_text)
    mult, _ = hlo_stats.multiplicities(comps, entry)
    findings = []

    # Matmuls by operand dtypes, weighted by FLOPs; "trunk" = ops whose source is the encoder's blocks.
    by_kind: dict[str, float] = {}
    f32_trunk: list[str] = []
    for name, instrs in comps.items():
        if not mult.get(name):
            continue
        table = {i.name: i.type for i in instrs}
        for i in instrs:
            target = re.search(r'custom_call_target="([^"]+)"', i.rest) if i.op == "custom-call" else None
            is_gemm = i.op == "dot" or (target is not None and hlo_stats.is_gemm(target.group(1)))
            if not is_gemm or len(i.operands) < 2:
                continue
            kinds = [hlo_stats.arrays(table.get(o, ""))[:1] for o in i.operands[:2]]
            a, b = (k[0][0] if k else "?" for k in kinds)
            out = hlo_stats.arrays(i.type)[0][0] if hlo_stats.arrays(i.type) else "?"
            flops = hlo_stats._gemm_flops(i, table) if i.op != "dot" else hlo_stats._dot_flops(i, table)
            key = f"{a} x {b} -> {out}"
            by_kind[key] = by_kind.get(key, 0.0) + flops * mult[name]
            op_name = re.search(r'op_name="([^"]+)"', i.rest)
            where = op_name.group(1) if op_name else i.name
            if a == b == "f32" and re.search(r"block|encoder|trunk|attn|mlp", where, re.I):
                f32_trunk.append(where)
    total = sum(by_kind.values()) or 1.0
    mix = ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    if bf16:
        ok = not f32_trunk
        detail = f"matmul FLOPs by operand/result dtypes: {mix}"
        if f32_trunk:
            detail += f"; f32 x f32 in the trunk: {len(f32_trunk)} (e.g. {sorted(set(f32_trunk))[:3]})"
        findings.append({"check": "bf16 GEMMs with fp32 accumulation", "ok": ok, "detail": detail})
    else:
        findings.append(
            {
                "check": "bf16 GEMMs with fp32 accumulation",
                "ok": None,
                "detail": f"model.dtype is not bfloat16; {mix}",
            }
        )

    targets: dict[str, int] = {}
    for name, instrs in comps.items():
        for i in instrs:
            if i.op == "custom-call" and mult.get(name):
                t = re.search(r'custom_call_target="([^"]+)"', i.rest)
                if t:
                    targets[t.group(1)] = targets.get(t.group(1), 0) + mult[name]
    fmha = {t: n for t, n in targets.items() if t.startswith("__cudnn$fmha")}
    findings.append(
        {
            "check": "cuDNN fused attention",
            "ok": bool(fmha) if cudnn_attention else None,
            "detail": (f"custom calls {fmha}" if fmha else "no __cudnn$fmha custom call")
            + ("" if cudnn_attention else " (model.attention is not cudnn)"),
        }
    )

    host_ops = sorted(
        {
            i.op
            for name, instrs in comps.items()
            if mult.get(name)
            for i in instrs
            if i.op in ("send", "recv", "send-done", "recv-done", "infeed", "outfeed", "host-compute")
        }
        | {t for t in targets if re.search(r"host|MoveTo", t, re.I)}
    )
    findings.append(
        {
            "check": "no host transfer in the step",
            "ok": not host_ops,
            "detail": f"host ops: {host_ops}" if host_ops else "no send/recv/infeed/outfeed/host custom call",
        }
    )

    header = hlo_text.split("\n", 1)[0]
    aliased = {int(p) for p in re.findall(r"\((\d+), \{[^}]*\}, (?:may|must)-alias\)", header)}
    if state_leaves is not None:
        params = [i for i, n in enumerate(state_leaves) if n.startswith("params")]
        missing = [state_leaves[i] for i in params if i not in aliased]
        ok = bool(params) and not missing
        detail = (
            f"{len(aliased)} of {len(state_leaves)} state buffers aliased; params: "
            f"{len(params) - len(missing)} of {len(params)}"
        )
        if missing:
            detail += f" (not aliased: {missing[:3]})"
    else:
        ok, detail = bool(aliased), f"{len(aliased)} parameters aliased"
    findings.append({"check": "donated state aliased in place", "ok": ok, "detail": detail})
    return findings


# ======================================================================================================
# Report
# ======================================================================================================
def report(r: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    m, pd, tot = r["memory"], r["memory"]["per_device"], r["memory"]["total"]
    xla = m["xla"]
    t = r.get("target")
    if t:
        compiler = "libtpu" if t["platform"] == "tpu" else "XLA:GPU (CUDA, no autotuning)"
        head = [
            f"plan: {r['method']} {r['variant']} on {t['name']} ({t['chips']} chips, topology {t['topology']}), "
            f"mesh {mesh}",
            f"  compiled by the target's own compiler ({compiler}): memory is its buffer assignment.",
        ]
    else:
        head = [
            f"plan: {r['method']} {r['variant']} on mesh {mesh} ({r['num_devices']} simulated CPU devices)",
            "  ESTIMATE: memory is XLA:CPU's buffer assignment for the real train step, not what the TPU/GPU",
            "  compilers will allocate (the state rows are exact; temporaries depend on the compiler).",
            "  Use --target (e.g. --target v5p-256) to compile with the real compiler.",
        ]
    lines = [
        *head,
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
    label = (
        "peak (the compiler's buffer assignment)"
        if xla.get("compiler_peak")
        else "peak estimate (arguments + temporaries)"
    )
    lines.append(f"  {label:<44}{human(pd['peak']):>14}")
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
    if t:
        ratio = f"{t['flops_ratio']:.3f}" if t["flops_ratio"] == t["flops_ratio"] else "n/a"
        lines.append(
            f"    compiled program: {t['compiled_flops_per_device'] / 1e12:,.3f} TFLOP per device (loops times "
            f"their trip counts), {ratio} x analytic"
        )
        if t["unknown_trip_counts"]:
            lines.append(
                f"    (loops with unknown trip count, counted once: {len(t['unknown_trip_counts'])})"
            )
        lines += target_lines(r)
    else:
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


def target_lines(r: dict) -> list[str]:
    t, pd = r["target"], r["memory"]["per_device"]
    lines = ["", "  collectives per step (per device; ring algorithms for the bytes sent):"]
    lines.append(f"    {'kind':<20}{'count':>8}{'array bytes':>14}{'bytes sent':>14}")
    for kind, c in t["collectives"].items():
        lines.append(f"    {kind:<20}{c['count']:>8}{human(c['bytes']):>14}{human(c['wire_bytes']):>14}")
    if (
        t["platform"] == "tpu"
        and t["collectives"]["all-reduce"]["count"] > t["collectives"]["all-gather"]["count"]
    ):
        # Seen on 128+ chip slices: FSDP weight gathers compiled to all-reduces of zero-filled full arrays.
        lines.append(
            "    (libtpu may run all-gathers and reduce-scatters as all-reduces of zero-padded shards; they "
            "count as all-reduces here, at twice a ring all-gather's bytes)"
        )
    rf = t["roofline"]
    bw = t["collective_bytes_per_s"] / 1e9
    lines += [
        "",
        f"  {t['name']}: {t['peak_tflops']:g} TFLOP/s peak (dense bf16), {human(t['hbm_bytes'])} HBM, "
        f"collectives at {bw:g} GB/s per chip",
        f"    roofline (compute at peak + collectives, no overlap): {seconds(rf['step_time_s'])} per step "
        f"(compute {seconds(rf['compute_s'])}, collectives {seconds(rf['comm_s'])}, "
        f"{rf['comm_share']:.0%} communication), {rf['clips_per_s']:,.0f} clips/s",
        f"    HBM: peak {human(pd['peak'])} of {human(t['hbm_bytes'])}, headroom {human(t['headroom_bytes'])}: "
        f"{'fits' if t['fits'] else 'DOES NOT FIT'}",
    ]
    if t["fast_path"]:
        lines += ["", "  GPU fast path:"]
        for f in t["fast_path"]:
            mark = {True: "ok  ", False: "FAIL", None: "n/a "}[f["ok"]]
            lines.append(f"    [{mark}] {f['check']}: {f['detail']}")
    return lines


def summary(r: dict) -> str:
    pd, c = r["memory"]["per_device"], r["chip"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    text = (
        f"summary: {r['variant']} mesh {mesh}: peak {human(pd['peak'])}/device "
        f"(state {human(pd['state'])}, temporaries {human(r['memory']['xla'].get('temp', 0))}), "
        f"{r['flops']['analytic_per_device'] / 1e12:,.2f} TFLOP/device/step"
    )
    t = r.get("target")
    if t:
        text += (
            f"; {t['name']} roofline {seconds(t['roofline']['step_time_s'])}/step, "
            f"{t['roofline']['clips_per_s']:,.0f} clips/s; {'fits' if t['fits'] else 'does not fit'} in "
            f"{human(t['hbm_bytes'])}"
        )
    if c:
        text += (
            f"; {c['name']} at MFU {c['mfu']:g}: {seconds(c['step_time_s'])}/step, "
            f"{c['clips_per_s']:,.0f} clips/s; {'fits' if c['fits'] else 'does not fit'} in "
            f"{human(c['hbm_bytes'])}"
        )
    return text


def no_fit_message(r: dict, config) -> str:
    pd, c, xla = r["memory"]["per_device"], r["chip"] or r["target"], r["memory"]["xla"]
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


def refused_message(e: NoFit, variant: str, target, config, mesh: dict, dp: int) -> str:
    need = human(e.needed) if e.needed is not None else "more than it has"
    have = human(e.available) if e.available is not None else human(target.spec.hbm_bytes)
    hints = [
        f"a smaller train.global_batch (now {config.train.global_batch}, "
        f"{config.train.global_batch / dp:g} clips per data-parallel shard) or --max-batch"
    ]
    if config.model.remat != "full":
        hints.append(f"--config.model.remat=full (now {config.model.remat})")
    hints.append(f"more fsdp in --mesh (now fsdp={mesh['fsdp']})")
    if config.model.dtype != "bfloat16":
        hints.append("--config.model.dtype=bfloat16")
    return (
        f"error: the {variant} train step does not fit on {target.name}: the compiler needs {need} per device "
        f"but a chip has {have} of HBM. Try: {'; '.join(hints)}."
    )


def _fits(result: dict) -> bool:
    return (result["target"] or result["chip"] or {"fits": True})["fits"]


def max_batch(config, spec, num_devices, target, devices, dp: int) -> tuple[int, int, dict | None]:
    """The largest global batch (a multiple of the data-parallel size times grad_accum_steps) whose step
    fits: doubling from the configured batch until one does not fit, then bisection. Returns (batch,
    compiles, the plan of that batch)."""
    unit = dp * int(config.train.get("grad_accum_steps", 1))
    compiles, plans = 0, {}

    def fits(k: int) -> bool:
        nonlocal compiles
        config.train.global_batch = k * unit
        compiles += 1
        t0 = time.perf_counter()
        try:
            r = plan(config, spec, num_devices, None, 0.5, target, devices)
        except NoFit as e:
            need = f"needs {human(e.needed)}" if e.needed is not None else "refused by the compiler"
            print(f"max batch: {k * unit} clips: {need}, does not fit", flush=True)
            return False
        plans[k] = r
        peak = r["memory"]["per_device"]["peak"]
        print(
            f"max batch: {k * unit} clips: peak {human(peak)}, {'fits' if _fits(r) else 'does not fit'} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        return _fits(r)

    k = max(config.train.global_batch // unit, 1)
    lo, hi = 0, None  # lo fits (0: nothing known), hi does not
    while hi is None:
        if fits(k):
            lo, k = k, 2 * k
        else:
            hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    # Below the configured batch when that did not fit (lo = 0 then).
    config.train.global_batch = max(lo, 1) * unit
    return lo * unit, compiles, plans.get(lo)


def main() -> int:
    # config_flags reads --config.* overrides from sys.argv itself, so the planner always parses sys.argv.
    sys.argv = [
        a.replace("--max-batch", "--max_batch", 1) if a.startswith("--max-batch") else a for a in sys.argv
    ]
    argv = list(sys.argv)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(__doc__.strip())
        return 0
    target = None
    try:
        flags.FLAGS(argv, known_only=True)  # --mesh, --devices and --target, before JAX exists
        text = mesh_text(_MESH.value, argv[1:])
        if _TARGET.value is not None:
            from atst_jax.tools import targets

            target = targets.parse(_TARGET.value)
            if _DEVICES.value is not None:
                raise PlanError("--devices is for simulated CPU devices; --target sets the device count")
            if _CHIP.value is not None:
                raise PlanError("give --target or --chip, not both (--target names the chip)")
            missing = targets.compiler_missing(target)
            if missing:
                raise PlanError(missing)
            mesh = parse_mesh(text or f"data=1,fsdp={target.chips}")
            num_devices = target.chips
            if -1 not in mesh.values() and math.prod(mesh.values()) != num_devices:
                raise PlanError(
                    f"--mesh {','.join(f'{k}={v}' for k, v in mesh.items())} has {math.prod(mesh.values())} "
                    f"devices but {target.name} has {num_devices} chips"
                )
        else:
            if _MAX_BATCH.value:
                raise PlanError("--max-batch needs --target (the real compiler decides what fits)")
            mesh = parse_mesh(text)
            num_devices = device_count(mesh, _DEVICES.value)
    except (flags.Error, PlanError) as e:
        _fail(str(e))
    if target is None:
        _force_cpu_devices(num_devices)
    else:  # the target's compiler runs on this host's CPU: no accelerator is (or need be) present
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax  # already imported by the flag parsing above, but no backend has started yet

        jax.config.update("jax_platforms", "cpu")

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

        if target is None and jax.device_count() != num_devices:  # JAX started before main() could set it
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

    from atst_jax import sharding as shd

    sizes = dict(zip(shd.MESH_AXES, shd.mesh_shape(config.mesh, num_devices), strict=True))
    dp = shd.data_parallel_size(sizes, shd.rules_from_config(config.sharding_rules))
    devices = None
    if target is not None:
        from atst_jax.tools import targets

        try:
            devices = targets.devices(target)
        except Exception as e:  # noqa: BLE001 - a compiler that cannot describe the slice: one line
            _fail(
                f"--target={target.name}: the {target.platform} compiler cannot build topology "
                f"{target.topology}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            )
    search = None
    try:
        if _MAX_BATCH.value:
            t0 = time.perf_counter()
            batch, compiles, result = max_batch(config, spec, num_devices, target, devices, dp)
            search = {"max_global_batch": batch, "compiles": compiles, "wall_s": time.perf_counter() - t0}
            if result is None:
                _fail(
                    f"error: not even {dp} clips (one per data-parallel shard) fit on {target.name}; try "
                    "--config.model.remat=full, more fsdp in --mesh, or shorter crops",
                    EXIT_NO_FIT,
                )
        else:
            result = plan(
                config,
                spec,
                num_devices,
                _CHIP.value,
                _MFU.value,
                target,
                devices,
                keep_compiled=bool(_HLO.value),
            )
            if _HLO.value:
                with open(_HLO.value, "w") as fh:
                    fh.write(result.pop("compiled").as_text())
    except ConfigError as e:
        _fail(str(e))
    except NoFit as e:
        _fail(refused_message(e, config.get("variant", ""), target, config, sizes, dp), EXIT_NO_FIT)
    except NotImplementedError as e:  # a kernel's own limits, e.g. cuDNN attention wants an even length
        where = f" on {target.name}" if target is not None else ""
        _fail(f"the step cannot be compiled{where} as configured: {str(e).splitlines()[0]}")
    result["max_batch"] = search
    out = report(result)
    if search:
        out += (
            f"\nmax batch: {search['max_global_batch']} clips per step fit on {target.name} "
            f"({search['max_global_batch'] // dp} per data-parallel shard), found with {search['compiles']} "
            f"compiles in {search['wall_s']:.0f} s"
        )
    print(out, flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as fh:
            json.dump(result, fh, indent=1)
    if not _fits(result):
        _fail(no_fit_message(result, config), EXIT_NO_FIT)
    return 0


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
