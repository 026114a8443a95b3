"""``python -m atst_jax.bench parity``: one step of ours against the official PyTorch step.

The official code is the user's checkout, never part of the project: the parity runs need one, named by
``ATST_OFFICIAL_AUDIOSSL`` (github.com/Audio-WestlakeU/audiossl, ATST-Frame) or ``ATST_OFFICIAL_ASIT``
(github.com/Sara-Ahmed/ASiT), and skip without it. The one-line error for a path that is not a checkout
always runs. Sizes are the smallest the bench takes: tiny width, two blocks, batch 2, short crops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, config_path

from atst_jax import bench
from atst_jax.tools import bench_parity


def _checkout(var: str, what: str) -> str:
    path = os.environ.get(var, "")
    if not path:
        pytest.skip(f"{var} is not set: point it at a checkout of {what} to run the parity bench")
    return path


def _parity(tmp_path, official: str, config: str, *sets: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "parity.json"
    cmd = [sys.executable, "-m", "atst_jax.bench", "parity", "--official", official, "--config", config]
    # A peak LR of 4e-4 at batch 2: the step moves every parameter well past the parameter tolerance.
    cmd += ["--batch", "2", "--json", str(out), "--set", "optim.base_lr=0.05"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(1), cwd=ROOT, timeout=600)
    result = json.loads(out.read_text()) if out.exists() else {}
    return proc, result


def _assert_within(proc, result, groups):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout
    assert result["ok"] and all(c["ok"] for c in result["checks"])
    assert result["tolerances"] == {
        "loss_abs": 1e-5,
        "grad_rel": 1e-4,
        "param_rel": 1e-5,
        "schedule_rel": 1e-6,
        "zero_grad_frac": 1e-6,
    }
    assert abs(result["loss"]["ours"] - result["loss"]["theirs"]) < 1e-5
    assert groups <= set(result["groups"])
    for name, row in result["groups"].items():
        assert row["grad"][0] < 1e-4 and row["param"][0] < 1e-5, name
        # The step moved every parameter by more than the tolerance, so the comparison could see it.
        assert row["moved"][0] > 1e-5, name
    kinds = {c["what"].split(" ")[0] for c in result["checks"]}
    assert {"loss", "grad", "param", "teacher", "schedule"} <= kinds


def test_parity_atst_frame(tmp_path):
    official = _checkout("ATST_OFFICIAL_AUDIOSSL", "github.com/Audio-WestlakeU/audiossl")
    proc, result = _parity(
        tmp_path,
        official,
        config_path("atst_frame") + ":tiny",
        "model.depth=2",
        "atst_frame.crop_seconds=0.5",
    )
    groups = {"patch_embed", "mask_embed", "pos_embed", "blocks.attn", "blocks.mlp", "final_norm"}
    _assert_within(proc, result, groups | {"projector", "predictor"})
    assert {"std_frm_stu", "std_frm_tea"} <= set(result["scalars"])
    # Zero in exact arithmetic: the final norm's bias (a shift the projector's train-mode BatchNorm removes).
    assert result["zero_grads"] == ["encoder.norm_frame.bias"]
    assert any("running_var" in c["what"] for c in result["checks"])


def test_parity_asit(tmp_path):
    official = _checkout("ATST_OFFICIAL_ASIT", "github.com/Sara-Ahmed/ASiT")
    proc, result = _parity(
        tmp_path, official, config_path("asit") + ":tiny", "model.depth=2", "asit.crop_frames=32"
    )
    groups = {"cls_token", "pos_embed", "patch_embed", "blocks.attn", "blocks.mlp", "final_norm"}
    _assert_within(proc, result, groups | {"dino_head.mlp", "dino_head.prototypes", "rec_head.deconv"})
    assert {"loss_cls", "loss_data", "loss_rec"} <= set(result["scalars"])
    assert {"centre_cls", "centre_data"} <= {c["what"] for c in result["checks"]}


@pytest.mark.parametrize("method", ["atst_frame", "asit"])
def test_not_a_checkout_is_one_line(tmp_path, capsys, method):
    code = bench.main(["parity", "--official", str(tmp_path), "--config", config_path(method) + ":tiny"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "not a checkout of github.com/" in err, err
    missing = tmp_path / "missing"
    assert bench_parity.main(["--official", str(missing), "--config", config_path(method) + ":tiny"]) == 2
    assert "no such directory" in capsys.readouterr().err
