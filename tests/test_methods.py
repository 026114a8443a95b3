"""The method contract, checked over every registered method: device-count invariance, golden shardings,
analytic FLOPs against XLA, the state split over 256 devices, exact resume, ``bench step``; method state through
checkpoints and non-finite steps (a stand-in method). The CLI learning runs are tests/test_methods_learning.py.

Regenerate a golden file after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_methods.py`` and
review the diff.
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import config_path

from atst_jax import methods
from atst_jax import sharding as shd
from atst_jax.checkpoint import params_digest, read_checkpoint, to_pure
from atst_jax.methods.atst_frame import AtstFrame
from atst_jax.models.collapse import HEALTH_MONITORS
from atst_jax.train import Trainer, load_config, train

METHODS = methods.names()
GOLDEN = Path(__file__).parent / "golden"


def crop_fields(config, name, seconds=2.0, frames=192):
    """The method's crop-length fields (``*_seconds`` / ``*_frames``) cut to the short lengths tests use."""
    short = {}
    for field, value in config[name].items():
        if field.endswith("seconds"):
            short[field] = min(float(value), seconds)
        elif field.endswith("frames"):
            short[field] = min(int(value), frames)
    return short


def tiny(name, **train):
    """The method's tiny config with short crops: every crop ≤ 2 s, so compiles stay short."""
    config = load_config(config_path(name) + ":tiny")
    config[name].update(crop_fields(config, name))
    config.train.update(train)
    return config


def _resume_config(name):
    """The tiny config of the device-count and exact-resume tests (one train step for both)."""
    return tiny(name, global_batch=8, steps=6, ckpt_every=3, log_every=3)


def _run_steps(config, devices, batches):
    trainer = Trainer(config, shd.make_mesh({"data": len(devices)}, devices))
    state, step = trainer.init(config.seed), trainer.jit_train_step()
    out = []
    for host in batches:
        batch = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in host.items()}
        state, metrics = step(state, batch)
        out.append(jax.device_get(metrics))
    return out, state


def _batches(trainer_config, n=3, seed=0):
    trainer = Trainer(trainer_config, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    out = []
    for i in range(n):
        host = trainer.synthetic_batch(seed + i)
        for k in host:  # uneven valid lengths, so the padding masks are exercised
            if k.endswith("_length"):
                host[k] = host[k] - np.arange(len(host[k]), dtype=np.int32) * 7
        out.append(host)
    return out


@pytest.mark.parametrize("name", METHODS)
def test_three_steps_on_one_device_equal_eight_devices(name):
    assert jax.device_count() == 8
    config = _resume_config(name)  # its 8-device step is the resume test's: compiled once (the XLA cache)
    batches = _batches(config)
    one, s1 = _run_steps(config, jax.devices()[:1], batches)
    eight, s8 = _run_steps(config, jax.devices(), batches)
    monitors = (*methods.get_class(name).monitors, *HEALTH_MONITORS)  # every method reports encoder health
    for a, b in zip(one, eight, strict=True):
        for k in ("loss", "grad_norm", *monitors):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)
    assert len({round(float(m["loss"]), 6) for m in one}) == 3  # the runs really moved
    np.testing.assert_allclose(  # every stem has a patch kernel (fixed sin-cos positions are no parameter)
        np.asarray(s1["teacher"]["encoder"]["patch_embed"]["kernel"].get_value()),
        np.asarray(s8["teacher"]["encoder"]["patch_embed"]["kernel"].get_value()),
        rtol=1e-4,
        atol=1e-6,
    )


def _specs(tree):
    return {
        jax.tree_util.keystr(path): [list(e) if isinstance(e, tuple) else e for e in s.spec]
        for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("name", METHODS)
def test_base_parameter_shardings_match_golden(name):
    config = load_config(config_path(name) + ":base")
    trainer = Trainer(config, shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    shardings = to_pure(trainer.state_shardings)
    params = _specs(shardings["params"])
    golden = GOLDEN / f"sharding_{name}_base_d2_f2_t2.json"
    if os.environ.get("UPDATE_GOLDEN") or not golden.exists() and os.environ.get("CI") != "true":
        golden.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    assert params == json.loads(golden.read_text())
    # Teacher and optimizer moments shard exactly like the student's covered parts.
    covers = tuple(f"['{c}']" for c in trainer.method.ema_covers)
    assert _specs(shardings["teacher"]) == {k: v for k, v in params.items() if k.startswith(covers)}
    assert _specs(shardings["opt"]["mu"]) == params and _specs(shardings["opt"]["nu"]) == params


@pytest.mark.parametrize("name", METHODS)
def test_analytic_flops_agree_with_xla_cost_analysis(name):
    config = tiny(name, global_batch=4)
    config.model.scan_layers = False  # XLA's cost analysis counts a scanned body only once
    trainer = Trainer(config, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    # The lowered step's HLO, before XLA's optimisations: the operations the step asks for, no compile (dead
    # code that XLA would drop counts here, which only makes the check stricter).
    cost = trainer.jit_train_step().lower(*trainer.abstract_step_inputs()).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert trainer.step_flops > 0
    assert abs(cost["flops"] / trainer.step_flops - 1) < 0.10, (cost["flops"], trainer.step_flops)


@pytest.mark.parametrize("name", METHODS)
def test_base_state_shards_over_256_devices(name):
    """Every method's ``base`` state at fsdp=256, from the trainer's own shardings over an abstract mesh (no
    device, no compile): per device at most 10 % above a perfect split, so no large leaf stays whole. The
    planner's command line compiles such a step in tests/test_plan.py."""
    config = load_config(config_path(name) + ":base")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 256, 1
    config.train.global_batch = 256  # the batch (and ATST-Frame's mixup bank, method state) splits over 256
    mesh = jax.sharding.AbstractMesh((1, 256, 1), shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    trainer = Trainer(config, mesh)
    leaves, shardings = jax.tree.leaves(trainer.abstract_state), jax.tree.leaves(trainer.state_shardings)
    nbytes = lambda shape, dtype: int(np.prod(shape)) * np.dtype(dtype).itemsize
    total = sum(nbytes(x.shape, x.dtype) for x in leaves)
    per_device = sum(nbytes(s.shard_shape(x.shape), x.dtype) for x, s in zip(leaves, shardings, strict=True))
    whole = [s.spec for x, s in zip(leaves, shardings, strict=True) if nbytes(x.shape, x.dtype) > 2**20]
    assert per_device <= 1.1 * total / 256, (per_device, total / 256)
    assert all(any(e is not None for e in spec) for spec in whole), whole  # every leaf over 1 MiB is split
    assert trainer.step_flops > 0


@pytest.mark.parametrize("name", METHODS)
def test_bench_step_runs(name, capsys):
    """``bench step`` through its command line, on the resume tests' config (crops, batch, steps: the LR
    schedule is part of the step), so its step is theirs and comes from the XLA cache."""
    from atst_jax import bench

    config = _resume_config(name)
    args = ["step", "--config", config_path(name) + ":tiny", "--batch", "8", "--steps", "1", "--warmup", "0"]
    args += [f"--config.{name}.{f}={v}" for f, v in crop_fields(config, name).items()]
    args += [f"--config.train.steps={config.train.steps}"]
    assert bench.main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "s/step" in line and "clips/s" in line and "TFLOP/s" in line


# ----------------------------------------------------------------------------------------------------------
# Method state: a stand-in method whose state is a running counter and centre
# ----------------------------------------------------------------------------------------------------------
class _CentreMethod(AtstFrame):
    """ATST-Frame plus a DINO-like centre: ``calls`` counts loss evaluations and ``centre`` is an EMA of the
    batch's mean log-mel per mel bin. Both must resume exactly and stand still on a skipped step."""

    def init(self, rng):
        student, teacher, _ = super().init(rng)
        n_mels = self.enc_cfg.n_mels
        return (
            student,
            teacher,
            {"calls": jnp.zeros((), jnp.int32), "centre": jnp.zeros((n_mels,), jnp.float32)},
        )

    def loss(self, student, teacher, method_state, batch, key, step):
        loss, metrics, _ = super().loss(student, teacher, {}, batch, key, step)
        mean = jnp.mean(batch["spec"], axis=(0, 2))
        new = {"calls": method_state["calls"] + 1, "centre": 0.9 * method_state["centre"] + 0.1 * mean}
        return loss, dict(metrics, centre_norm=jnp.linalg.norm(new["centre"])), new


@pytest.fixture
def centre_method(monkeypatch):
    real = methods.get_class
    monkeypatch.setattr(methods, "get_class", lambda n: _CentreMethod if n == "atst_frame" else real(n))


def _centre_config(cache, steps, **train_fields):
    config = tiny("atst_frame", global_batch=8, steps=steps, ckpt_every=3, log_every=1, **train_fields)
    config.data.cache_dir, config.data.num_clips = cache, 64
    return config


def _crash_after(workdir, step):
    """What a crash after ``step``'s checkpoint leaves behind: the later checkpoints are gone."""
    import shutil

    for p in (Path(workdir) / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)


def test_method_state_resumes_exactly_and_survives_a_skipped_step(
    tmp_path, embedded_cache, centre_method, capsys
):
    work = tmp_path / "run"
    assert train(_centre_config(embedded_cache, 6), str(work))["step"] == 6
    _, _, ref = read_checkpoint(work)
    assert int(ref["method"]["calls"]) == 6 and np.abs(ref["method"]["centre"]).sum() > 0

    # Killed after step 3's checkpoint, then restarted: the state continues from the checkpoint.
    _crash_after(work, 3)
    _, _, mid = read_checkpoint(work)
    assert int(mid["method"]["calls"]) == 3
    capsys.readouterr()
    train(_centre_config(embedded_cache, 6), str(work))
    assert "resumed from" in capsys.readouterr().out  # not a fresh (equally deterministic) restart
    _, _, got = read_checkpoint(work)
    assert int(got["method"]["calls"]) == 6
    np.testing.assert_array_equal(got["method"]["centre"], ref["method"]["centre"])
    assert params_digest(got) == params_digest(ref)

    # A non-finite step 2, skipped: the state is the one of steps 1 and 3 only.
    skip = tmp_path / "skip"
    train(_centre_config(embedded_cache, 3, nonfinite="skip", inject_nan_at_step=2), str(skip))
    _, _, s = read_checkpoint(skip)
    assert int(s["method"]["calls"]) == 2
    assert np.isfinite(s["method"]["centre"]).all()
    rows = [json.loads(x) for x in (skip / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    # The skipped step's centre never landed: step 3 continues from step 1's centre.
    assert by_step[2]["finite"] == 0.0
    np.testing.assert_allclose(np.linalg.norm(s["method"]["centre"]), by_step[3]["centre_norm"], rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_stop_and_resume_gives_the_digest_of_an_uninterrupted_run(name, tmp_path, embedded_cache, capsys):
    """Exact resume for every method: a run killed after step 3's checkpoint and restarted ends with the
    digest it had uninterrupted (the SIGKILL variant through the CLI is tests/test_checkpoint.py)."""
    c = _resume_config(name)
    c.data.cache_dir, c.data.num_clips = embedded_cache, 64
    train(c, str(tmp_path))
    _, _, uninterrupted = read_checkpoint(tmp_path)
    _crash_after(tmp_path, 3)
    capsys.readouterr()
    assert train(c, str(tmp_path))["step"] == 6
    assert "resumed from" in capsys.readouterr().out  # not a fresh (equally deterministic) restart
    step, _, resumed = read_checkpoint(tmp_path)
    assert step == 6 and params_digest(resumed) == params_digest(uninterrupted)
    # The method state (ASiT's DINO centres) resumes exactly too; the digest covers only the parameters.
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
    assert [p for p, _ in flat(resumed["method"])] == [p for p, _ in flat(uninterrupted["method"])]
    for (path, got), (_, want) in zip(flat(resumed["method"]), flat(uninterrupted["method"]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_the_official_step_inputs_come_from_the_method_contract():
    """``bench_gpu`` times the official PyTorch step only for a method that names its inputs; the others get
    a one-line refusal, whatever the method is called."""
    from atst_jax.tools import bench_gpu

    for name in METHODS:
        config = tiny(name)
        method = methods.build(config)
        inputs = method.official_step_inputs()
        if name == "atst_frame":
            assert inputs == dict(frames=method.inputs()[0].frames, n_mels=64, mask_ratio=0.65)
        else:
            assert inputs is None, name
            r = bench_gpu.run_official(dict(config=config_path(name) + ":tiny", batch=8, sets=[]))
            assert r == {"status": "error", "error": f"{name} has no official PyTorch step to time"}
