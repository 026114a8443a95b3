"""What a run shows besides its loss: the frozen-encoder probe during and after pretraining
(``atst_jax.eval.pretrain_probe``), and TensorBoard images of the views and masks each method drew
(``Method.pictures``, ``train.image_every``). Both only read the state: a run with them is bit-identical to
one without (the shared 3-step ``tiny_run``)."""

from __future__ import annotations

import io
import json
import os
import struct

import jax
import numpy as np
import pytest
from conftest import prepare_dcase, tiny_config


def _events(path):
    """The records of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    data = open(path, "rb").read()
    pos, out = 0, []
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        ev = event_pb2.Event()
        ev.ParseFromString(data[pos + 12 : pos + 12 + n])
        out.append(ev)
        pos += 12 + n + 4
    return out


def _tb(workdir):
    d = workdir / "tensorboard"
    scalars, images, texts = {}, {}, {}
    for name in sorted(os.listdir(d)):
        for ev in _events(d / name):
            for v in ev.summary.value:
                if v.HasField("image"):
                    images[(v.tag, ev.step)] = v.image
                elif v.HasField("tensor") and v.tensor.string_val:
                    texts[(v.tag, ev.step)] = v.tensor.string_val[0].decode()
                elif v.HasField("simple_value") or v.tag.startswith("probe/"):
                    scalars.setdefault(v.tag, {})[ev.step] = v.simple_value
    return scalars, images, texts


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory, embedded_cache):
    from atst_jax.data import synthetic

    rows = sorted(synthetic.read_strong_tsv(os.path.join(embedded_cache, "strong_labels.tsv")).items())
    root = tmp_path_factory.mktemp("probe_data")
    return (
        prepare_dcase(embedded_cache, rows[:24], str(root / "train"), strong=True),
        prepare_dcase(embedded_cache, rows[24:40], str(root / "test"), strong=True),
    )


def test_probe_and_view_images_during_training_leave_the_run_unchanged(
    tmp_path, embedded_cache, probe_data, tiny_run
):
    from PIL import Image

    from atst_jax.checkpoint import params_digest, read_checkpoint
    from atst_jax.train import train

    config = tiny_config(embedded_cache, image_every=1)
    config.probe.update(
        train=probe_data[0], test=probe_data[1], every=2, final=True, epochs=2, quick_epochs=1, lrs=[1e-2]
    )
    workdir = tmp_path / "run"
    train(config, str(workdir))
    # Bit-identical to the same run without probe and pictures.
    assert params_digest(read_checkpoint(workdir, 3)[2]) == params_digest(read_checkpoint(tiny_run, 3)[2])
    assert (workdir / "metrics.jsonl").read_text() != "" and all(
        "loss" in json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
    )

    # The quick probe at step 2 (no baselines) and the full one after the last step (with both).
    lines = [json.loads(line) for line in (workdir / "probe.jsonl").read_text().splitlines()]
    assert [(p["step"], p["final"]) for p in lines] == [(2, False), (3, True)]
    assert all(0.0 <= p["probe/frame_mAP"] <= 1.0 for p in lines)
    res = json.loads((workdir / "probe" / "RESULTS.json").read_text())
    assert res["task"] == "sed" and list(res["encoders"]) == ["checkpoint", "random_init", "logmel"]
    assert res["source"]["step"] == 3
    assert res["encoders"]["checkpoint"]["metrics"]["frame_mAP"] == pytest.approx(lines[1]["probe/frame_mAP"])
    assert all(os.path.getsize(p) > 10_000 for p in res["plots"])

    scalars, images, texts = _tb(workdir)
    assert set(scalars["probe/frame_mAP"]) == {2, 3}
    # One picture per step: the two views of the first clip with the span mask tinted red.
    assert sorted(step for tag, step in images if tag == "views") == [1, 2, 3]
    assert texts[("views/panels/text_summary", 1)].startswith("view 1")
    img = np.asarray(Image.open(io.BytesIO(images[("views", 1)].encoded_image_string)).convert("RGB"))
    assert img.shape[2] == 3 and img.shape[0] >= 2 * 64 and img.shape[1] == 600
    red = (img[..., 0].astype(int) - img[..., 1]) > 60  # tinted (masked) pixels
    # ATST-Frame masks ≈ half of the tokens, whole columns across all mel bins, the same in both views.
    columns = red[: img.shape[0] // 2].mean(axis=0)
    assert 0.15 < (columns > 0.9).mean() < 0.85
    top, bottom = red[: img.shape[0] // 2 - 2], red[img.shape[0] // 2 + 2 :]
    np.testing.assert_array_equal(top.any(axis=0), bottom.any(axis=0))


def test_a_missing_final_probe_is_produced_by_a_rerun_and_ctrl_c_tells_the_truth(
    tmp_path, embedded_cache, probe_data, tiny_run, monkeypatch, capsys
):
    """The final probe is part of the run. The finished 3-step run without it (as a second Ctrl-C, SIGTERM
    or a crash during it leaves a run) gets it from a rerun of the same command; before, the rerun said
    "nothing to do". Ctrl-C during it: the first says the probe is being finished (the trainer's handler
    announced an exit while the probe ran on), the second stops it and says the rerun produces it, and that
    rerun does; the next one has nothing to do."""
    import shutil
    import signal
    import time

    from atst_jax.eval import pretrain_probe, probe
    from atst_jax.train import train

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    config = tiny_config(embedded_cache)
    config.probe.update(train=probe_data[0], test=probe_data[1], epochs=1, lrs=[1e-2], baselines=[])
    evaluate = probe.evaluate

    def interrupted_twice(*args, **kwargs):
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs in the main thread at the next bytecode boundary
                time.sleep(0.001)
        raise AssertionError("the second Ctrl-C did not stop the probe")

    monkeypatch.setattr(probe, "evaluate", interrupted_twice)
    with pytest.raises(pretrain_probe.FinalProbeInterrupted, match="rerun the same command to produce it"):
        train(config, str(workdir))
    err = capsys.readouterr().err
    assert (
        "interrupted: step 3 is saved; finishing the final probe (Ctrl-C again" in err
        and "exiting" not in err
    )
    assert not (workdir / "probe" / "RESULTS.json").exists()

    monkeypatch.setattr(probe, "evaluate", evaluate)
    assert train(config, str(workdir))["step"] == 3
    assert "its final probe is missing: running it" in capsys.readouterr().out
    res = json.loads((workdir / "probe" / "RESULTS.json").read_text())
    assert res["complete"] is True and res["source"]["step"] == 3 and list(res["encoders"]) == ["checkpoint"]
    lines = [json.loads(line) for line in (workdir / "probe.jsonl").read_text().splitlines()]
    assert [(p["step"], p["final"]) for p in lines] == [(3, True)]
    assert lines[0]["probe/frame_mAP"] == pytest.approx(res["encoders"]["checkpoint"]["metrics"]["frame_mAP"])
    train(config, str(workdir))
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["asit", "atst_clip"])
def test_method_pictures_show_what_the_student_sees(name):
    """ASiT: the student's crop equals the clean one outside the marked pixels and differs inside them, which
    cover the configured area; ATST-Clip: each crop next to its augmented version."""
    from atst_jax.methods import build
    from atst_jax.train import load_config

    config = load_config(f"configs/{name}.py:tiny")
    method = build(config)
    rng = np.random.default_rng(0)
    batch = {}
    for key, (shape, dtype) in method.input_shapes(4).items():
        if np.dtype(dtype) == np.int32:
            batch[key] = np.full(shape, 10_000, np.int32)
        else:
            batch[key] = rng.normal(size=shape).astype(np.float32)
    pics = jax.jit(lambda b, k: [(s, o) for _, s, o in method.pictures(b, k, 0)])(batch, jax.random.key(3))
    titles = [t for t, _, _ in method.pictures(batch, jax.random.key(3), 0)]
    if name == "asit":
        assert titles[1].endswith("(student: GMML)")
        clean, (corrupted, mask) = np.asarray(pics[0][0]), (np.asarray(pics[1][0]), np.asarray(pics[1][1]))
        assert pics[0][1] is None and mask.shape == clean.shape
        on = mask > 0.5
        np.testing.assert_array_equal(corrupted[~on], clean[~on])
        assert (corrupted[on] != clean[on]).mean() > 0.99
        assert 0.25 <= on.mean() <= 0.8
    else:
        assert titles == ["anchor crop", "anchor, augmented", "positive crop", "positive, augmented"]
        np.testing.assert_array_equal(np.asarray(pics[0][0]), batch["anchor"][0])
        assert np.asarray(pics[1][0]).shape == batch["anchor"][0].shape
        assert not np.allclose(np.asarray(pics[1][0]), batch["anchor"][0])


def test_the_embedded_probe_split_refuses_a_test_set_it_would_not_use(tmp_path):
    """``probe.train=embedded`` brings its own test half; a ``probe.test`` beside it used to be ignored."""
    from atst_jax.eval.pretrain_probe import PretrainProbe
    from atst_jax.sharding import ConfigError

    config = tiny_config(str(tmp_path / "cache"))
    config.probe.update(train="embedded", test=str(tmp_path / "my_test_set"))
    with pytest.raises(ConfigError, match="probe.train=embedded brings its own test split"):
        PretrainProbe(config, tmp_path, {}, "atst_logmel64")
