"""Multi-host: 2 processes × 4 CPU devices (gloo collectives over 127.0.0.1, started by
``launch/local_multiprocess.sh``) train exactly like 1 process × 8 devices."""

import json
import subprocess

import numpy as np
import pytest
from conftest import ROOT, cli_env, train_cmd

STEPS = 5


def _args(workdir, cache):
    return [
        "--workdir",
        str(workdir),
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=100",
        "--config.data.crop_seconds=2.0",  # tiny's model and batch; shorter crops keep the compile fast
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


def test_two_processes_match_one_process(tmp_path, single_process):
    workdir = tmp_path / "two_processes"
    cache = tmp_path / "cache"  # fresh: process 0 builds the embedded data, process 1 waits at the barrier
    env = cli_env(1)
    env.pop("XLA_FLAGS")
    env["ATST_CPU_DEVICES"] = "4"
    env["PYTHON"] = str(__import__("sys").executable)
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "2", *train_cmd(*_args(workdir, cache))[3:]],
        capture_output=True,
        text=True,
        env=env,
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
