"""Test set-up: 8 simulated CPU devices (set before JAX is imported anywhere) and shared fixtures."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for the session (one per xdist worker; CLI subprocesses inherit it): the
# same train step is compiled by many tests (tiny configs, kill + resume, CLI runs), and XLA:CPU compiles are
# most of the suite's time. Only compiles over 1 s are stored. ATST_JAX_TEST_CACHE=0 turns it off.
if os.environ.get("ATST_JAX_TEST_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"atst_jax_xla_cache_{_worker}_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "atst_frame.py")


def config_path(name: str) -> str:
    """``configs/<name>.py`` of a method, absolute."""
    return str(ROOT / "configs" / f"{name}.py")


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """A small embedded dataset (64 clips) shared by the tests that read data."""
    from atst_jax.data.pipeline import ensure_embedded_dataset

    cache = tmp_path_factory.mktemp("embedded")
    ensure_embedded_dataset(str(cache), num_clips=64, seed=0)
    return str(cache)


def cli_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_cmd(*args, variant="tiny"):
    return [sys.executable, "-m", "atst_jax.train", "--config", f"{CONFIG}:{variant}", *args]


def run_train(args, devices=1, timeout=600):
    return subprocess.run(
        train_cmd(*args), capture_output=True, text=True, env=cli_env(devices), cwd=ROOT, timeout=timeout
    )


def tiny_config(cache: str, **train):
    """ATST-Frame ``tiny`` cut to the bone for tests that need a real run: one block, 1 s crops, batch 8."""
    from atst_jax.train import load_config

    config = load_config(CONFIG + ":tiny")
    config.model.depth = 1
    config.atst_frame.crop_seconds = 1.0
    config.optim.warmup_steps = 1
    config.data.cache_dir, config.data.num_clips = cache, 64
    config.train.update({**dict(steps=3, global_batch=8, ckpt_every=3, log_every=1), **train})
    return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, embedded_cache):
    """A finished 3-step run of ``tiny_config`` (checkpoint 3, metrics, Grain position), shared read-only by
    the reliability and CLI-error tests: copy it before changing it."""
    from atst_jax.train import train

    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    train(tiny_config(embedded_cache), str(workdir))
    return workdir


def prepare_dcase(cache, rows, out, strong):
    """A DCASE TSV (strong or weak) for the embedded clips in ``rows`` (``[(filename, events)]``) → a prepared
    dataset in ``out`` (the probe and fine-tuning tests' labelled data)."""
    from atst_jax.data import prepare, synthetic

    tsv = out + ".tsv"
    with open(tsv, "w") as f:
        if strong:
            f.write("filename\tonset\toffset\tevent_label\n")
            for name, evs in rows:
                f.writelines(f"{name}\t{a}\t{b}\t{c}\n" for a, b, c in evs)
        else:
            f.write("filename\tevent_labels\n")
            f.writelines(f"{name}\t{','.join(sorted({c for _, _, c in evs}))}\n" for name, evs in rows)
    plan = prepare.plan_dcase(tsv, os.path.join(cache, "audio"), classes=list(synthetic.CLASSES))
    prepare.build(plan, out, workers=0, progress=False)
    return out
