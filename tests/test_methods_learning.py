"""The methods end to end from the command line on the embedded data: ATST-Clip and ASiT learn without
collapse, and ASiT's trained teacher exports. (Apart from tests/test_methods.py, the method-contract checks,
so the two long runs go to the other test worker.)"""

import json

import numpy as np
import pytest
from conftest import config_path, run_train

from atst_jax.checkpoint import read_checkpoint


# ----------------------------------------------------------------------------------------------------------
# ATST-Clip end to end
# ----------------------------------------------------------------------------------------------------------
def _train_cli(name, workdir, cache, *overrides):
    """``python -m atst_jax.train --config configs/<name>.py:tiny ...``: the command line end to end (exit 0, a
    final checkpoint); returns the captured stdout."""
    args = ["--workdir", str(workdir), f"--config.data.cache_dir={cache}", "--config.data.num_clips=64"]
    proc = run_train([*args, *overrides], timeout=900, optimized=True, config=config_path(name))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_atst_clip_cli_learns_on_embedded_data_without_collapse(tmp_path, embedded_cache):
    """The demo's own settings (batch 16, 4 s / 3 s crops), 100 steps from the command line: a checkpoint, the
    loss down, no collapse. (One run for both the CLI and the learning check: the suite's time budget. At 100
    steps the loss falls by 0.8 on two seeds, against the 0.1 asked here; 200 steps took twice the time.)"""
    stdout = _train_cli(
        "atst_clip", tmp_path, embedded_cache, "--config.train.steps=100", "--config.train.ckpt_every=100"
    )
    assert "std_cls_stu" in stdout and "atst_clip tiny" in stdout
    assert "within_tea" in stdout and "dim_tea" in stdout  # encoder health, every method
    step, config, state = read_checkpoint(tmp_path)
    assert step == 100 and config["method"] == "atst_clip" and "cls_token" in state["teacher"]["encoder"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    early = np.mean([r["loss"] for r in rows[:2]])
    late = np.mean([r["loss"] for r in rows[-3:]])
    assert late < early - 0.1, (early, late)
    first, last = rows[0], rows[-1]
    # Healthy ≈ 1/√128 ≈ 0.088 for the 128-d tiny head; collapse → 0.
    for k in ("std_cls_stu", "std_cls_tea"):
        assert last[k] > 0.5 * first[k] and last[k] > 0.02, (k, first[k], last[k])


# ----------------------------------------------------------------------------------------------------------
# ASiT end to end (on the embedded data's Kaldi fbank records, built on first use)
# ----------------------------------------------------------------------------------------------------------
def test_asit_cli_learns_on_embedded_fbank_and_exports(tmp_path, embedded_cache):
    """200 tiny steps from the command line (batch 8, 192-frame crops) lower the total loss after its warm-up
    bump (the DINO terms first rise while the teacher's sharp initial distribution spreads out) and L_rec from
    the start; the teacher's CLS distribution stays far from one-hot and from uniform; the trained teacher
    exports in the official ViT layout and runs the same in our PyTorch ViT. (One run for the CLI, learning
    and export checks: the suite's time budget.)"""
    stdout = _train_cli(
        "asit", tmp_path, embedded_cache, "--config.train.steps=200", "--config.train.ckpt_every=200",
        "--config.asit.crop_frames=192", "--config.train.global_batch=8",
    )  # fmt: skip
    assert "tea_entropy" in stdout and "asit tiny" in stdout
    assert "within_tea" in stdout and "dim_tea" in stdout
    step, config, state = read_checkpoint(tmp_path)
    assert step == 200 and config["method"] == "asit" and state["method"]["centre_cls"].shape == (512,)
    assert np.abs(state["method"]["centre_data"]).sum() > 0  # the centres moved
    assert "qkv" in state["teacher"]["encoder"]["blocks"]["attn"] and "rec_head" not in state["teacher"]

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    window = lambda rs, k: float(np.mean([r[k] for r in rs]))
    early, late = rows[1:6], rows[-5:]  # steps 10–50 and 160–200
    assert window(late, "loss") < window(early, "loss") - 0.3, (window(early, "loss"), window(late, "loss"))
    assert window(late, "loss_rec") < 0.6 * rows[0]["loss_rec"], (
        rows[0]["loss_rec"],
        window(late, "loss_rec"),
    )
    ln_k = np.log(config["asit"]["cls_prototypes"])
    for r in rows[1:]:
        assert 0.5 < r["tea_entropy"] < 0.97 * ln_k, r  # neither one-hot (0) nor uniform (ln K)
        assert r["tea_mean_entropy"] > 1.0, r  # not every clip on the same prototype

    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from atst_jax.export import __main__ as export_cli
    from atst_jax.export.torch_vit import VisionTransformer
    from atst_jax.inference import encoder_from_params, run_encoder_config

    out = tmp_path / "asit.safetensors"
    assert export_cli.main(["--workdir", str(tmp_path), "--format", "safetensors", "--out", str(out)]) == 0
    vit = VisionTransformer.from_state_dict(load_file(str(out)), strict=True).eval()
    enc = state["teacher"]["encoder"]
    jax_enc = encoder_from_params(enc, run_encoder_config(config, enc))
    x = np.random.default_rng(0).normal(size=(2, 128, 192)).astype(np.float32)  # [B, mel, time]
    want = np.asarray(jax_enc(x, np.full((2,), 192, np.int32)))
    with torch.no_grad():
        got = vit(torch.from_numpy(x.transpose(0, 2, 1).copy())[:, None]).numpy()  # official [B, 1, T, F]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
