"""The crops a run trains on are recorded in each checkpoint's metadata (``inputs``): inference takes an
encoder's chunk length and feature set from there, without rebuilding the run's method; a checkpoint written
before the entry existed still works, through the method rebuilt from its saved config. Reuses the suite's
shared 3-step run (``tiny_run``)."""

import json
import shutil

import pytest
from conftest import config_path, tiny_config

from atst_jax import inference, methods
from atst_jax.checkpoint import recorded_inputs, trained_inputs
from atst_jax.eval import embed, probe
from atst_jax.export import __main__ as export_cli
from atst_jax.models.encoder import EncoderConfig
from atst_jax.train import load_config


def _meta_path(workdir):
    return workdir / "checkpoints" / "3" / "meta" / "metadata"


def _refuse(name):
    raise AssertionError(f"inference built the method {name!r}: the checkpoint records its crops")


def test_a_checkpoint_records_the_crops_its_method_trains_on(tiny_run, embedded_cache):
    method = methods.build(tiny_config(embedded_cache))
    meta = json.loads(_meta_path(tiny_run).read_text())
    crops = [{"name": c.name, "frames": c.frames, "features": c.features} for c in method.inputs()]
    assert meta["inputs"] == crops == trained_inputs(method)
    assert recorded_inputs(tiny_run, 3) == crops


@pytest.mark.parametrize("name", ["atst_frame", "atst_clip", "asit", "aasp", "compose", "atst_frame_aape"])
def test_the_recorded_crops_give_what_the_rebuilt_method_gave(name):
    """No behaviour change: for every method, the entry gives the chunk length and features the method rebuilt
    from the saved config gives."""
    plain = load_config(config_path(name) + ":tiny").to_dict()
    recorded = trained_inputs(methods.get_class(plain["method"])(load_config(config_path(name) + ":tiny")))
    assert inference._run_crop(plain, recorded) == inference._run_crop(plain) is not None
    cfg = EncoderConfig.from_config(plain["model"])
    assert inference.encoder_chunk_frames(cfg, None, recorded) == inference.encoder_chunk_frames(cfg, plain)
    assert inference.run_features(None, cfg, recorded) == inference.run_features(plain, cfg)


def test_inference_on_a_run_reads_the_recorded_crops_not_the_method(tiny_run, tmp_path, monkeypatch):
    enc, step, config = embed.read_run_encoder(tiny_run)
    # What the method rebuilt from the config says (the way before the entry): 1 s crops → 101 frames → 100.
    expected = (inference.encoder_chunk_frames(enc.cfg, config), inference.run_features(config, enc.cfg))
    assert expected == (100, "atst_logmel64")
    monkeypatch.setattr(methods, "get_class", _refuse)
    assert embed.run_inference_inputs(tiny_run, step, enc.cfg, config) == expected
    assert probe.load_encoder(workdir=tiny_run)[1:3] == expected
    out = tmp_path / "enc.safetensors"
    assert export_cli.main(["--workdir", str(tiny_run), "--format", "safetensors", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        assert f.metadata()["chunk_frames"] == str(expected[0])


def test_a_checkpoint_without_the_entry_falls_back_to_its_config(tiny_run, tmp_path, monkeypatch):
    old = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", old / "checkpoints")
    meta = json.loads(_meta_path(old).read_text())
    del meta["inputs"]  # as a checkpoint written before the entry existed
    _meta_path(old).write_text(json.dumps(meta))
    assert recorded_inputs(old, 3) is None
    built, get_class = [], methods.get_class
    monkeypatch.setattr(methods, "get_class", lambda name: built.append(name) or get_class(name))
    assert probe.load_encoder(workdir=old)[1:3] == (100, "atst_logmel64")
    assert built == ["atst_frame", "atst_frame"]  # the chunk length and the features: each from the method
