"""The planner on real compilers (`python -m atst_jax.plan --target ...`): libtpu for a small TPU slice and
XLA's CUDA back end for an 8-GPU H100 host, both without the hardware. Skipped where the compilers are not
installed (`pip install -e '.[tpu]'` / `'.[cuda]'`).

Each real compile costs 25-45 s of one core even for a tiny model, so the tests share a few compiles through
module fixtures and run them in this process (JAX is already on CPU here; the targets' compilers need no
device). The sweep over every method (two more compiles per method) runs with ATST_JAX_TEST_ALL_TARGETS=1.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, config_path

from atst_jax import methods
from atst_jax.tools import hlo_stats, targets
from atst_jax.train import load_config

HAVE_TPU = targets.compiler_installed("tpu")
HAVE_CUDA = targets.compiler_installed("cuda")
needs_tpu = pytest.mark.skipif(not HAVE_TPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
needs_cuda = pytest.mark.skipif(
    not HAVE_CUDA, reason="the CUDA PJRT plugin is not installed (pip install -e '.[cuda]')"
)
ALL = os.environ.get("ATST_JAX_TEST_ALL_TARGETS", "0") == "1"
# One TPU slice for every in-process TPU compile: libtpu takes its host layout from the first one.
TPU = "v5p-8"


def tiny(name: str, mesh: dict, batch: int = 8, **model):
    """The method's tiny config with 1 s crops (an even token count: cuDNN's training kernels want one)."""
    config = load_config(config_path(name) + ":tiny")
    for field, value in config[name].items():
        if field.endswith("seconds"):
            config[name][field] = min(float(value), 1.04)
        elif field.endswith("frames"):
            config[name][field] = min(int(value), 105)
    config.train.global_batch = batch
    config.mesh.update(mesh)
    config.model.update(model)
    return config


def plan_on(target_name: str, config):
    from atst_jax import config as config_lib
    from atst_jax.tools import plan

    target = targets.parse(target_name)
    config_lib.check_config(config, target.chips)
    devices = targets.devices(target)
    return plan.plan(config, "tiny", target.chips, None, 0.5, target, devices, keep_compiled=True)


@pytest.fixture(scope="module")
def tpu_fsdp():
    return plan_on(TPU, tiny("atst_frame", {"data": 1, "fsdp": 4, "tensor": 1}))


@pytest.fixture(scope="module")
def tpu_dp():
    return plan_on(TPU, tiny("atst_frame", {"data": 4, "fsdp": 1, "tensor": 1}))


@pytest.fixture(scope="module")
def h100_bf16():
    config = tiny("atst_frame", {"data": 1, "fsdp": 8, "tensor": 1}, dtype="bfloat16", attention="cudnn")
    return plan_on("h100-8", config)


def test_target_names_follow_the_cloud():
    v5p = targets.parse("v5p-256")  # TensorCores: 128 chips
    assert (v5p.chips, v5p.topology, v5p.platform) == (128, "v5p:4x4x8", "tpu")
    assert targets.parse("v4-8").topology == "v4:2x2x1"
    assert targets.parse("v5litepod-16").topology == "v5e:4x4"
    assert targets.parse("v6e-256").topology == "v6e:16x16"
    h100 = targets.parse("h100-256")
    assert (h100.chips, h100.topology, h100.hosts) == (256, "1x32x8", 32)
    assert targets.parse("h100-4").topology == "1x1x4"
    for bad in ("v5p-7", "tpu9-8", "h100", "v6e-12"):
        with pytest.raises(targets.TargetError):
            targets.parse(bad)


def check_memory_matches_compiler(r):
    """The planner's figures are the compiled object's own memory analysis, printed as such."""
    from atst_jax.tools import plan

    mem = r["compiled"].memory_analysis()
    xla = r["memory"]["xla"]
    assert xla["argument"] == mem.argument_size_in_bytes and xla["temp"] == mem.temp_size_in_bytes
    assert xla["output"] == mem.output_size_in_bytes and xla["alias"] == mem.alias_size_in_bytes
    # The peak is libtpu's own (its buffer assignment, with what it reserves), not a sum of buffer kinds,
    # which it can be below (buffers of disjoint lifetimes share memory) or above (reserved scratch).
    peak = mem.peak_memory_in_bytes
    assert peak >= mem.argument_size_in_bytes and xla["compiler_peak"] == peak
    assert r["memory"]["per_device"]["peak"] == peak == r["target"]["peak_bytes"]
    assert r["target"]["headroom_bytes"] == r["target"]["hbm_bytes"] - peak
    # The arguments are the state and the batch: TPU pads arrays to its (8, 128) tiles, and jit drops batch
    # inputs a method never reads, so only the state is a floor; the donated state is aliased in place.
    per_device = r["memory"]["per_device"]
    assert per_device["state"] <= xla["argument"] <= 2 * (per_device["state"] + per_device["batch"])
    assert xla["alias"] >= per_device["state"]
    text = plan.report({k: v for k, v in r.items() if k != "compiled"})
    assert f"{plan.human(mem.temp_size_in_bytes):>14}" in text and f"peak {plan.human(peak)}" in text
    json.dumps({k: v for k, v in r.items() if k != "compiled"})  # every number goes to --json


@needs_tpu
def test_tpu_memory_and_flops_come_from_the_compiled_step(tpu_fsdp):
    r = tpu_fsdp
    check_memory_matches_compiler(r)
    assert r["target"]["fits"] and r["target"]["platform"] == "tpu"
    # The scanned layers are counted once per layer: the compiled matmuls match the analytic count.
    assert not r["target"]["unknown_trip_counts"]
    assert r["target"]["flops_ratio"] == pytest.approx(1.0, abs=0.05)


def param_bytes_per_layer_structure(r) -> int:
    """What FSDP gathers per step at most, layer by layer: each student weight for the forward pass and
    again for the backward pass, each teacher weight for its forward pass (f32 here; bf16 would halve it)."""
    total = r["memory"]["total"]
    return 2 * total["params"] + total["teacher"]


def param_shapes(config) -> set[tuple[int, ...]]:
    import jax
    from flax import nnx

    student, teacher, _ = nnx.eval_shape(lambda: methods.build(config).init(jax.random.key(0)))
    leaves = jax.tree.leaves(nnx.state(student, nnx.Param)) + jax.tree.leaves(nnx.state(teacher, nnx.Param))
    return {tuple(x.shape) for x in leaves if x.ndim >= 2}


@needs_tpu
def test_fsdp_gathers_params_and_scatters_grads_dp_all_reduces(tpu_fsdp, tpu_dp):
    fsdp, dp = tpu_fsdp["target"]["collectives"], tpu_dp["target"]["collectives"]
    # FSDP: the weights are all-gathered before use and the gradients reduce-scattered back to shards.
    assert fsdp["all-gather"]["count"] > 0 and fsdp["reduce-scatter"]["count"] > 0
    total = tpu_fsdp["memory"]["total"]
    # Every gradient once: reduce-scattered, or all-reduced where a small array stays whole (norms, biases).
    assert fsdp["reduce-scatter"]["bytes"] >= 0.5 * total["params"]
    assert fsdp["reduce-scatter"]["bytes"] + fsdp["all-reduce"]["bytes"] >= 0.9 * total["params"]
    assert fsdp["all-gather"]["bytes"] >= 0.9 * total["params"]
    assert fsdp["all-gather"]["bytes"] <= param_bytes_per_layer_structure(tpu_fsdp)
    # Pure data parallelism: replicated weights, gradients all-reduced, no weight gathered. (ATST-Frame still
    # all-gathers its input batch once: the partner clips it rolls in come from other devices.)
    assert dp["reduce-scatter"]["count"] == 0
    assert dp["all-reduce"]["bytes"] >= 0.9 * total["params"]
    gathered = set()
    comps, _ = hlo_stats.parse(tpu_dp["compiled"].as_text())
    for instrs in comps.values():
        gathered |= {hlo_stats.arrays(i.type)[0][1] for i in instrs if i.op.startswith("all-gather")}
    assert not gathered & param_shapes(tiny("atst_frame", {})), gathered


@needs_tpu
def test_oversize_batch_on_tpu_exits_3_with_one_line(tmp_path):
    # v5e has 16 GB per chip; 2^17 clips of the tiny model need far more.
    crops = ["--config.atst_frame.crop_seconds=1.04"]
    cmd = [sys.executable, "-m", "atst_jax.plan", "--config", config_path("atst_frame") + ":tiny"]
    cmd += ["--target", "v5litepod-4", "--config.train.global_batch=131072", *crops]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(1), cwd=ROOT, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    msg = lines[0]
    assert "v5litepod-4" in msg and re.search(r"needs [\d.]+ GiB", msg) and "of HBM" in msg
    assert "global_batch" in msg and "remat" in msg and "fsdp" in msg


def test_missing_compiler_exits_2_naming_the_extra():
    # A target whose compiler is not installed: one line naming the extra (no compile, no JAX device).
    target = None if HAVE_CUDA else "h100-8"
    target = target or (None if HAVE_TPU else "v5p-8")
    if target is None:
        pytest.skip("both compilers are installed here")
    cmd = [sys.executable, "-m", "atst_jax.plan", "--config", config_path("atst_frame") + ":tiny"]
    proc = subprocess.run(
        cmd + ["--target", target], capture_output=True, text=True, env=cli_env(1), cwd=ROOT
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and ".[" in lines[0], proc.stderr


@needs_cuda
def test_h100_bf16_step_is_on_the_fast_path(h100_bf16):
    r = h100_bf16
    check_memory_matches_compiler(r)
    findings = {f["check"]: f for f in r["target"]["fast_path"]}
    assert all(f["ok"] for f in findings.values()), findings
    assert "__cudnn$fmha" in findings["cuDNN fused attention"]["detail"]
    # FLOPs from the GPU program (cuBLAS GEMMs + cuDNN attention, loops x trip count) match the analytic count.
    assert r["target"]["flops_ratio"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.skipif(
    not ALL, reason="every method on both compilers: ~10 compiles; ATST_JAX_TEST_ALL_TARGETS=1"
)
@pytest.mark.parametrize(
    "target", [pytest.param(TPU, marks=needs_tpu), pytest.param("h100-8", marks=needs_cuda)]
)
@pytest.mark.parametrize("name", methods.names())
def test_every_method_compiles_for_the_target(name, target):
    chips = 4 if target == TPU else 8
    r = plan_on(target, tiny(name, {"data": 1, "fsdp": chips, "tensor": 1}))
    check_memory_matches_compiler(r)
    assert r["target"]["fits"] and r["target"]["compiled_flops_per_device"] > 0
