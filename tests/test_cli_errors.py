"""Every command-line tool answers a careless user's mistakes (bad arguments, bad paths, a damaged checkpoint,
a missing optional extra) with exit status 2 and one line on stderr, never a traceback (issue 14, defect 5).

The argparse tools run in-process (``main(argv)``); the absl ones (``train``, ``plan``) parse flags at start-up,
so a few representative cases run as real processes and the config-level ones call ``train()`` directly.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIG, ROOT, cli_env, run_train, tiny_config

from atst_jax import bench
from atst_jax import checkpoint as ckpt_lib
from atst_jax.data import prepare
from atst_jax.data.records import write_records
from atst_jax.eval import embed
from atst_jax.export import __main__ as export_cli
from atst_jax.sharding import ConfigError
from atst_jax.tools import bench_data, scaling, sweep
from atst_jax.tools import plan as plan_tool
from atst_jax.train import train


def _one_line(code, err, needle):
    assert code == 2, err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0] and needle in lines[0], lines[0]


def _call(main, argv, capsys):
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def paths(tiny_run, tmp_path_factory):
    """A run whose only step has a truncated state array, a regular file, an audio file, a read-only place."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("cli")
    damaged = root / "damaged"
    shutil.copytree(tiny_run, damaged)
    arrays = sorted((damaged / "checkpoints" / "3" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    arrays[-1].write_bytes(arrays[-1].read_bytes()[:100])
    afile = root / "afile"
    afile.write_text("not a directory")
    (root / "unsaved" / "checkpoints").mkdir(parents=True)  # a run that has not saved a checkpoint yet
    wav = root / "audio" / "a.wav"
    wav.parent.mkdir()
    sf.write(str(wav), np.zeros(8000, np.float32), 16000)
    return {
        "run": tiny_run,
        "unsaved": root / "unsaved",
        "compose": _compose_run(root / "compose"),
        "damaged": damaged,
        "file": afile,
        "wav": wav,
        "root": root,
        "ro": _read_only(root),
    }


def _compose_run(workdir):
    """A checkpoint of compose's tiny config with zero parameters (nothing compiled): its structure and saved
    config are what export reads."""
    import jax
    from flax import nnx

    from atst_jax.config import load_config
    from atst_jax.methods import build

    config = load_config(f"{ROOT}/configs/compose.py:tiny")
    student, teacher, _ = nnx.eval_shape(lambda: build(config).init(jax.random.key(0)))

    def zeros(module, kind):
        return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(module, kind)))

    state = {
        "step": np.asarray(5, np.int32),
        "params": zeros(student, nnx.Param),
        "stats": zeros(student, nnx.BatchStat),
        "teacher": zeros(teacher, nnx.Param),
        "teacher_stats": zeros(teacher, nnx.BatchStat),
        "opt": {"count": np.asarray(5, np.int32)},
        "rng": np.zeros((2,), np.uint32),
    }
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=1, keep=1, async_save=False)
    ckpt.save(5, state, config=config, force=True)
    ckpt.close()
    return workdir


def _read_only(root):
    """A directory this process cannot write (chmod for users; root needs a read-only file system)."""
    ro = root / "read_only"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        (ro / "probe").write_text("")
    except OSError:
        return ro
    (ro / "probe").unlink()
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / "atst_probe").mkdir()
    except OSError:
        return sysfs if sysfs.is_dir() else None
    return None


# --- prepare ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "the following arguments are required: kind"),
        (["folder", "--out", "O"], "the following arguments are required: --audio_dir"),
        (["folder", "--audio_dir", "A", "--out", "O", "--workers", "many"], "invalid int value"),
        (["folder", "--audio_dir", "{root}/nope", "--out", "{root}/o"], "does not exist"),
        (["folder", "--audio_dir", "{audio}", "--out", "{file}"], "error"),
        (["audioset", "--csv", "{root}/no.csv", "--labels", "{root}/no.csv", "--audio_dir", "{audio}",
          "--out", "{root}/o"], "no.csv"),
        (["dcase", "--tsv", "{file}", "--audio_dir", "{audio}", "--out", "{root}/o"], "header"),
    ],
)  # fmt: skip
def test_prepare(argv, needle, paths, capsys):
    subs = {"root": paths["root"], "audio": paths["wav"].parent, "file": paths["file"]}
    argv = [a.format(**subs) for a in argv]
    _one_line(*_call(prepare.main, argv, capsys), needle)


# --- export -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required"),
        (["--workdir", "{root}/nope", "--format", "safetensors", "--out", "{root}/e"], "no such run directory"),
        (["--workdir", "{run}", "--format", "onnx", "--out", "{root}/e"], "unknown format 'onnx'"),
        (["--workdir", "{run}", "--format", "safetensors", "--step", "99", "--out", "{root}/e"], "step 99"),
        (["--workdir", "{damaged}", "--format", "safetensors", "--out", "{root}/e"], "unreadable"),
        (["--workdir", "{run}", "--format", "safetensors", "--out", "{file}/e.safetensors"], "cannot write"),
        (["--workdir", "{unsaved}", "--format", "safetensors", "--out", "{root}/e"],
         "unsaved has no finished checkpoint yet"),
        (["--workdir", "{compose}", "--format", "lightning", "--out", "{root}/e.ckpt"],
         "method 'compose' has no official Lightning checkpoint layout: export safetensors"),
    ],
)  # fmt: skip
def test_export(argv, needle, paths, capsys):
    argv = [a.format(**paths) for a in argv]
    _one_line(*_call(export_cli.main, argv, capsys), needle)
    assert "None" not in capsys.readouterr().err


def test_export_without_the_torch_extra(paths, capsys, monkeypatch, tmp_path):
    for name in ("safetensors", "safetensors.numpy", "torch"):
        monkeypatch.setitem(sys.modules, name, None)  # as if `pip install -e .[torch]` had not run
    for fmt in ("safetensors", "atst_sed"):
        argv = ["--workdir", str(paths["run"]), "--format", fmt, "--out", str(tmp_path / "e")]
        _one_line(*_call(export_cli.main, argv, capsys), "pip install -e .[torch]")


# --- embed ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required"),
        (["--workdir", "{run}", "--audio", "{wav}"], "--out"),
        (["--workdir", "{root}/nope", "--audio", "{wav}", "--out", "{root}/x"], "no checkpoints"),
        (["--weights", "{root}/nope.safetensors", "--audio", "{wav}", "--out", "{root}/x"], "nope.safetensors"),
        (["--workdir", "{run}", "--audio", "{root}/nope.wav", "--out", "{root}/x"], "no such file"),
        (["--workdir", "{run}", "--audio", "{wav}", "--out", "{root}/x", "--level", "scene"], "--level"),
        (["--workdir", "{run}", "--audio", "{wav}", "--out", "{root}/x", "--layers", "9"], "layers=9"),
        (["--workdir", "{run}", "--audio", "{wav}", "--out", "{root}/x", "--step", "7"], "step 7"),
        (["--workdir", "{damaged}", "--audio", "{wav}", "--out", "{root}/x"], "unreadable"),
        (["--workdir", "{run}", "--audio", "{wav}", "--out", "{file}"], "is a file"),
    ],
)  # fmt: skip
def test_embed(argv, needle, paths, capsys):
    argv = [a.format(**paths) for a in argv]
    _one_line(*_call(embed.main, argv, capsys), needle)


# --- checkpoint -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required"),
        (["show", "--workdir", "{run}"], "invalid choice"),
        (["list"], "--workdir"),
        (["list", "--workdir", "{root}/nope"], "no checkpoints"),
        (["digest", "--workdir", "{run}", "--step", "99"], "step 99"),
        (["digest", "--workdir", "{run}", "--step", "three"], "invalid int value"),
        (["digest", "--workdir", "{damaged}"], "checkpoint step 3 in"),
    ],
)  # fmt: skip
def test_checkpoint(argv, needle, paths, capsys):
    argv = [a.format(**paths) for a in argv]
    _one_line(*_call(ckpt_lib.main, argv, capsys), needle)


# --- bench and bench_data ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required"),
        (["step"], "--config"),
        (["step", "--config", "{root}/nope.py:tiny"], "no such config file"),
        (["step", "--config", f"{CONFIG}:huge"], "unknown variant 'huge'"),
        (["step", "--config", f"{CONFIG}:tiny", "--set", "model.widht=64"], "model.widht"),
        (["step", "--config", f"{CONFIG}:tiny", "--set", "model.width"], "KEY=VALUE"),
        (["step", "--config", f"{CONFIG}:tiny", "--batch", "0"], "must be positive"),
        (["step", "--config", f"{CONFIG}:tiny", "--batch", "12"], "not divisible"),
        (["data", "--workdir", "{root}/nope"], "no such directory"),
    ],
)  # fmt: skip
def test_bench(argv, needle, paths, capsys):
    argv = [a.format(**paths) for a in argv]
    _one_line(*_call(bench.main, argv, capsys), needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--what", "everything"], "invalid choice"),
        (["--clips", "lots"], "invalid int value"),
        (["--crops", "spec=1001"], "--crops wants NAME:FRAMES"),
        (["--batch", "0"], "must be positive"),
        (["--workdir", "{file}"], "no such directory"),
    ],
)
def test_bench_data(argv, needle, paths, capsys):
    argv = [a.format(**paths) for a in argv]
    _one_line(*_call(bench_data.main, argv, capsys), needle)


# --- sweep: every run's config (the knob ranges included) before anything is written or compiled ----------
@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if a train step is built or a plan compiled: these errors must come before either."""

    def compiles(*args, **kwargs):
        raise AssertionError("compiled before the one-line error")

    from atst_jax import trainer

    monkeypatch.setattr(trainer.Trainer, "jit_train_step", compiles)
    monkeypatch.setattr(plan_tool, "plan", compiles)
    monkeypatch.setattr(plan_tool, "_force_cpu_devices", lambda n: None)  # this process's JAX is running


COMPOSE, FRAME = f"{ROOT}/configs/compose.py:tiny", f"{CONFIG}:tiny"


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([COMPOSE, "--config.compose.corrupt_area=(0.5,0.2)"], "compose.corrupt_area=(0.5, 0.2): must be in (0, 1) ordered"),
        ([COMPOSE, "--config.compose.paste_prob=2"], "compose.paste_prob=2.0: must be in [0, 1]"),
        ([COMPOSE, "--config.compose.max_block=0"], "compose.max_block=0.0: must be in (0, 1]"),
        ([COMPOSE, "--config.compose.mask_block=(0,0)"], "compose.mask_block=(0, 0): must be in [1, inf)"),
        ([COMPOSE, "--grid", "compose.mask_block=(5,1),(0,0)"],
         "run mask_block0_0: config.compose.mask_block=(0, 0): must be in [1, inf)"),
        ([COMPOSE, "--config.compose.mask_block=5"], "compose.mask_block=5: the field holds a tuple such as (5,1); give a value of that form"),
        ([FRAME, "--grid", "model.width=128,0"], "run width0: model.width=0: must be in [1, inf)"),
        ([FRAME, "--config.model.depth=0"], "model.depth=0: must be in [1, inf)"),
        ([FRAME, "--config.atst_frame.mask_span=0"], "atst_frame.mask_span=0: must be in [1, inf)"),
    ],
)  # fmt: skip
def test_sweep_dry_run(argv, needle, paths, capsys, no_compile):
    # slurm: the dry run that writes the plan files when the plan is good
    argv = ["--config", *argv, "--root", str(paths["root"] / "sw"), "--dry-run", "--launcher", "slurm"]
    _one_line(*_call(sweep.main, argv, capsys), needle)
    assert not (paths["root"] / "sw").exists()


# --- scaling: its outputs and the ladder's rows checked before any work ---------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["{root}", "--out", "{file}"], "--out {file} is a file, not a directory"),
        (["{root}", "--out", "{file}/scaling"], "{file} is a file, not a directory"),
        (["ladder", "--json", "{root}/nope/ladder.json"], "--json {root}/nope/ladder.json: its folder {root}/nope does not exist"),
        (["ladder", "--json", "{file}/ladder.json"], "its folder {file} is a file"),
        (["ladder", "--variants", "tiny,huge"], "ladder row configs/atst_frame.py:huge: unknown variant 'huge'"),
        (["ladder", "--configs", "configs/nope.py"], "ladder row configs/nope.py:tiny: no such config file"),
        (["ladder", "--variants", ""], "--variants names nothing to plan"),
        (["ladder", "--mesh", "fsdp=3"], "no row of the ladder can run on mesh fsdp=3; the first: configs/atst_frame.py:tiny"),
    ],
)  # fmt: skip
def test_scaling(argv, needle, paths, capsys, monkeypatch, no_compile):
    def works(*args, **kwargs):
        raise AssertionError("the analysis started before the one-line error")

    monkeypatch.setattr(scaling, "collect", works)
    if argv[0] == "ladder":  # one small row unless the case names others
        argv = [*argv, *(["--configs", "configs/atst_frame.py"] if "--configs" not in argv else [])]
        argv = [*argv, *(["--variants", "tiny"] if "--variants" not in argv else [])]
    argv = [a.format(**paths) for a in argv]
    _one_line(*_call(scaling.main, argv, capsys), needle.format(**paths))


# --- train: the config-level errors, in-process -----------------------------------------------------------
def _incomplete_records(root):
    d = root / "incomplete"
    write_records(
        str(d), [{"mel": np.zeros((64, 101), np.float16), "length": 101, "id": "x"}] * 4, num_shards=2
    )
    (sorted(d.glob("*.array_record-*"))[0]).unlink()
    return d


@pytest.mark.parametrize(
    "change, workdir, needle",
    [
        (lambda c, p: c.train.update(global_batch=0), "{root}/w", "train.global_batch=0: must be in [1, inf)"),
        (lambda c, p: c.atst_frame.update(crop_seconds=-1.0), "{root}/w", "atst_frame.crop_seconds=-1.0"),
        (lambda c, p: None, "{file}", "is a file"),
        (lambda c, p: None, "{file}/sub", "is a file"),
        (lambda c, p: None, "{ro}/run", "not writable"),
        (lambda c, p: c.data.update(source="records", records_dir=str(p["root"] / "nope")), "{root}/w",
         "no such directory"),
        (lambda c, p: c.data.update(source="records", records_dir=str(p["wav"].parent)), "{root}/w",
         "no *.array_record-* shards"),
        (lambda c, p: c.data.update(source="records", records_dir=str(_incomplete_records(p["root"]))),
         "{root}/w", "incomplete shard set"),
    ],
    ids=["batch0", "crop", "file", "under_file", "read_only", "records_missing", "records_empty",
         "records_incomplete"],
)  # fmt: skip
def test_train_config_errors(change, workdir, needle, paths, embedded_cache):
    if "{ro}" in workdir and paths["ro"] is None:
        pytest.skip("no read-only directory available to this user")
    config = tiny_config(embedded_cache)
    change(config, paths)
    with pytest.raises(ConfigError) as err:
        train(config, workdir.format(**paths))
    assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)
    assert not (paths["root"] / "w").exists()  # a refused run leaves no workdir behind


# --- train and plan: the flag-level errors, as real processes ---------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "{root}/nope.py:tiny", "--workdir", "{root}/w"], "no such config file"),
        (["--config", f"{CONFIG}:huge", "--workdir", "{root}/w"], "unknown variant 'huge'"),
        (["--workdir", "{root}/w"], "--config is required"),
        (["--config", f"{CONFIG}:tiny", "--workdir", "{root}/w", "--bogus"], "Unknown command line flag 'bogus'"),
        (["--config", f"{CONFIG}:tiny", "--workdir", "{root}/w", "--config.data.crop_seconds=-1"],
         "unknown config field 'data.crop_seconds'"),
        (["--config", f"{CONFIG}:tiny", "--workdir", "{root}/w", "--config.train.global_batch=-4"],
         "train.global_batch=-4: must be in [1, inf)"),
        (["--config", f"{CONFIG}:tiny", "--workdir", "{file}"], "is a file"),
    ],
)  # fmt: skip
def test_train_cli(args, needle, paths):
    proc = subprocess.run(
        [sys.executable, "-m", "atst_jax.train", *[a.format(**paths) for a in args]],
        capture_output=True, text=True, env=cli_env(1), cwd=ROOT, timeout=120,
    )  # fmt: skip
    _one_line(proc.returncode, proc.stderr, needle)
    assert not (paths["root"] / "w").exists()


def test_train_cli_refuses_another_runs_workdir_in_one_line(paths, embedded_cache):
    proc = run_train(
        ["--workdir", str(paths["run"]), f"--config.data.cache_dir={embedded_cache}", "--config.data.num_clips=64",
         "--config.model.depth=1", "--config.atst_frame.crop_seconds=1.0", "--config.train.global_batch=8",
         "--config.optim.warmup_steps=1", "--config.model.width=256"],
        devices=1,
    )  # fmt: skip
    _one_line(proc.returncode, proc.stderr, "differs in model.width: 128 -> 256")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "{root}/nope.py:tiny", "--mesh", "data=1"], "no such file"),
        (["--config", f"{CONFIG}:huge", "--mesh", "data=1"], "unknown variant 'huge'"),
        (["--config", f"{CONFIG}:tiny", "--mesh", "data=1", "--json", "{root}/nope/plan.json"],
         "--json {root}/nope/plan.json: its folder {root}/nope does not exist"),
    ],
)  # fmt: skip
def test_plan_cli(args, needle, paths):
    proc = subprocess.run(
        [sys.executable, "-m", "atst_jax.plan", *[a.format(**paths) for a in args]],
        capture_output=True, text=True, env=cli_env(1), cwd=ROOT, timeout=120,
    )  # fmt: skip
    _one_line(proc.returncode, proc.stderr, needle.format(**paths))
