"""The accelerator suite (``python -m atst_jax.bench gpu``) in its CPU dry mode, so that it cannot rot while
no GPU is around, and the attention implementations it compares.

- the dry run (tiny config, one CPU device): the JSON's fields, the planner row beside the variant, and the
  official PyTorch step when a checkout of the official code can be made from a local mirror (skipped with
  the reason otherwise: the project never ships that code);
- the suite's own bookkeeping (numerics against the fp32 reference, memory calibration rows, goals) on
  made-up results, and its one-line errors;
- ``model.attention``: ``dot_product_attention`` and ``cudnn`` (which falls back to the former off a GPU)
  against the default einsum path, float32 tight and bf16 loose, forward and gradients.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, cli_env
from flax import nnx

from atst_jax.models.attention import Attention, key_bias
from atst_jax.models.encoder import EncoderConfig, FrameAST
from atst_jax.tools import bench_gpu

# A bare git mirror of Audio-WestlakeU/audiossl, from the environment only (no machine path in the project).
MIRROR = os.environ.get("ATST_OFFICIAL_MIRROR", "")
OFFICIAL_PATHS = ["audiossl/__init__.py", "audiossl/methods/atstframe", "audiossl/modules", "audiossl/utils"]


def _official_checkout(dest) -> tuple[str | None, str]:
    """A checkout of the official code's model files from a bare mirror (git archive), or why not."""
    if not shutil.which("git"):
        return None, "git is not installed"
    if not MIRROR or not os.path.isdir(MIRROR):
        return None, f"no mirror of Audio-WestlakeU/audiossl at {MIRROR!r} (set ATST_OFFICIAL_MIRROR)"
    p = subprocess.run(
        ["git", f"--git-dir={MIRROR}", "archive", "--format=tar", "HEAD", "--", *OFFICIAL_PATHS],
        capture_output=True,
        timeout=60,
    )
    if p.returncode or not p.stdout:
        return None, f"git archive of {MIRROR} failed: {p.stderr.decode(errors='replace')[:200]}"
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return str(dest), ""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the suite: main variant, planner row, and the official step where possible."""
    tmp = tmp_path_factory.mktemp("bench_gpu")
    checkout, why = _official_checkout(tmp / "audiossl")
    out = tmp / "suite.json"
    cmd = [sys.executable, "-m", "atst_jax.bench", "gpu", "--dry-run", "--chip", "h200", "--out", str(out)]
    cmd += ["--warmup", "0", "--steps", "1", "--windows", "1", "--official-modes", "fp32"]
    cmd += ["--variants", "main,official" if checkout else "main"]
    cmd += ["--official", checkout] if checkout else []
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(1), cwd=tmp, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(out.read_text()), p.stdout, checkout, why


def test_dry_run_writes_the_suite_json(dry_run):
    report, stdout, _, _ = dry_run
    assert report["status"] == "ok" and report["dry_run"] is True
    env = report["environment"]
    assert env["packages"]["jax"] == jax.__version__ and env["device"]["backend"] == "cpu"
    assert env["flag_profiles"][env["default_profile"]].startswith("--xla_gpu_enable_latency_hiding")
    (main,) = [v for v in report["variants"] if v["role"] == "main"]
    assert main["status"] == "ok" and main["batch"] == 4 and main["model_dtype"] == "bfloat16"
    # The variant ran with the GPU flag profile: this jaxlib parses those flags (an unknown one is fatal).
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in main["xla_flags"]
    assert main["compile_s"] > 0 and main["step_s_median"] > 0 and main["finite"]
    assert main["clips_per_s"] == pytest.approx(4 / main["step_s_median"])
    assert main["tflops_per_device"] == pytest.approx(main["step_flops"] / main["step_s_median"] / 1e12)
    assert main["mfu"] == pytest.approx(main["tflops_per_device"] / 989.0)  # --chip h200
    assert len(main["losses"]) == 1 and 0 < main["losses"][0] < 4  # BYOL loss 2 - 2·cos
    # Planner beside the measurement: on the CPU the variant's own XLA estimate is the planner's.
    (row,) = [c for c in report["memory_calibration"] if c["variant"] == main["name"]]
    assert row["planner_status"] == "ok" and row["planner_peak_bytes"] == row["xla_estimate_bytes"] > 0
    assert row["measured_peak_bytes"] is None  # no allocator statistics on the CPU
    assert report["goals"]["assessed"] is False and report["goals"]["mfu_met"] is None
    assert "main-b4" in stdout and "wrote" in stdout


def test_dry_run_times_the_official_step(dry_run):
    report, _, checkout, why = dry_run
    if checkout is None:
        pytest.skip(f"official PyTorch step not exercised: {why}")
    off = report["official"]
    assert off["status"] == "ok" and off["arch"] == "small" and off["device"] == "cpu"
    assert set(off["stubbed_modules"]) >= {"pytorch_lightning", "fairseq.data.data_utils"}
    fp32 = off["modes"]["fp32"]
    # Our crop (1 s = 101 frames, 25 tokens) and mask ratio 0.65 → 16 masked tokens per clip.
    assert (
        fp32["status"] == "ok"
        and fp32["batch"] == 4
        and fp32["frames"] == 101
        and fp32["masked_tokens"] == 16
    )
    assert fp32["clips_per_s"] > 0 and 0 < fp32["losses"][0] < 4
    cmp = report["comparison"]["official_fp32"]
    assert cmp["ours_main_over_official"] == pytest.approx(
        report["comparison"]["ours_main"]["clips_per_s"] / fp32["clips_per_s"]
    )
    # Our tiny config against the official small is no comparison of the goals.
    assert report["comparison"]["comparable"] is False and report["goals"]["speedup_met_fp32"] is None


def test_summary_numerics_calibration_and_goals():
    args = bench_gpu.parse_args(["--no-plan", "--official-modes", "fp32"])
    suite = bench_gpu.Suite(args)

    def variant(name, role, batch, losses, clips, sets=("model.dtype=bfloat16",), **kw):
        return dict(
            name=name, role=role, batch=batch, sets=list(sets), status="ok", losses=losses, finite=True,
            clips_per_s=clips, step_s_median=batch / clips, step_flops=batch * 1e12,
            tflops_per_device=1.0, mfu=kw.pop("mfu", 0.5), peak_bytes=kw.pop("peak", 10),
            xla_peak_estimate=12, **kw,
        )  # fmt: skip

    suite.results = [
        variant("main-b128", "main", 128, [2.0, 1.9], 1000.0, mfu=0.6, peak=2**30),
        variant("ref-fp32-b128", "ref", 128, [2.0, 1.8, 1.7], 300.0, sets=()),
        variant("dpa-b128", "ablation", 128, [2.0, 1.81], 2000.0, sets=("model.dtype=bfloat16", "model.attention=dot_product_attention")),
        {"name": "main-b256", "role": "batch", "batch": 256, "sets": ["model.dtype=bfloat16"], "status": "oom"},
    ]  # fmt: skip
    suite.planner = {
        bench_gpu._memory_key(suite.results[0]): {"status": "ok", "peak_bytes": 2**29},
        bench_gpu._memory_key(suite.results[3]): {"status": "ok", "peak_bytes": 2**38},
    }
    # The dpa row shares the planner row of main (the CPU planner compiles attention through XLA).
    assert bench_gpu._memory_key(suite.results[2]) == bench_gpu._memory_key(suite.results[0])
    suite.official = {"status": "ok", "modes": {"fp32": {"status": "ok", "batch": 128, "clips_per_s": 100.0, "step_s_median": 1.28}}}  # fmt: skip
    r = bench_gpu.summarise(suite, "ok")
    main, ref, dpa, oom = r["variants"]
    assert (
        main["numerics"]["max_rel_loss_diff"] == pytest.approx(0.1 / 1.8)
        and not main["numerics"]["within_tolerance"]
    )
    assert "numerics" not in ref and dpa["numerics"]["steps"] == 2 and dpa["numerics"]["within_tolerance"]
    cal = {c["variant"]: c for c in r["memory_calibration"]}
    assert cal["main-b128"]["measured_over_planner"] == pytest.approx(2.0)
    assert cal["main-b256"]["status"] == "oom" and cal["main-b256"]["planner_peak_bytes"] == 2**38
    # Out-of-tolerance variants never count as "best"; ref (fp32) never does either.
    assert r["comparison"]["ours_best"]["name"] == "dpa-b128"
    assert r["comparison"]["comparable"] is True  # base beside the official base
    assert r["comparison"]["official_fp32"]["ours_main_over_official"] == pytest.approx(10.0)
    assert r["comparison"]["official_fp32"]["tflops"] == pytest.approx(1e12 * 128 / 1.28 / 1e12)
    assert r["comparison"]["official_fp32"]["ours_best_over_official"] == pytest.approx(20.0)
    assert r["goals"]["assessed"] is True and r["goals"]["speedup_met_fp32"] is True
    assert r["goals"]["best_mfu"] == 0.5 and r["goals"]["mfu_met"] is False  # main (0.6) is out of tolerance


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--official", "/nonexistent/audiossl"], "not a checkout of github.com/Audio-WestlakeU/audiossl"),
        (["--variants", "main,bogus"], "unknown bogus"),
        (["--batches", "64,x"], "comma-separated integers"),
        (["--official-modes", "fp16"], "choose from fp32,bf16,tf32"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert bench_gpu.main(["--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def _attention(impl, dtype, x, bias, attn):
    """Output, and gradients of a fixed projection of it w.r.t. the qkv kernel and the input (jitted)."""
    graphdef, params = nnx.split(attn)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x.astype(dtype), bias, impl).astype(jnp.float32)
        return (y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)).sum(), y

    (_, y), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return np.asarray(y), np.asarray(gp["qkv"]["kernel"][...]), np.asarray(gx)


def test_attention_implementations_match_the_einsum_path():
    rng = np.random.default_rng(0)
    attn = Attention(32, 4, rngs=nnx.Rngs(0))
    x = rng.normal(size=(4, 12, 32)).astype(np.float32)
    x[3, :1] = x[2, :1]  # sequence 3 = sequence 2 (one real token) with other values on its padded keys
    x = jnp.asarray(x)
    valid = jnp.arange(12)[None, :] < jnp.asarray([12, 7, 1, 1])[:, None]  # prefix masks, as the encoder's
    bias = key_bias(valid)
    ref = _attention("xla", jnp.float32, x, bias, attn)
    for impl, dtype in (
        ("dot_product_attention", jnp.float32),
        ("cudnn", jnp.float32),
    ):  # cudnn: XLA off a GPU
        got = _attention(impl, dtype, x, bias, attn)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())
        # Padded keys get exactly zero weight: their values change nothing of the real token's output.
        np.testing.assert_array_equal(got[0][3, 0], got[0][2, 0])
    half = _attention("dot_product_attention", jnp.bfloat16, x, bias, attn)
    for g, r in zip(half, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=3e-2 * np.abs(r).max())


def test_encoder_attention_knob_reaches_every_block():
    """``EncoderConfig.attention`` is a compute choice read by the trunk only: the same parameters (the
    default stays ``xla``, so the golden hashes of tests/test_model.py hold) give the same tokens."""
    base = EncoderConfig(width=32, depth=2, heads=4, n_mels=8, num_pos=20, drop_path=0.0)
    assert base.attention == "xla"
    spec = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 48)).astype(np.float32))
    length = jnp.asarray([48, 21])
    enc = nnx.jit(lambda: FrameAST(base, rngs=nnx.Rngs(0)))()
    outs = []
    for impl in ("xla", "dot_product_attention"):
        enc.cfg = dataclasses.replace(base, attention=impl)
        outs.append(np.asarray(nnx.jit(lambda e: e(spec, length))(enc)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="model.attention must be one of"):
        EncoderConfig(attention="flash")


def test_without_an_accelerator_the_suite_ends_blocked(tmp_path):
    """No --dry-run on a machine without a GPU: the JSON says "blocked", exit 3, in seconds (the planner,
    started beside the first variant, is stopped at once)."""
    out = tmp_path / "suite.json"
    cmd = [sys.executable, "-m", "atst_jax.bench", "gpu", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(1), cwd=tmp_path, timeout=120)
    assert p.returncode == 3, p.stdout[-1000:] + p.stderr[-1000:]
    report = json.loads(out.read_text())
    assert report["status"] == "blocked: no accelerator available" and report["wall_s"] < 60
    assert [v["status"] for v in report["variants"]] == ["no_accelerator"]


def test_bench_gpu_is_reachable_from_bench_help():
    p = subprocess.run(
        [sys.executable, "-m", "atst_jax.bench", "--help"], capture_output=True, text=True, env=cli_env(1), cwd=ROOT, timeout=60
    )  # fmt: skip
    assert p.returncode == 0 and "gpu" in p.stdout
