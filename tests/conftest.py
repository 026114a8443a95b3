"""Test set-up: 8 simulated CPU devices (set before JAX is imported anywhere) and shared fixtures."""

import os
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile far more than they run (tiny models, a few steps each), and most of an XLA:CPU compile is the
# LLVM back end at its default -O2. At -O0 the compiled-step tests take about a third less time (measured on
# three of them alone: 87 s -> 55 s); XLA's own HLO passes, fusion and FP semantics (no fast-math) are the
# same, and every comparison in the suite is between steps compiled with the same flags. CLI subprocesses
# get it through ``cli_env``. ATST_JAX_TEST_XLA_O0=0 keeps XLA's default.
TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0" if os.environ.get("ATST_JAX_TEST_XLA_O0", "1") != "0" else ""
)
if TEST_XLA_FLAGS and TEST_XLA_FLAGS not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + TEST_XLA_FLAGS
# A persistent compilation cache for the session (CLI subprocesses inherit it): the
# same train step is compiled by many tests (tiny configs, kill + resume, CLI runs), and XLA:CPU compiles are
# most of the suite's time. Only compiles over 1 s are stored. ATST_JAX_TEST_CACHE=0 turns it off.
if os.environ.get("ATST_JAX_TEST_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    # Made by the first process to import this file (xdist's controller, before it starts the workers), so the
    # workers and their CLI subprocesses share one cache; removed when that process exits.
    _cache_dir = tempfile.mkdtemp(prefix="atst_jax_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

# A test run started in the background of a non-interactive shell (`cmd &` in a script, as CI runners may do)
# inherits SIGINT ignored, and Python then leaves it ignored: Ctrl-C handling could not be tested, and every
# subprocess (the launchers, the CLIs) would inherit the ignored signal too — a bash script cannot even trap
# a signal ignored on entry. Tests run as in a terminal: Python's own Ctrl-C handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


def cli_env(devices: int = 1, optimized: bool = False) -> dict:
    """The environment of a CLI subprocess on ``devices`` simulated CPU devices. ``optimized``: XLA's default
    back-end optimisation instead of the suite's -O0, for the learning runs, whose hundreds of steps take
    longer than their compile (measured: the ASiT CLI run 96 s at -O2, 197 s at -O0)."""
    env = dict(os.environ)
    flags = "" if optimized else TEST_XLA_FLAGS
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_cmd(*args, variant="tiny", config=CONFIG):
    return [sys.executable, "-m", "atst_jax.train", "--config", f"{config}:{variant}", *args]


def run_train(args, devices=1, timeout=600, optimized=False, config=CONFIG, variant="tiny"):
    return subprocess.run(
        train_cmd(*args, variant=variant, config=config),
        capture_output=True,
        text=True,
        env=cli_env(devices, optimized),
        cwd=ROOT,
        timeout=timeout,
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


# Seconds each file takes in a full run (`pytest -n 2 --dist loadfile --durations=0`, 2 cores, 2026-12-07),
# rounded; a file not listed counts as 20 s. Only the order matters: ``--dist loadfile`` hands files to the two
# workers in collection order as each worker frees up, so the longest go first and the short ones fill in at
# the end (longest-processing-time-first; with xdist's own order, by test count, a long file with few tests
# started last and the other worker sat idle until it finished).
FILE_SECONDS = {
    "test_methods.py": 560, "test_checkpoint.py": 220, "test_multihost.py": 220, "test_compose.py": 210,
    "test_reliability.py": 170, "test_methods_learning.py": 150, "test_train.py": 110, "test_scale.py": 150,
    "test_aape.py": 120, "test_collapse.py": 140, "test_evaluate.py": 125, "test_model.py": 90, "test_aasp.py": 130,
    "test_cli_errors.py": 75, "test_pretrain_probe.py": 70, "test_finetune_resume.py": 65, "test_bench_gpu.py": 60,
    "test_plan.py": 60, "test_sweep.py": 60, "test_finetune.py": 45, "test_stems.py": 35, "test_atst_frame.py": 35,
    "test_mixup_bank.py": 35, "test_export.py": 30, "test_export_hf.py": 45, "test_prepare.py": 30, "test_front_door.py": 25,
    "test_lineage.py": 30, "test_export_xares.py": 35, "test_short_clips.py": 25, "test_plan_targets.py": 60,
    "test_trained_inputs.py": 5,
}  # fmt: skip


def pytest_configure(config):
    # xdist would reorder the files by their number of tests; keep the order of pytest_collection_modifyitems.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Longest files first (``FILE_SECONDS``), each file's tests in their own order."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 20))  # stable: a file keeps its order
