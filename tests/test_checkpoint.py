"""Fault tolerance: exact resume after SIGKILL, SIGTERM save, resharding, damaged checkpoints, NaN guard."""

import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import CONFIG, ROOT, cli_env, run_train, train_cmd

from atst_jax import checkpoint as ckpt_lib
from atst_jax import sharding as shd
from atst_jax.checkpoint import Checkpointer, params_digest, read_checkpoint, to_pure
from atst_jax.errors import ConfigError
from atst_jax.train import Trainer, init_from_checkpoint, load_config

# Small and fast: 2 s crops, batch 4, a checkpoint every 3 steps.
FAST = [
    "--config.train.global_batch=4",
    "--config.atst_frame.crop_seconds=2.0",
    "--config.train.log_every=1",
    "--config.data.num_clips=64",
]


def _fast_args(workdir, cache, steps=12, every=3, extra=()):
    return [
        "--workdir",
        str(workdir),
        f"--config.data.cache_dir={cache}",
        f"--config.train.steps={steps}",
        f"--config.train.ckpt_every={every}",
        *FAST,
        *extra,
    ]


def _digest(workdir, step=None):
    got_step, _, state = read_checkpoint(workdir, step)
    return got_step, params_digest(state)


def _start(args):
    return subprocess.Popen(
        train_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT
    )


def _committed(workdir):
    d = Path(workdir) / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _wait_for_step(proc, step, timeout=300, workdir=None):
    """Reads the progress lines until one reports ``step`` (they come one step late, so the run is past it)
    and, with ``workdir``, until a checkpoint has committed there."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
            if workdir is None or _committed(workdir):
                return
        if time.time() > deadline:
            break
    raise AssertionError(f"the run never reported step {step}; stderr: {proc.stderr.read()[-2000:]}")


def test_sigkill_then_resume_gives_the_digest_of_an_uninterrupted_run(tmp_path, embedded_cache):
    full = run_train(_fast_args(tmp_path / "full", embedded_cache))
    assert full.returncode == 0, full.stderr[-2000:]
    expected = _digest(tmp_path / "full")
    assert expected[0] == 12

    work = tmp_path / "killed"
    kill_at = random.Random().randint(4, 10)
    proc = _start(_fast_args(work, embedded_cache))
    _wait_for_step(proc, kill_at, workdir=work)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_train(_fast_args(work, embedded_cache))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout, (kill_at, resumed.stdout[-1000:])
    assert _digest(work) == expected, f"killed after step {kill_at}"


def test_sigterm_saves_the_step_in_progress_and_exits_0(tmp_path, embedded_cache):
    work = tmp_path / "run"
    proc = _start(_fast_args(work, embedded_cache, steps=500, every=1000))
    _wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    line = [x for x in out.splitlines() if x.startswith("stop requested: saved step")]
    assert line, out[-2000:]
    saved = int(line[0].split("saved step ")[1].split()[0])
    assert saved >= 4 and saved < 500
    assert [s for s, _ in ckpt_lib.list_steps(work)] == [str(saved)]
    assert _digest(work)[0] == saved


def _trainer(mesh_cfg, devices):
    config = load_config(CONFIG + ":tiny")
    config.train.global_batch = 8
    config.atst_frame.crop_seconds = 2.0
    return Trainer(config, shd.make_mesh(mesh_cfg, devices))


def _one_step(trainer):
    state = trainer.init(0)
    frames = 201
    rng = np.random.default_rng(0)
    host = {
        "spec": rng.uniform(-1, 1, (8, 64, frames)).astype(np.float32),
        "spec_length": np.full((8,), frames, np.int32),
    }
    batch = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in host.items()}
    state, _ = trainer.jit_train_step()(state, batch)
    return state


def _flat(state):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(to_pure(state))[0]
    }


def test_checkpoint_moves_between_meshes(tmp_path):
    src = _trainer({"data": 2, "fsdp": 4}, jax.devices())
    state = _one_step(src)
    # The source really is sharded over fsdp.
    qkv = state["params"]["encoder"]["blocks"]["attn"]["qkv"]["kernel"].get_value()
    assert "fsdp" in str(qkv.sharding.spec)
    ck = Checkpointer(tmp_path, save_every=1, keep=2)
    ck.save(1, state, force=True)
    ck.close()
    expected = _flat(state)
    for mesh_cfg, devices in [({"data": 8, "fsdp": 1}, jax.devices()), ({"data": 4}, jax.devices()[:4])]:
        dst = _trainer(mesh_cfg, devices)
        ck = Checkpointer(tmp_path, save_every=1, keep=2)
        step, restored = ck.restore_latest(dst.abstract_state, dst.state_shardings)
        ck.close()
        assert step == 1
        got = _flat(restored)
        assert got.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
        leaf = restored["params"]["encoder"]["pos_embed"].get_value()
        assert leaf.sharding.mesh.devices.size == len(devices)


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    trainer = _trainer({"data": 8}, jax.devices())
    state = trainer.init(0)
    ck = Checkpointer(tmp_path, save_every=1, keep=3)
    ck.save(1, state, force=True)
    ck.save(2, state, force=True)
    ck.close()
    files = sorted(
        (p for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    victim = files[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    ck = Checkpointer(tmp_path, save_every=1, keep=3)
    step, restored = ck.restore_latest(trainer.abstract_state, trainer.state_shardings)
    ck.close()
    assert step == 1 and restored is not None
    assert "checkpoint step 2 is unreadable" in capsys.readouterr().err
    # The unreadable step is moved aside (kept, not deleted), so a later save of step 2 is not skipped.
    statuses = dict(ckpt_lib.list_steps(tmp_path))
    assert statuses["1"] == "good" and "2" not in statuses
    assert [k for k in statuses if k.startswith("set_aside/2-unreadable-")], statuses


def test_nan_halts_naming_the_step_and_no_nan_checkpoint(tmp_path, embedded_cache):
    work = tmp_path / "nan"
    proc = run_train(
        _fast_args(work, embedded_cache, steps=12, every=2, extra=["--config.train.inject_nan_at_step=5"])
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert errors and "non-finite loss or gradient at step 5" in errors[0], proc.stderr[-2000:]
    statuses = dict(ckpt_lib.list_steps(work))
    assert statuses == {"2": "good", "4": "good"}, statuses


def test_nan_skip_mode_keeps_training_with_finite_state(tmp_path, embedded_cache):
    work = tmp_path / "skip"
    extra = ["--config.train.inject_nan_at_step=3", "--config.train.nonfinite=skip"]
    proc = run_train(_fast_args(work, embedded_cache, steps=6, every=6, extra=extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "non-finite loss or gradient at step 3: update skipped (1/10)" in proc.stderr
    assert dict(ckpt_lib.list_steps(work)) == {"6": "good"}


def test_load_paths_use_no_pickle(tmp_path, monkeypatch):
    trainer = _trainer({"data": 8}, jax.devices())
    ck = Checkpointer(tmp_path, save_every=1, keep=1)
    ck.save(1, trainer.init(0), force=True)
    ck.close()

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used on a load path")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    ck = Checkpointer(tmp_path, save_every=1, keep=1)
    step, state = ck.restore_latest(trainer.abstract_state, trainer.state_shardings)
    ck.close()
    assert step == 1 and state is not None
    assert read_checkpoint(tmp_path)[0] == 1


def test_init_from_takes_parameters_but_not_optimizer(tmp_path):
    trainer = _trainer({"data": 8}, jax.devices())
    trained = _one_step(trainer)
    ck = Checkpointer(tmp_path / "src", save_every=1, keep=1)
    ck.save(1, trained, force=True)
    ck.close()
    fresh = trainer.init(seed=123)
    loaded = init_from_checkpoint(fresh, trainer, str(tmp_path / "src"))
    a, b = _flat(loaded), _flat(trained)
    for k in a:
        if k.startswith(("['params']", "['teacher']", "['stats']", "['teacher_stats']")):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert int(loaded["step"]) == 0 and int(loaded["opt"].count) == 0
    assert np.all(a["['opt']['mu']['encoder']['pos_embed']"] == 0)


def test_digest_and_list_cli(tmp_path):
    trainer = _trainer({"data": 8}, jax.devices())
    ck = Checkpointer(tmp_path, save_every=1, keep=2)
    state = trainer.init(0)
    ck.save(3, state, force=True)
    ck.close()
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-123").mkdir()

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "atst_jax.checkpoint", *args],
            capture_output=True,
            text=True,
            env=cli_env(),
            cwd=ROOT,
        )

    out = cli("list", "--workdir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3\tgood", "7.orbax-checkpoint-tmp-123\tincomplete"]
    dig = cli("digest", "--workdir", str(tmp_path))
    assert dig.returncode == 0, dig.stderr
    assert dig.stdout.strip() == f"step 3 sha256 {params_digest(to_pure(state))}"
    bad = cli("digest", "--workdir", str(tmp_path / "nope"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_init_from_an_exported_encoder_file(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from atst_jax.export.convert import encoder_to_torch

    trainer = _trainer({"data": 8}, jax.devices())
    trained = to_pure(_one_step(trainer))
    teacher_encoder = jax.tree.map(np.asarray, trained["teacher"]["encoder"])
    path = tmp_path / "encoder.safetensors"
    safetensors_numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in encoder_to_torch(teacher_encoder).items()}, str(path)
    )
    fresh = trainer.init(seed=7)
    loaded = _flat(init_from_checkpoint(fresh, trainer, str(path)))
    before = _flat(fresh)
    for k, v in _flat({"e": trained["teacher"]["encoder"]}).items():
        sub = k[len("['e']") :]
        np.testing.assert_array_equal(loaded["['params']['encoder']" + sub], v)
        np.testing.assert_array_equal(loaded["['teacher']['encoder']" + sub], v)
    proj = "['params']['projector']['fc1']['kernel']"
    np.testing.assert_array_equal(loaded[proj], before[proj])  # heads keep their fresh init
    # A damaged copy of the file, or one whose encoder has an AaPE branch this model lacks: one line each,
    # before any parameter is replaced (an AaPE branch on one side only would stay random or be dropped).
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="damaged or truncated safetensors file"):
        init_from_checkpoint(fresh, trainer, str(cut))
    import dataclasses

    from flax import nnx

    from atst_jax.export.convert import aape_to_torch
    from atst_jax.models.encoder import FrameAST

    cfg = dataclasses.replace(trainer.enc_cfg, aape={"subband_bins": 8})
    branch = nnx.to_pure_dict(nnx.state(FrameAST(cfg, rngs=nnx.Rngs(0)).aape, nnx.Param))
    aape = {**encoder_to_torch(teacher_encoder), **aape_to_torch(jax.tree.map(np.asarray, branch))}
    with_aape = tmp_path / "aape.safetensors"
    safetensors_numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in aape.items()}, str(with_aape), metadata={"aape": "{}"}
    )
    with pytest.raises(ConfigError, match="the file's encoder has an AaPE branch, this model has none"):
        init_from_checkpoint(fresh, trainer, str(with_aape))
