"""Accelerator suite: one command that measures the ATST-Frame step on a GPU in a few minutes.

    python -m atst_jax.bench gpu [--official PATH] [--batches 64,128,256] [--compare-batch 128]
        [--out bench_gpu.json] [--time-budget-s 420] [--variants LIST] [--chip h200]
    python -m atst_jax.bench gpu --dry-run [...]      (tiny config on the CPU: what CI runs)

What it measures, in this order (the budget cuts the tail, and the JSON says what was skipped):

1. ``main``: our full train step (both views through teacher and student, heads, AdamW, EMA) in bf16
   compute (float32 parameters), ``lax.scan`` over layers, at ``--compare-batch``; on out-of-memory the
   batch is halved until it fits (recorded).
2. ``official``: the official PyTorch step (``--official PATH``, see ``bench_official.py``) at the same
   batch, fp32 as published and under ``torch.autocast(bf16)``.
3. ``cudnn``: ``model.attention=cudnn`` (cuDNN's fused flash attention) at the compare batch.
4. ``ref``: the step in float32 with ``jax_default_matmul_precision=highest`` (no TF32), the numerics
   reference: every variant at the same batch reports the largest relative difference of its per-step
   losses from it, against the stated bf16 tolerance (1 %, tests/test_scale.py).
5. ``batches``: ``main`` at the other ``--batches`` (the larger first); one that does not fit is retried
   with ``model.remat=save_dots``, and larger ones are then skipped.
6. Ablations at the compare batch: ``unrolled`` (``model.scan_layers=false``), ``save_dots``
   (``model.remat=save_dots``), ``dpa`` (``model.attention=dot_product_attention``), ``flags_none``
   (XLA's defaults, none of the flags below), ``flags_cublas`` (also ``--xla_gpu_enable_triton_gemm=false``).

Every variant runs in its own process (a clean peak-memory counter, and a failed or out-of-memory variant
cannot take the others down): compile time (``lower().compile()``), s/step = the median over ``--windows``
windows of ``--steps`` steps each, synchronised only at each window's end (the step itself has no host
sync and donates the state), clips/s, TFLOP/s from the analytic ``Trainer.step_flops``, MFU against
``flops.CHIPS[chip]["peak_tflops"]``, the measured ``peak_bytes_in_use``, XLA:GPU's own memory analysis,
and beside them the planner's estimate for the same config (``plan.plan`` on the CPU, in a background
process: the calibration row). XLA flags: ``FLAG_PROFILES``; the default profile turns on the
latency-hiding scheduler, which is what the launchers set. The JSON also holds the environment (versions,
device, XLA_FLAGS) and the ratios to the official step.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from atst_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
FRAME_CONFIG = str(ROOT / "configs" / "atst_frame.py")
RESULT = "BENCH_GPU_RESULT "  # a child's result line on stdout
BF16_RTOL = 1e-2  # per-step loss tolerance of bf16 compute vs fp32 (tests/test_scale.py)
MFU_GOAL, SPEEDUP_GOAL = 0.55, 5.0

# XLA flags per profile. The latency-hiding scheduler overlaps collectives with compute (several GPUs);
# triton_gemm=false sends every GEMM to cuBLAS instead of XLA's Triton emitter, measured as an ablation.
FLAG_PROFILES = {
    "none": "",
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "lhs_cublas": "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false",
}
DEFAULT_PROFILE = "lhs"
GPU_MEM_FRACTION = "0.94"  # of the card for JAX's allocator (default 0.75): room for the largest batch

VARIANTS = (  # the order they run in
    "main",
    "official",
    "cudnn",
    "ref",
    "batches",
    "unrolled",
    "save_dots",
    "dpa",
    "flags_none",
    "flags_cublas",
)
# name -> (config overrides, flag profile, matmul precision), all at the compare batch
ABLATIONS = {
    "cudnn": (["model.attention=cudnn"], DEFAULT_PROFILE, None),
    "unrolled": (["model.scan_layers=false"], DEFAULT_PROFILE, None),
    "save_dots": (["model.remat=save_dots"], DEFAULT_PROFILE, None),
    "dpa": (["model.attention=dot_product_attention"], DEFAULT_PROFILE, None),
    "flags_none": ([], "none", None),
    "flags_cublas": ([], "lhs_cublas", None),
}

DRY = dict(
    config=FRAME_CONFIG + ":tiny",
    sets=["model.depth=1", "atst_frame.crop_seconds=1.0"],
    batches="4",
    compare_batch=4,
    warmup=1,
    steps=1,
    windows=1,
    official_steps=1,
    official_windows=1,
    official_arch="small",  # the official code has no tiny
)
GPU = dict(
    config=FRAME_CONFIG + ":base",
    sets=[],
    batches="64,128,256",
    compare_batch=128,
    warmup=2,
    steps=10,
    windows=3,
    official_steps=5,  # no compile to amortise, and its fp32 step is the slow one
    official_windows=2,
    official_arch="base",
)


class SuiteError(UserError):
    """A bad command line; one line, exit 2."""


# ======================================================================================================
# Children: one variant, the planner rows, the official step
# ======================================================================================================
def _first_line(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def _is_oom(text: str) -> bool:
    return bool(re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|OutOfMemory", text))


def run_variant(spec: dict) -> dict:
    """Compiles and times one variant of our step; see the module docstring."""
    t_start = time.perf_counter()
    import jax

    if spec.get("precision"):
        jax.config.update("jax_default_matmul_precision", spec["precision"])
    dev = jax.devices()[0]
    out = {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
    }
    if not spec["dry_run"] and jax.default_backend() == "cpu":
        return dict(
            out, status="no_accelerator", error="JAX found no accelerator (backend cpu); use --dry-run"
        )
    from atst_jax.flops import CHIPS, chip_from_device
    from atst_jax.tools import bench_step as bench
    from atst_jax.tools.plan import xla_memory

    config, trainer = bench.make_trainer(spec["config"], spec["batch"], spec["sets"])
    state = trainer.init(config.seed)
    host = trainer.synthetic_batch(0)
    batch = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in host.items()}
    jax.block_until_ready((state, batch))
    t0 = time.perf_counter()
    lowered = trainer.jit_train_step().lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    xla, xla_peak = xla_memory(compiled)
    if config.model.get("attention", "xla") != "xla":
        out["cudnn_attention_in_hlo"] = "cudnn$fmha" in compiled.as_text()
    losses = []
    for _ in range(spec["warmup"]):
        state, metrics = compiled(state, batch)
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    windows = []
    for _ in range(spec["windows"]):
        t = time.perf_counter()
        for _ in range(spec["steps"]):
            state, metrics = compiled(state, batch)
            losses.append(metrics["loss"])
        jax.block_until_ready(state)  # the only sync: at the window's end
        windows.append((time.perf_counter() - t) / spec["steps"])
    losses = [float(v) for v in losses]
    med = sorted(windows)[len(windows) // 2]
    chip = spec.get("chip") or chip_from_device(dev)
    tflops = trainer.step_flops / jax.device_count() / med / 1e12
    stats = dev.memory_stats() or {}
    return dict(
        out,
        status="ok",
        method=config.method,
        official_inputs=trainer.method.official_step_inputs(),
        batch=spec["batch"],
        frames={c.name: c.frames for c in trainer.method.inputs()},
        model_dtype=config.model.dtype,
        remat=config.model.remat,
        scan_layers=bool(config.model.scan_layers),
        attention=config.model.get("attention", "xla"),
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        step_s_median=med,
        step_s_windows=windows,
        clips_per_s=spec["batch"] / med,
        step_flops=float(trainer.step_flops),
        tflops_per_device=tflops,
        chip=chip,
        mfu=tflops / CHIPS[chip]["peak_tflops"] if chip in CHIPS else None,
        peak_bytes=stats.get("peak_bytes_in_use"),
        bytes_limit=stats.get("bytes_limit"),
        xla_memory=xla,
        xla_peak_estimate=xla_peak,
        losses=losses,
        finite=all(v == v and abs(v) != float("inf") for v in losses),
        wall_s=time.perf_counter() - t_start,
    )


def run_plans(spec: dict):
    """The planner's rows (``plan.plan`` on CPU devices, one per config), one result line each."""
    from atst_jax.tools import bench_step as bench
    from atst_jax.tools.plan import plan

    for row in spec["rows"]:
        t = time.perf_counter()
        try:
            config = bench.make_config(spec["config"], row["batch"], row["sets"])
            r = plan(config, spec["config"], 1, None, 0.5)
            mem = r["memory"]["per_device"]
            res = {"key": row["key"], "status": "ok", "peak_bytes": mem["peak"], "state_bytes": mem["state"]}
            res.update(xla=r["memory"]["xla"], compile_s=r["compile_s"])
        except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others
            res = {"key": row["key"], "status": "error", "error": _first_line(e)}
        res["wall_s"] = time.perf_counter() - t
        print(RESULT + json.dumps(res), flush=True)


def run_official(spec: dict) -> dict:
    """The official step at our config's crop, mel bins and mask ratio (this process has JAX on the CPU
    only, so that JAX never takes GPU memory from PyTorch)."""
    from atst_jax.tools import bench_official

    if "frames" not in spec:  # no main variant reported them: read the config (imports the trainer)
        from atst_jax import methods
        from atst_jax.tools import bench_step as bench

        config = bench.make_config(spec["config"], spec["batch"], spec["sets"])
        inputs = methods.build(config).official_step_inputs()
        if inputs is None:
            return {"status": "error", "error": f"{config.method} has no official PyTorch step to time"}
        spec = dict(spec, **inputs)
    return dict(bench_official.run(spec), status="ok")


def _child(kind: str, spec: dict) -> int:
    try:
        if kind == "plan":
            run_plans(spec)
            return 0
        if kind == "official":
            result = run_official(spec)
        else:
            result = run_variant(spec)
    except Exception as e:  # noqa: BLE001 -- the parent records any failure as one line
        result = {"status": "oom" if _is_oom(str(e)) else "error", "error": _first_line(e)}
    print(RESULT + json.dumps(result), flush=True)
    return 0


# ======================================================================================================
# Parent: the plan of variants, the budget, the JSON
# ======================================================================================================
def _child_env(args, profile: str | None, platform_cpu: bool) -> dict:
    env = dict(os.environ)
    # Drop a simulated device count (pytest's 8): the suite times one real device, or one CPU.
    inherited = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    flags = inherited + (FLAG_PROFILES[profile].split() if profile else [])
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if platform_cpu:
        env["JAX_PLATFORMS"] = "cpu"
    elif not args.dry_run:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION)
    return env


def _spawn(kind: str, spec: dict, env: dict, timeout: float) -> tuple[list[dict], str]:
    """Runs a child to completion (or ``timeout``): its result lines and the tail of its stderr."""
    cmd = [sys.executable, "-m", "atst_jax.tools.bench_gpu", "--child", kind, json.dumps(spec)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return [json.loads(x[len(RESULT) :]) for x in out.splitlines() if x.startswith(RESULT)] or [
            {"status": "timeout", "error": f"stopped after {timeout:.0f} s (time budget)"}
        ], ""
    results = [json.loads(x[len(RESULT) :]) for x in p.stdout.splitlines() if x.startswith(RESULT)]
    err = p.stderr.strip().splitlines()
    if not results:
        tail = " | ".join(err[-3:])[-600:]
        status = "oom" if _is_oom(p.stderr) else "error"
        results = [
            {"status": status, "error": f"exit {p.returncode}: {tail}" if tail else f"exit {p.returncode}"}
        ]
    return results, "\n".join(err[-20:])


def _versions() -> dict:
    names = ["jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "numpy", "torch"]
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        q = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        return subprocess.run(
            ["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _variant_spec(
    args, name, batch, sets=(), profile=DEFAULT_PROFILE, precision=None, role="ablation", **timing
):
    spec = dict(
        name=name,
        role=role,
        config=args.config,
        batch=batch,
        sets=list(args.set) + ["model.dtype=bfloat16"] * (precision is None) + list(sets),
        profile=profile,
        precision=precision,
        chip=args.chip,
        dry_run=args.dry_run,
        warmup=args.warmup,
        steps=args.steps,
        windows=args.windows,
    )
    spec.update(timing)
    return spec


def _with_save_dots(spec: dict) -> dict:
    return dict(spec, name=spec["name"] + "-save_dots", sets=spec["sets"] + ["model.remat=save_dots"])


def _memory_key(spec: dict) -> str:
    """Planner rows are per memory-relevant config: batch and overrides, attention left to XLA (the CPU
    compiler has no cuDNN attention)."""
    sets = sorted(s for s in spec["sets"] if not s.startswith("model.attention="))
    return f"b{spec['batch']}:" + ",".join(sets)


class Suite:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.time_budget_s
        self.results: list[dict] = []
        self.skipped: list[dict] = []
        self.official: dict | None = None
        self.compare_batch = args.compare_batch
        self.profile_ok = {p: True for p in FLAG_PROFILES}
        self.device = {}
        self.planner: dict = {}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str):
        print(f"[bench gpu {time.monotonic() - self.t0:6.1f} s] {msg}", flush=True)

    def run_jax(self, spec: dict) -> dict:
        if spec["profile"] and not self.profile_ok[spec["profile"]]:
            spec["profile_requested"], spec["profile"] = spec["profile"], "none"
        if self.remaining() < self.args.min_variant_s:
            self.skipped.append({"name": spec["name"], "reason": "time budget"})
            self.log(f"skip {spec['name']}: time budget")
            return {"status": "skipped"}
        self.log(f"{spec['name']}: batch {spec['batch']}, {' '.join(spec['sets'])}, flags {spec['profile']}")
        env = _child_env(self.args, spec["profile"], platform_cpu=self.args.dry_run)
        if spec["precision"]:
            env["JAX_DEFAULT_MATMUL_PRECISION"] = spec["precision"]
        (res, *_), err = _spawn("variant", spec, env, self.remaining())
        if (
            res["status"] == "error"
            and "nknown flag" in res.get("error", "") + err
            and spec["profile"] != "none"
        ):
            # This jaxlib does not know a flag of the profile: note it, and run the rest without that profile.
            self.profile_ok[spec["profile"]] = False
            self.log(
                f"{spec['name']}: XLA refused flags {FLAG_PROFILES[spec['profile']]!r}; retrying without"
            )
            return self.run_jax(dict(spec, profile_failed=spec["profile"]))
        res = {**{k: spec[k] for k in ("name", "role", "batch", "sets", "profile", "precision")}, **res}
        res["xla_flags"] = env["XLA_FLAGS"]
        if not self.device and "device_kind" in res:
            self.device = {k: res[k] for k in ("backend", "device_kind", "devices", "jax") if k in res}
        self.results.append(res)
        if res["status"] == "ok":
            mfu = f", MFU {res['mfu']:.1%}" if res.get("mfu") is not None else ""
            self.log(
                f"  {res['step_s_median'] * 1e3:.1f} ms/step, {res['clips_per_s']:.1f} clips/s, "
                f"{res['tflops_per_device']:.2f} TFLOP/s{mfu}, compile {res['compile_s']:.1f} s"
            )
        else:
            self.log(f"  {res['status']}: {res.get('error', '')}")
        return res

    def run_official(self):
        a = self.args
        if self.remaining() < a.min_variant_s:
            self.skipped.append({"name": "official", "reason": "time budget"})
            return
        spec = dict(
            path=a.official,
            arch=a.official_arch,
            batch=a.official_batch or self.compare_batch,
            config=a.config,
            sets=list(a.set),
            modes=a.official_modes.split(","),
            warmup=a.warmup,
            steps=a.official_steps,
            windows=a.official_windows,
        )
        main = next((r for r in self.results if r["role"] == "main" and r["status"] == "ok"), None)
        if main and main.get("official_inputs") is None:
            self.skipped.append(
                {"name": "official", "reason": f"{main['method']} has no official PyTorch step"}
            )
            return
        spec.update((main or {}).get("official_inputs") or {})
        self.log(f"official PyTorch step ({a.official_arch}, batch {spec['batch']}, modes {spec['modes']})")
        (res, *_), _ = _spawn("official", spec, _child_env(a, None, platform_cpu=True), self.remaining())
        self.official = res
        for mode, r in (res.get("modes") or {}).items():
            if r.get("status") == "ok":
                self.log(f"  {mode}: {r['step_s_median'] * 1e3:.1f} ms/step, {r['clips_per_s']:.1f} clips/s")
        if res.get("status") != "ok":
            self.log(f"  {res.get('status')}: {res.get('error', '')}")

    def run(self):
        a, want = self.args, set(self.args.variants)
        if "cudnn" in want and a.dry_run:
            self.skipped.append({"name": "cudnn", "reason": "cuDNN attention needs a CUDA GPU"})
        # The planner's rows run from the start beside the variants (a CPU-only process), one per config
        # planned, the save_dots retries of the larger batches last.
        first = _variant_spec(a, f"main-b{self.compare_batch}", self.compare_batch, role="main")
        planned = self._planned_specs(want)
        retries = [
            _with_save_dots(s) for s in planned if s["role"] == "batch" and s["batch"] > first["batch"]
        ]
        rows = {}
        for s in [first] * ("main" in want) + planned + retries:
            rows.setdefault(_memory_key(s), {"key": _memory_key(s), "batch": s["batch"], "sets": s["sets"]})
        planner = None if a.no_plan else self._start_planner(list(rows.values()))
        status = "error: interrupted"
        try:
            status = self._run_main(want)
            if status == "ok":
                if self.compare_batch != first["batch"]:
                    planned = self._planned_specs(want)
                status = self._run_rest(want, planned)
            return status
        finally:  # a suite that stopped early does not wait for the planner
            self.planner = self._finish_planner(planner, wait=status == "ok")

    def _run_main(self, want) -> str:
        """1. main at the compare batch, halving it on out-of-memory."""
        while "main" in want:
            spec = _variant_spec(self.args, f"main-b{self.compare_batch}", self.compare_batch, role="main")
            res = self.run_jax(spec)
            if res["status"] == "no_accelerator":
                return "blocked: no accelerator available"
            if res["status"] == "error":  # the others would fail alike (config, import, ...)
                return f"error: {res['name']} failed: {res.get('error', '')}"
            if res["status"] != "oom" or self.compare_batch == 1:
                break
            self.compare_batch //= 2
        return "ok"

    def _run_rest(self, want, planned) -> str:
        # 2. official
        if "official" in want and self.args.official:
            self.run_official()
        elif "official" in want:
            self.skipped.append({"name": "official", "reason": "no --official PATH given"})
        # 3-5. the rest, in order
        for spec in planned:
            if spec["role"] == "skip":
                self.skipped.append({"name": spec["name"], "reason": "a smaller batch did not fit"})
                continue
            res = self.run_jax(spec)
            if spec["role"] == "batch" and res["status"] == "oom":
                if self.run_jax(_with_save_dots(spec))["status"] == "oom":
                    for later in planned:
                        if later["role"] == "batch" and later["batch"] > spec["batch"]:
                            later["role"] = "skip"
            if res["status"] == "no_accelerator":
                return "blocked: no accelerator available"
        return "ok"

    def _planned_specs(self, want) -> list[dict]:
        """Everything after main and official, in ``VARIANTS`` order (the budget cuts the tail)."""
        a, b = self.args, self.compare_batch
        specs = []
        for name in VARIANTS:
            if name not in want:
                continue
            if name == "batches":  # larger than the compare batch first (ascending), then the smaller ones
                larger = sorted(x for x in a.batch_list if x > b)
                smaller = sorted((x for x in a.batch_list if x < b), reverse=True)
                specs += [_variant_spec(a, f"main-b{x}", x, role="batch") for x in larger + smaller]
            elif name == "ref":
                specs.append(
                    _variant_spec(
                        a, f"ref-fp32-b{b}", b, precision="highest", role="ref", warmup=2, steps=2, windows=1
                    )
                )
            elif name in ABLATIONS and not (name == "cudnn" and a.dry_run):
                sets, profile, precision = ABLATIONS[name]
                specs.append(_variant_spec(a, f"{name}-b{b}", b, sets, profile, precision))
        return specs

    def _start_planner(self, rows):
        spec = {"config": self.args.config, "rows": rows}
        env = _child_env(self.args, None, platform_cpu=True)
        cmd = [sys.executable, "-m", "atst_jax.tools.bench_gpu", "--child", "plan", json.dumps(spec)]
        out = open(Path(self.args.out).with_suffix(".planner.log"), "w")  # noqa: SIM115 -- closed in _finish
        self.log(f"planner: {len(rows)} configs on the CPU, in the background")
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True), out

    def _finish_planner(self, planner, wait: bool) -> dict:
        if planner is None:
            return {}
        proc, out = planner
        try:
            proc.wait(timeout=max(self.remaining(), 1) if wait else 0.1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.log("planner stopped" + (" at the time budget" if wait else ""))
        out.close()
        text = Path(out.name).read_text()
        Path(out.name).unlink(missing_ok=True)
        rows = {
            r["key"]: r
            for r in (json.loads(x[len(RESULT) :]) for x in text.splitlines() if x.startswith(RESULT))
        }
        if not rows and text.strip():
            self.skipped.append(
                {"name": "planner", "reason": " | ".join(text.strip().splitlines()[-3:])[-600:]}
            )
        return rows


def summarise(suite: Suite, status: str) -> dict:
    a = suite.args
    ok = [r for r in suite.results if r.get("status") == "ok"]
    ref = next((r for r in ok if r["role"] == "ref"), None)
    for r in ok:
        if ref is not None and r is not ref and r["batch"] == ref["batch"]:
            n = min(len(r["losses"]), len(ref["losses"]))
            diff = max(
                abs(x - y) / max(abs(y), 1e-12)
                for x, y in zip(r["losses"][:n], ref["losses"][:n], strict=True)
            )
            r["numerics"] = {
                "vs": ref["name"],
                "steps": n,
                "max_rel_loss_diff": diff,
                "rtol": BF16_RTOL,
                "within_tolerance": diff <= BF16_RTOL,
            }
    calibration = []
    for r in suite.results:
        p = suite.planner.get(_memory_key(r), {})
        if r.get("status") not in ("ok", "oom") and not p:
            continue
        calibration.append(
            {
                "variant": r["name"],
                "status": r["status"],
                "measured_peak_bytes": r.get("peak_bytes"),
                "xla_estimate_bytes": r.get("xla_peak_estimate"),  # the backend's own compiler
                "planner_peak_bytes": p.get("peak_bytes"),
                "planner_status": p.get("status", "not run"),
                "measured_over_planner": (
                    r["peak_bytes"] / p["peak_bytes"] if r.get("peak_bytes") and p.get("peak_bytes") else None
                ),
            }
        )
    main = next((r for r in ok if r["role"] == "main"), None)
    # Candidates for "best": bf16 variants with finite losses inside the numerics tolerance.
    bf16 = [
        r
        for r in ok
        if r["role"] != "ref" and r["finite"] and r.get("numerics", {}).get("within_tolerance", True)
    ]
    best = max(bf16, key=lambda r: r["clips_per_s"], default=None)
    # Same architecture on both sides? (The dry run puts our tiny config beside the official small.)
    arch = a.config.rsplit(":", 1)[-1]
    comparable = not a.dry_run and arch == a.official_arch
    comparison = {"comparable": comparable, "ours_main": _brief(main), "ours_best": _brief(best)}
    modes = (suite.official or {}).get("modes") or {}
    for mode, o in modes.items():
        if o.get("status") != "ok":
            comparison[f"official_{mode}"] = {"status": o.get("status")}
            continue
        per_clip = main["step_flops"] / main["batch"] if main and comparable else None
        comparison[f"official_{mode}"] = {
            "batch": o["batch"],
            "clips_per_s": o["clips_per_s"],
            "step_s": o["step_s_median"],
            "tflops": per_clip * o["batch"] / o["step_s_median"] / 1e12 if per_clip else None,
            "ours_main_over_official": main["clips_per_s"] / o["clips_per_s"] if main else None,
            "ours_best_over_official": best["clips_per_s"] / o["clips_per_s"] if best else None,
        }
    mfus = [r["mfu"] for r in bf16 if r.get("mfu") is not None]
    goals = {
        "assessed": not a.dry_run,  # a dry run exercises the code; its figures say nothing of the goals
        "mfu_goal": MFU_GOAL,
        "best_mfu": max(mfus, default=None),
        "mfu_met": (max(mfus) >= MFU_GOAL) if mfus and not a.dry_run else None,
        "speedup_goal": SPEEDUP_GOAL,
    }
    for mode in modes:
        ratio = (comparison.get(f"official_{mode}") or {}).get("ours_best_over_official")
        goals[f"speedup_vs_official_{mode}"] = ratio
        goals[f"speedup_met_{mode}"] = None if ratio is None or not comparable else ratio >= SPEEDUP_GOAL
    return {
        "suite": "atst_jax.bench gpu",
        "status": status,
        "dry_run": a.dry_run,
        "command": " ".join(["python -m atst_jax.bench gpu", *sys.argv[1:]]) if a.argv is None else a.argv,
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": time.monotonic() - suite.t0,
        "time_budget_s": a.time_budget_s,
        "skipped": suite.skipped,
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "packages": _versions(),
            "device": suite.device,
            "nvidia_smi": _nvidia_smi(),
            "xla_flags_inherited": os.environ.get("XLA_FLAGS", ""),
            "flag_profiles": FLAG_PROFILES,
            "default_profile": DEFAULT_PROFILE,
            "gpu_mem_fraction": None
            if a.dry_run
            else os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION),
        },
        "config": a.config,
        "sets": list(a.set),
        "compare_batch": suite.compare_batch,
        "variants": suite.results,
        "official": suite.official,
        "comparison": comparison,
        "goals": goals,
        "memory_calibration": calibration,
    }


def _brief(r):
    if r is None:
        return None
    keys = ("name", "batch", "step_s_median", "clips_per_s", "tflops_per_device", "mfu", "peak_bytes")
    return {k: r.get(k) for k in keys}


def _gib(b):
    return f"{b / 2**30:.2f}" if b else "-"


def print_table(report: dict):
    cal = {c["variant"]: c for c in report["memory_calibration"]}
    print(
        f"\n{'variant':<26}{'batch':>6}{'ms/step':>10}{'clips/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
        f"{'peak GiB':>10}{'plan GiB':>10}{'compile s':>10}  status"
    )
    for r in report["variants"]:
        ok = r.get("status") == "ok"
        c = cal.get(r["name"], {})
        print(
            f"{r['name']:<26}{r.get('batch', 0):>6}"
            + (
                f"{r['step_s_median'] * 1e3:>10.1f}{r['clips_per_s']:>10.1f}{r['tflops_per_device']:>9.2f}"
                if ok
                else " " * 29
            )
            + (f"{r['mfu']:>7.1%}" if ok and r.get("mfu") is not None else f"{'-':>7}")
            + f"{_gib(r.get('peak_bytes')):>10}{_gib(c.get('planner_peak_bytes')):>10}"
            + (f"{r['compile_s']:>10.1f}" if ok else " " * 10)
            + f"  {r['status']}"
            + (f" (numerics {r['numerics']['max_rel_loss_diff']:.1e})" if "numerics" in r else "")
        )
    for k, v in report["comparison"].items():
        if k.startswith("official_") and v.get("clips_per_s"):
            ratio = v.get("ours_best_over_official")
            line = f"{k}: {v['clips_per_s']:.1f} clips/s at batch {v['batch']}"
            if ratio and not report["comparison"]["comparable"]:
                line += f"; ours best / official = {ratio:.2f}x (not comparable: dry run or other sizes)"
            elif ratio:
                line += f"; ours best / official = {ratio:.2f}x"
            print(line)
    for s in report["skipped"]:
        print(f"skipped {s['name']}: {s['reason']}")


def parse_args(argv):
    from atst_jax.cli import ArgumentParser
    from atst_jax.tools import bench_step as bench

    p = ArgumentParser(prog="python -m atst_jax.bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny config on the CPU (what CI runs)")
    p.add_argument("--config", default=None, help="config spec (default base; tiny with --dry-run)")
    p.add_argument(
        "--set",
        action="append",
        default=None,
        help="config override KEY=VALUE (all variants), as --config.KEY=VALUE",
    )
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (default 64,128,256)")
    p.add_argument("--compare-batch", type=int, default=None, help="batch of main, official and ablations")
    p.add_argument("--official", default="", help="checkout of github.com/Audio-WestlakeU/audiossl")
    p.add_argument("--official-batch", type=int, default=0, help="official step's batch (default: compare)")
    p.add_argument("--official-modes", default="fp32,bf16", help="fp32 (published), bf16 (autocast), tf32")
    p.add_argument("--official-arch", default=None, help="small | base (default base; small with --dry-run)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--out", default="bench_gpu.json")
    p.add_argument("--time-budget-s", type=float, default=420.0)
    p.add_argument("--min-variant-s", type=float, default=None, help="skip a variant with less left (45 s)")
    p.add_argument("--chip", default="", help="peak for the MFU: v4 v5e v5p v6e h100 h200 (default: detect)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per timed window")
    p.add_argument("--windows", type=int, default=None, help="timed windows (s/step = their median)")
    p.add_argument("--official-steps", type=int, default=None, help="official steps per window (GPU: 5)")
    p.add_argument("--official-windows", type=int, default=None, help="official timed windows (GPU: 2)")
    p.add_argument("--no-plan", action="store_true", help="skip the planner's memory rows")
    args = bench.parse_args(p, argv, check=False)  # + --config.KEY=VALUE overrides, checked below
    defaults = DRY if args.dry_run else GPU
    for k, v in defaults.items():
        if k not in ("sets", "official_arch") and getattr(args, k, None) is None:
            setattr(args, k, v)
    args.set = list(defaults["sets"]) + list(args.set or [])
    # Every override names a field of the config, checked here in one line rather than in each variant's child.
    from atst_jax.config import apply_overrides, load_config

    apply_overrides(load_config(args.config), bench.set_pairs(args.set))
    if args.official_arch is None:  # the official model of the same size as --config, where there is one
        variant = args.config.rsplit(":", 1)[-1]
        args.official_arch = variant if variant in ("small", "base") else defaults["official_arch"]
    if args.min_variant_s is None:
        args.min_variant_s = 0.0 if args.dry_run else 45.0
    try:
        args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise SuiteError(
            f"--batches {args.batches!r}: want comma-separated integers, e.g. 64,128,256"
        ) from None
    if not args.batch_list or min(args.batch_list) < 1 or args.compare_batch < 1:
        raise SuiteError("--batches and --compare-batch must be positive")
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SuiteError(f"--variants: unknown {','.join(unknown)}; choose from {','.join(VARIANTS)}")
    modes = set(args.official_modes.split(","))
    if not modes or modes - {"fp32", "bf16", "tf32"}:
        raise SuiteError(f"--official-modes {args.official_modes!r}: choose from fp32,bf16,tf32")
    if args.official:
        from atst_jax.tools.bench_official import MODEL_FILE

        if not (Path(args.official).expanduser() / MODEL_FILE).is_file():
            raise SuiteError(
                f"--official {args.official}: not a checkout of github.com/Audio-WestlakeU/audiossl (no {MODEL_FILE})"
            )
    if args.warmup < 0 or min(args.steps, args.windows, args.official_steps, args.official_windows) < 1:
        raise SuiteError("--steps and --windows must be positive, --warmup >= 0")
    if args.chip:
        from atst_jax.flops import CHIPS

        if args.chip not in CHIPS:
            raise SuiteError(f"--chip {args.chip!r}: choose one of {', '.join(CHIPS)}")
    args.argv = None if argv is None else " ".join(["python -m atst_jax.bench gpu", *argv])
    return args


def main(argv=None) -> int:
    from atst_jax.cli import fail

    try:
        args = parse_args(argv)
    except UserError as e:  # SuiteError, ConfigError
        return fail(e)
    suite = Suite(args)
    status = suite.run()
    report = summarise(suite, status)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"\n{status}; {report['wall_s']:.0f} s; wrote {args.out}")
    if status.startswith("blocked"):
        return 3
    if status != "ok":
        return 1
    main_ok = any(r["role"] == "main" and r["status"] == "ok" for r in suite.results)
    return 0 if main_ok or "main" not in args.variants else 1


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2], json.loads(sys.argv[3])))
    sys.exit(main())
