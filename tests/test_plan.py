"""The AOT planner (`python -m atst_jax.plan`): per-device memory of the real compiled step on simulated
devices, the HBM check against a named chip, the implied step time, and one-line errors for bad meshes.

Each case runs the CLI in a subprocess: it needs its own simulated device count (256 for the FSDP case).
"""

import json
import re
import subprocess
import sys

import pytest
from conftest import CONFIG, ROOT, cli_env

from atst_jax.flops import CHIPS
from atst_jax.methods import build
from atst_jax.train import load_config

# The base model's parameter count, from the layer shapes (D=768, 12 blocks, MLP 3072, 251 positions,
# 64×4 patches; heads: projector 768→4096→256, predictor 256→4096→256, Linear without bias + BN affine).
BASE_ENCODER_PARAMS = 85_419_264
PROJECTOR = 768 * 4096 + 2 * 4096 + 4096 * 256
PREDICTOR = 256 * 4096 + 2 * 4096 + 4096 * 256
BN_STATS_BYTES = 2 * 4096 * 4 + 4  # running mean + var (float32), num_batches_tracked (int32)


def run_plan(*args, devices=8, timeout=300):
    # The planner sets the simulated device count itself; `devices` only stands for the test environment.
    cmd = [sys.executable, "-m", "atst_jax.plan", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=cli_env(devices), cwd=ROOT, timeout=timeout
    )


@pytest.fixture(scope="module")
def fsdp256(tmp_path_factory):
    """base on 256 simulated devices, pure FSDP, with a chip: compiled once, read by two tests.

    1 s crops and one clip per device keep the compile short; the state does not depend on either."""
    out = tmp_path_factory.mktemp("plan") / "fsdp256.json"
    overrides = ["--config.train.global_batch=256", "--config.atst_frame.crop_seconds=1.0"]
    proc = run_plan(
        "--config", f"{CONFIG}:base", "--mesh", "data=1,fsdp=256", "--chip", "v5p", "--mfu", "0.4",
        "--json", str(out), *overrides,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = load_config(f"{CONFIG}:base")
    config.train.global_batch, config.atst_frame.crop_seconds = 256, 1.0
    return json.loads(out.read_text()), proc.stdout, config


def test_fsdp256_shards_the_state_across_all_devices(fsdp256):
    r, _, _ = fsdp256
    mem, n = r["memory"], 256
    assert r["num_devices"] == n and r["mesh"] == {"data": 1, "fsdp": 256, "tensor": 1}
    # The totals are what the model holds: student params (+ BN stats), AdamW mu + nu (+ count), teacher =
    # encoder + projector (+ its BN stats), all float32.
    params = BASE_ENCODER_PARAMS + PROJECTOR + PREDICTOR
    assert r["num_params"] == params and r["num_encoder_params"] == BASE_ENCODER_PARAMS
    total = mem["total"]
    assert total["params"] == 4 * params + 2 * BN_STATS_BYTES
    assert total["optimizer"] == 2 * 4 * params + 4
    assert total["teacher"] == 4 * (BASE_ENCODER_PARAMS + PROJECTOR) + BN_STATS_BYTES
    assert total["state"] == sum(total[k] for k in ("params", "optimizer", "teacher", "other"))
    # Our shard arithmetic matches XLA's own buffer assignment: its arguments are the state and the batch
    # inputs the step reads (jit drops the others, e.g. the lengths while padding counts as signal).
    per_device = mem["per_device"]
    assert per_device["state"] < mem["xla"]["argument"] <= per_device["state"] + per_device["batch"]
    assert mem["xla"]["alias"] == per_device["state"]  # the donated state is updated in place
    assert per_device["peak"] >= per_device["state"] + mem["xla"]["temp"]
    # FSDP over 256 devices: each holds about 1/256 of the state. Replicated leaves would break this.
    replicated = [x for x in mem["replicated"] if x["bytes"] >= 4096]
    assert per_device["state"] <= 1.1 * total["state"] / n, (
        f"per-device state {per_device['state']} > 1.1 x total/{n} = {1.1 * total['state'] / n:.0f}; "
        f"replicated on every device: {replicated}"
    )


def test_fitting_plan_reports_step_time_from_flops_and_peak(fsdp256):
    r, stdout, config = fsdp256
    chip = r["chip"]
    assert chip["name"] == "v5p" and chip["fits"] and chip["mfu"] == 0.4
    flops_per_device = build(config).step_flops(256) / 256  # computed here, independently of the planner
    assert r["flops"]["analytic_per_device"] == pytest.approx(flops_per_device, rel=1e-9)
    expected = flops_per_device / (CHIPS["v5p"]["peak_tflops"] * 1e12 * 0.4)
    assert chip["step_time_s"] == pytest.approx(expected, rel=1e-9)
    assert chip["clips_per_s"] == pytest.approx(256 / expected, rel=1e-9)
    assert chip["by_mfu"]["0.4"]["step_time_s"] == chip["step_time_s"]
    assert chip["by_mfu"]["0.3"]["step_time_s"] == pytest.approx(expected * 0.4 / 0.3, rel=1e-9)
    # The printed report says the same; it is honest about where the memory figures come from.
    printed = re.search(r"at MFU 0\.40: ([\d.,]+) (s|ms|µs) per step", stdout)
    assert printed, stdout
    unit = {"s": 1.0, "ms": 1e-3, "µs": 1e-6}[printed.group(2)]
    assert float(printed.group(1).replace(",", "")) * unit == pytest.approx(expected, rel=0.01)
    assert "XLA:CPU" in stdout and "fits in" in stdout.splitlines()[-1]


def test_too_big_for_the_chip_exits_3_naming_chip_and_sizes(tmp_path):
    # 512 clips on one device: the activations alone are tens of GiB, far over v5e's 16 GB.
    out = tmp_path / "plan.json"
    proc = run_plan(
        "--config", f"{CONFIG}:base", "--mesh", "data=1", "--chip", "v5e", "--json", str(out),
        "--config.train.global_batch=512", "--config.atst_frame.crop_seconds=1.0",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    peak, hbm = r["memory"]["per_device"]["peak"], CHIPS["v5e"]["hbm_bytes"]
    assert r["chip"]["fits"] is False and peak > hbm
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr
    msg = error[0]
    assert "v5e" in msg and f"{peak / 2**30:.2f} GiB" in msg and f"{hbm / 2**30:.2f} GiB" in msg
    for hint in ("fsdp", "remat", "bfloat16", "grad_accum_steps"):
        assert hint in msg


@pytest.mark.parametrize(
    "mesh, extra, expect",
    [
        ("data=2,fsdp", [], "malformed entry 'fsdp'"),
        ("data=2,fdsp=2", [], "unknown axis 'fdsp'"),
        ("data=2,data=2", [], "given twice"),
        ("data=0", [], "sizes must be positive"),
        ("data=-1", [], "needs --devices"),
        ("data=4,fsdp=4", ["--devices", "8"], "does not equal the device count 8"),
        ("data=-1,fsdp=3", ["--devices", "8"], "does not divide"),
    ],
)
def test_bad_mesh_exits_2_with_one_line(mesh, extra, expect):
    proc = run_plan("--config", f"{CONFIG}:tiny", "--mesh", mesh, *extra, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_config_errors_exit_2_before_compiling():
    # 10 clips cannot be split over 4 data-parallel devices; an unknown override is named.
    for args, expect in (
        (["--config.train.global_batch=10"], "not divisible by the data-parallel size 4"),
        (["--config.model.widht=64"], "unknown config field 'model.widht'"),
        (["--chip", "tpu9"], "--chip=tpu9"),
    ):
        proc = run_plan("--config", f"{CONFIG}:tiny", "--mesh", "data=2,fsdp=2", *args, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], proc.stderr
