"""``--format hf``: a tiny ASiT run as transformers' own ViTModel (+ ASTFeatureExtractor) and a tiny ATST-Frame
run as a ``trust_remote_code`` model, each loaded by ``AutoModel`` in a fresh interpreter that never imports
this package, matching the JAX encoder's tokens within 1e-4."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402

# The sibling test modules' run builders (pytest puts this directory on sys.path: no package).
import test_export  # noqa: E402
import test_export_asit  # noqa: E402

from atst_jax import inference  # noqa: E402
from atst_jax.export import __main__ as export_cli  # noqa: E402
from atst_jax.models.encoder import EncoderConfig  # noqa: E402

# Loads DIR with AutoModel, runs the input saved in DIR/x.npy, writes DIR/y.npy; fails if this package was
# imported (the export must stand alone).
LOADER = """
import sys, numpy as np, torch
import transformers.utils
from transformers import AutoFeatureExtractor, AutoModel
# The test environment pins torchaudio for its pure-Python kaldi.py only (its native library does not match
# torch): make ASTFeatureExtractor take its NumPy path instead of importing it.
transformers.utils.is_speech_available = lambda: False
d, kind = sys.argv[1], sys.argv[2]
remote = kind == "frame"
m = AutoModel.from_pretrained(d, trust_remote_code=remote).eval()
x = torch.from_numpy(np.load(d + "/x.npy"))
with torch.no_grad():
    if remote:
        y = m(x, torch.from_numpy(np.load(d + "/len.npy"))).last_hidden_state
    else:
        fe = AutoFeatureExtractor.from_pretrained(d)
        assert type(fe).__name__ == "ASTFeatureExtractor", fe
        out = m(pixel_values=x)
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
        y = out.last_hidden_state
np.save(d + "/y.npy", y.numpy())
assert "atst_jax" not in sys.modules
"""


def _load_in_fresh_python(out, kind):
    subprocess.run([sys.executable, "-c", LOADER, str(out), kind], check=True, cwd=out)
    return np.load(out / "y.npy")


def _export(workdir, out):
    assert export_cli.main(["--workdir", str(workdir), "--format", "hf", "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def frame_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("frame_run")
    return workdir, test_export._write_run(test_export._tiny_config(), workdir, 0)


def test_asit_as_vit_model(tmp_path_factory):
    workdir, state, config = test_export_asit.run._get_wrapped_function()(tmp_path_factory)
    out = tmp_path_factory.mktemp("hf") / "asit"
    _export(workdir, out)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["model_type"] == "vit" and cfg_json["image_size"] == [test_export_asit.CHUNK, 128]
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (pre["sampling_rate"], pre["num_mel_bins"], pre["max_length"]) == (32000, 128, 592)
    assert abs(pre["mean"] + 4.2677393) < 1e-6 and abs(pre["std"] - 4.5689974) < 1e-6
    card = (out / "README.md").read_text()
    assert "Steps trained: 7" in card and "Data fingerprint: not recorded" in card
    assert "Config variant: tiny" in card and "Method: asit" in card

    cfg = EncoderConfig.from_config(config["model"])
    jm = inference.encoder_from_params(state["teacher"]["encoder"], cfg)
    x = np.random.default_rng(3).standard_normal((2, test_export_asit.CHUNK, 128)).astype(np.float32)
    np.save(out / "x.npy", x[:, None])  # [B, 1, frames, mel]: the feature extractor's output + a channel
    y = _load_in_fresh_python(out, "vit")
    with jax.default_matmul_precision("highest"):
        # JAX input is [B, mel, frames]; its tokens are time-major over (time, freq) patches, CLS first.
        ref = np.asarray(jm(x.transpose(0, 2, 1), np.full(2, test_export_asit.CHUNK)))
    assert y.shape == ref.shape == (2, 1 + 37 * 8, test_export_asit.WIDTH)
    assert np.abs(y - ref).max() < 1e-4
    assert np.abs(ref).max() > 0.5


def test_atst_frame_as_remote_code(frame_run, tmp_path_factory):
    workdir, state = frame_run
    out = tmp_path_factory.mktemp("hf") / "frame"
    _export(workdir, out)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["auto_map"]["AutoModel"] == "modeling_atst.ATSTModel"
    for name in ("modeling_atst.py", "configuration_atst.py"):
        assert "atst_jax" not in (out / name).read_text()

    enc = state["teacher"]["encoder"]
    cfg = EncoderConfig(
        width=test_export.WIDTH, depth=test_export.DEPTH, heads=test_export.HEADS, drop_path=0.0
    )
    jm = inference.encoder_from_params(enc, cfg)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 64, 400)).astype(np.float32)
    length = np.array([400, 250])
    np.save(out / "x.npy", x)
    np.save(out / "len.npy", length)
    y = _load_in_fresh_python(out, "frame")
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jm(x, length))
    assert y.shape == ref.shape == (2, 100, test_export.WIDTH)
    for b, valid in enumerate((100, 62)):
        assert np.abs(y[b, :valid] - ref[b, :valid]).max() < 1e-4
    assert np.abs(ref).max() > 0.5


def test_replaces_an_earlier_directory_and_refuses_a_file(frame_run, tmp_path, capsys):
    workdir, _ = frame_run
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    _export(workdir, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no partial or old directory left
    (tmp_path / "file").write_text("x")
    argv = ["--workdir", str(workdir), "--format", "hf", "--out", str(tmp_path / "file")]
    assert export_cli.main(argv) == 2
    assert "not a directory" in capsys.readouterr().err
