"""Multi-host: 2 processes × 4 CPU devices (gloo collectives over 127.0.0.1, started by
``launch/local_multiprocess.sh``) train exactly like 1 process × 8 devices."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, cli_env, train_cmd

# One step count for every run here: the LR schedule is part of the compiled step, so the SIGTERM test's
# processes load the step the first test compiled from the XLA cache.
STEPS = 12


def _args(workdir, cache):
    return [
        "--workdir",
        str(workdir),
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=100",
        "--config.atst_frame.crop_seconds=2.0",  # tiny's model and batch; shorter crops keep the compile fast
        "--config.data.num_clips=64",
        f"--config.data.cache_dir={cache}",
        "--config.mesh.data=4",
        "--config.mesh.fsdp=2",
    ]


def _losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1)), "one metrics line per step, one writer"
    return np.array([r["loss"] for r in lines])


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, embedded_cache):
    workdir = tmp_path_factory.mktemp("one_process")
    out = subprocess.run(
        train_cmd(*_args(workdir, embedded_cache)),
        capture_output=True,
        text=True,
        env=cli_env(8),
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _launcher_env():
    env = cli_env(1)  # the launcher replaces its device count with ATST_CPU_DEVICES' (other flags stay)
    env["ATST_CPU_DEVICES"] = "4"
    env["PYTHON"] = sys.executable
    return env


def _launch_cmd(args):
    return ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "2", *train_cmd(*args)[3:]]


def test_two_processes_match_one_process(tmp_path, single_process):
    workdir = tmp_path / "two_processes"
    cache = tmp_path / "cache"  # fresh: process 0 builds the embedded data, process 1 waits at the barrier
    out = subprocess.run(
        _launch_cmd(_args(workdir, cache)),
        capture_output=True,
        text=True,
        env=_launcher_env(),
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    log = out.stdout + out.stderr
    assert "mesh {'data': 4, 'fsdp': 2, 'tensor': 1} over 2 process(es)" in log
    # Only process 0 prints progress: each step line appears once, prefixed by process 0.
    step_lines = [line for line in log.splitlines() if f"step {STEPS:>6}/{STEPS}" in line]
    assert len(step_lines) == 1 and step_lines[0].startswith("[0]"), step_lines

    ref, got = _losses(single_process), _losses(workdir)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert ref[-1] != ref[0]  # the steps really trained
    # Both processes wrote their part of one checkpoint: Orbax's commit marker and one Grain state each.
    step_dir = workdir / "checkpoints" / str(STEPS)
    assert step_dir.is_dir()
    data_files = sorted(p.name for p in (step_dir / "data").iterdir())
    assert len([n for n in data_files if "process_" in n]) == 2, data_files


def test_sigterm_stops_both_processes_at_one_step_and_they_resume(tmp_path, embedded_cache):
    """SIGTERM to the launcher reaches both processes at slightly different times; JAX's preemption service
    makes them agree on one step, both save it and exit 0. A second launch resumes from it (sharded arrays
    and each process's Grain position) and finishes."""
    workdir, steps = tmp_path / "preempted", STEPS
    args = _args(workdir, embedded_cache)
    proc = subprocess.Popen(
        _launch_cmd(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_launcher_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    lines, deadline = [], time.time() + 600
    for line in proc.stdout:
        lines.append(line)
        if f"step      3/{steps}" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-20:])
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < steps, (saved, "".join(lines[-30:]))
    assert any(f"saved step {saved[0]}" in line for line in lines)

    out = subprocess.run(
        _launch_cmd(args), capture_output=True, text=True, env=_launcher_env(), cwd=ROOT, timeout=600
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert f"resumed from {workdir / 'checkpoints' / str(saved[0])}" in out.stdout
    assert f"final step {steps}" in out.stdout
    logged = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps and logged[: saved[0]] == list(range(1, saved[0] + 1))


def test_distributed_start_up_modes():
    from atst_jax import distributed

    assert distributed.initialize({}) == "single"
    assert distributed._wants_auto({"ATST_DISTRIBUTED": "auto"})
    assert distributed._wants_auto({"SLURM_NTASKS": "16", "SLURM_STEP_ID": "0"})
    assert not distributed._wants_auto({"SLURM_NTASKS": "16"})  # the batch script, not an srun step
    assert not distributed._wants_auto({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert distributed._wants_auto({"TPU_WORKER_HOSTNAMES": "w0,w1"})
    assert not distributed._wants_auto({"TPU_WORKER_HOSTNAMES": "w0"})
    with pytest.raises(ValueError, match="ATST_NUM_PROCESSES"):
        distributed.initialize({"ATST_COORDINATOR": "127.0.0.1:1"})
    with pytest.raises(ValueError, match="not in"):
        distributed.initialize(
            {"ATST_COORDINATOR": "127.0.0.1:1", "ATST_NUM_PROCESSES": "2", "ATST_PROCESS_ID": "2"}
        )
