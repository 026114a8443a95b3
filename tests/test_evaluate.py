"""Frozen-encoder probes (``atst_jax.eval``): the probe on a separable toy task, PSDS of perfect and of
empty predictions, and the CLI end to end on weak and strong DCASE-format data prepared from the embedded
generator (64 clips: the first 40 train, the other 24 test), with a one-block ATST-Frame checkpoint written
directly (no training: the numbers are not the point, the three encoders and the metrics are)."""

from __future__ import annotations

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
from conftest import prepare_dcase

from atst_jax.eval import probe as ev
from atst_jax.eval.data import LabelledSet, frame_targets
from atst_jax.eval.metrics import average_precision, clip_metrics, mean_ap, sed_metrics

N_TRAIN = 40
FAST = ["--epochs", "4", "--lrs", "1e-2", "--eval_every", "2", "--no_progress"]


def test_probe_separable_toy_task():
    """Gaussian clusters 6σ apart: the softmax probe is (near) perfect on held-out points, and the sigmoid
    probe ranks every class perfectly (mAP 1) on a two-label version."""
    rng = np.random.default_rng(0)
    k, c = 5, 24
    centres = rng.normal(size=(k, c)) * 3.0

    def draw(n):
        y = rng.integers(0, k, n)
        return (centres[y] + rng.normal(size=(n, c))).astype(np.float32), np.eye(k, dtype=np.float32)[y]

    (x, y), (xv, yv), (xt, yt) = draw(300), draw(60), draw(200)

    def val_acc(probe):
        return float((probe.predict(xv).argmax(1) == yv.argmax(1)).mean())

    probe = ev.train_probe(x, y, val_acc, softmax=True, lrs=(1e-3, 1e-2), epochs=10, batch=64)
    metrics, per = clip_metrics(yt, probe.predict(xt), "clip_single", [str(j) for j in range(k)])
    assert metrics["accuracy"] >= 0.99 and metrics["mAP"] >= 0.99, metrics
    assert probe.selection["lr"] in (1e-3, 1e-2) and len(probe.selection["history"]) == 2 * 10
    # Deterministic: the same seed gives the same probe.
    again = ev.train_probe(x, y, val_acc, softmax=True, lrs=(1e-3, 1e-2), epochs=10, batch=64)
    np.testing.assert_array_equal(again.kernel, probe.kernel)

    # Multi-label: each point carries its cluster's class and the next one's.
    y2, yt2 = np.clip(y + np.roll(y, 1, axis=1), 0, 1), np.clip(yt + np.roll(yt, 1, axis=1), 0, 1)
    yv2 = np.clip(yv + np.roll(yv, 1, axis=1), 0, 1)
    probe = ev.train_probe(
        x, y2, lambda p: mean_ap(yv2, p.predict(xv))[0], softmax=False, lrs=(1e-2,), epochs=10
    )
    metrics, _ = clip_metrics(yt2, probe.predict(xt), "clip_multi", [str(j) for j in range(k)])
    assert metrics["mAP"] >= 0.99 and metrics["accuracy"] >= 0.95, metrics


def test_average_precision_matches_the_definition():
    """Ties ranked together (a threshold admits a whole tie group), as scikit-learn's AP."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200), 1)  # many ties
    assert average_precision(y, s) == pytest.approx(sklearn_metrics.average_precision_score(y, s))


def _events(rng, clips, classes, seconds=10.0):
    out = {}
    for i in range(clips):
        evs = []
        for _ in range(rng.integers(1, 4)):
            onset = rng.uniform(0, seconds - 1.0)
            evs.append((onset, min(seconds, onset + rng.uniform(0.3, 3.0)), int(rng.integers(0, classes))))
        out[f"clip{i}"] = np.array(evs, np.float32)
    return out


def test_psds_of_perfect_predictions_is_one_and_of_empty_predictions_zero():
    """Posteriors that are the ground truth on the 40 ms grid score PSDS1 = PSDS2 = 1, event F1 = frame F1 = 1
    (overlapping events of a class merged, as sed_scores_eval wants); all-zero posteriors score 0."""
    pytest.importorskip("sed_scores_eval")
    rng = np.random.default_rng(0)
    classes = [f"c{j}" for j in range(4)]
    events = _events(rng, 8, len(classes))
    data = LabelledSet(
        "toy", list(events), [None] * 8, [np.unique(e[:, 2]).astype(int) for e in events.values()],
        list(events.values()), classes, "atst_logmel64",
    )  # fmt: skip
    step = 0.04
    perfect = [frame_targets(e, 250, step, len(classes)) for e in events.values()]
    metrics, per = sed_metrics(data, perfect, step, median=1)
    assert all(v == pytest.approx(1.0) for v in metrics.values()), metrics
    # The default median filter (7 steps) joins events of a class less than 3 steps apart (clip 3 has a
    # 53 ms gap): the event F1 drops, PSDS barely moves.
    metrics, per = sed_metrics(data, perfect, step, median=7)
    assert metrics["psds1"] > 0.98 and metrics["psds2"] > 0.98, metrics
    empty = [np.zeros_like(p) for p in perfect]
    metrics, per = sed_metrics(data, empty, step, median=7)
    assert metrics["psds1"] == 0.0 and metrics["psds2"] == 0.0 and metrics["event_f1"] == 0.0, metrics
    assert metrics["frame_macro_f1"] == 0.0 and all(v["frame_f1"] == 0.0 for v in per.values())


ODD_NAMES = ["a\\b", "$^$", "{0}/%s"]  # a backslash, mathtext, a format string and a path separator


def test_psds_on_one_event_class_and_class_names_that_are_data():
    """A test set whose events cover one class (PSDS2's cross-triggers need another: sed_scores_eval raised
    ``TypeError: unhashable type``), and class names sed_scores_eval cannot take (a backslash failed its
    assertion) or that look like formats: perfect posteriors score 1 everywhere, per class under the names."""
    pytest.importorskip("sed_scores_eval")
    rng = np.random.default_rng(0)
    for present in ([1], [0, 2]):
        events = {}
        for i in range(4):
            onset = rng.uniform(0, 6)
            events[f"clip{i}"] = np.array([[onset, onset + 2.0, present[i % len(present)]]], np.float32)
        data = LabelledSet(
            "toy", list(events), [None] * 4, [e[:, 2].astype(int) for e in events.values()],
            list(events.values()), ODD_NAMES, "atst_logmel64",
        )  # fmt: skip
        perfect = [frame_targets(e, 250, 0.04, 3) for e in events.values()]
        errors = {}
        metrics, per = sed_metrics(data, perfect, 0.04, median=1, errors=errors)
        assert errors == {} and all(v == pytest.approx(1.0) for v in metrics.values()), (present, metrics)
        assert list(per) == ODD_NAMES
        assert [per[c]["event_f1"] for c in ODD_NAMES] == [1.0 if j in present else None for j in range(3)]


def test_a_failing_metric_is_an_error_entry_beside_the_others(monkeypatch):
    """One metric that raises is None with its error (one line) in ``errors``; the others are computed."""
    sse = pytest.importorskip("sed_scores_eval")

    def broken(**kwargs):
        raise RuntimeError("psds\nbroke")

    monkeypatch.setattr(sse.intersection_based, "psds", broken)
    events = [np.array([[1.0, 3.0, 0]], np.float32), np.array([[2.0, 5.0, 1]], np.float32)]
    data = LabelledSet("toy", ["a", "b"], [None] * 2, [np.array([0]), np.array([1])], events, ["x", "y"], "f")
    perfect = [frame_targets(e, 200, 0.04, 2) for e in events]
    errors = {}
    metrics, _ = sed_metrics(data, perfect, 0.04, median=1, errors=errors)
    assert errors == {"psds1": "RuntimeError: psds broke", "psds2": "RuntimeError: psds broke"}
    assert metrics["psds1"] is None and metrics["psds2"] is None
    assert metrics["frame_macro_f1"] == metrics["event_f1"] == metrics["frame_mAP"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory, embedded_cache):
    """``{"strong_train", "strong_test", "weak_train", "weak_test"}``: prepared dataset directories."""
    from atst_jax.data import synthetic

    rows = sorted(synthetic.read_strong_tsv(os.path.join(embedded_cache, "strong_labels.tsv")).items())
    root = tmp_path_factory.mktemp("eval_data")
    out = {}
    for kind in ("strong", "weak"):
        out[f"{kind}_train"] = prepare_dcase(
            embedded_cache, rows[:N_TRAIN], str(root / f"{kind}_train"), kind == "strong"
        )
        out[f"{kind}_test"] = prepare_dcase(
            embedded_cache, rows[N_TRAIN:], str(root / f"{kind}_test"), kind == "strong"
        )
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-block ATST-Frame ``tiny`` checkpoint (step 5), written without training: the initialisation
    (which is exactly the ``random_init`` baseline at seed 0) with perturbed teacher parameters."""
    import jax
    from flax import nnx

    from atst_jax.checkpoint import Checkpointer
    from atst_jax.methods import build
    from atst_jax.train import load_config

    config = load_config("configs/atst_frame.py:tiny")
    config.model.width, config.model.depth, config.model.heads = 64, 1, 1
    student, teacher, _ = build(config).init(jax.random.key(0))
    rng = np.random.default_rng(0)
    state = {
        "step": np.asarray(5, np.int32),
        "params": nnx.to_pure_dict(nnx.state(student, nnx.Param)),
        "teacher": jax.tree.map(
            lambda x: np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32),
            nnx.to_pure_dict(nnx.state(teacher, nnx.Param)),
        ),
        "opt": {"count": np.asarray(5, np.int32)},
        "rng": np.zeros((2,), np.uint32),
    }
    workdir = tmp_path_factory.mktemp("eval_run")
    ckpt = Checkpointer(workdir, save_every=1, keep=1, async_save=False)
    ckpt.save(5, state, config=config, force=True)
    ckpt.close()
    return workdir


def _cli(run, train, test, out, *extra):
    return ev.main(
        ["--workdir", str(run), "--train", train, "--test", test, "--out", str(out), *FAST, *extra]
    )


def test_cli_sed_end_to_end(run, data, tmp_path, capsys):
    """Strong labels → SED on the 40 ms grid: RESULTS.json holds frame F1, PSDS1/2 and event F1 (all in
    [0, 1]) for the checkpoint and both baselines, and the table is printed."""
    out = tmp_path / "RESULTS.json"
    scores_dir = tmp_path / "dcase"
    assert _cli(run, data["strong_train"], data["strong_test"], out, "--scores_dir", str(scores_dir)) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "sed" and len(res["classes"]) == 10 and res["config"]["time_step_s"] == 0.04
    assert list(res["encoders"]) == ["checkpoint", "random_init", "logmel"]
    assert res["source"] == {"workdir": str(run), "step": 5, "encoder": "teacher"}
    assert res["data"]["test"]["clips"] == 64 - N_TRAIN and res["data"]["val"]["clips"] == 8
    for name, r in res["encoders"].items():
        m = r["metrics"]
        assert set(m) == {"frame_macro_f1", "psds1", "psds2", "event_f1", "frame_mAP"}, name
        assert all(0.0 <= v <= 1.0 for v in m.values()), (name, m)
        assert set(r["per_class"]) == set(res["classes"])
    assert (
        res["encoders"]["checkpoint"]["feature_dims"] == 64
        and res["encoders"]["logmel"]["feature_dims"] == 128
    )
    # The pooled log-mel sees the events (energy in their bands): well above chance (≈ 0.05 here: the positive fraction).
    assert res["encoders"]["logmel"]["metrics"]["frame_mAP"] > 0.15
    assert res["encoders"]["checkpoint"]["metrics"] != res["encoders"]["random_init"]["metrics"]
    printed = capsys.readouterr().out
    assert "psds1" in printed and "random_init" in printed and f"wrote {out}" in printed
    # The pictures: per-class bars and the posteriors of three clips, real images with content.
    assert res["plots"] == [str(tmp_path / "RESULTS_per_class.png"), str(tmp_path / "RESULTS_sed.png")]
    for path in res["plots"]:
        _assert_real_png(path, min_size=(300, 200))
    sed = _read_png(res["plots"][1])
    assert sed.shape[0] > 2 * sed.shape[1] / 3  # 3 clips × (truth + 3 encoders) panels stacked
    # The DCASE task 4 score tables, read back by sed_scores_eval's own readers, give the PSDS reported.
    from sed_scores_eval import intersection_based, io

    from atst_jax.eval.metrics import MAX_EFPR, PSDS1, PSDS2

    truth = io.read_ground_truth_events(scores_dir / "ground_truth.tsv")
    durations = io.read_audio_durations(scores_dir / "durations.tsv")
    assert len(durations) == 64 - N_TRAIN and set(truth) == set(durations)
    for name, r in res["encoders"].items():
        tables = io.read_sed_scores(scores_dir / name)
        assert (
            set(tables) == set(durations) and list(tables[next(iter(tables))].columns[2:]) == res["classes"]
        )
        for key, settings in (("psds1", PSDS1), ("psds2", PSDS2)):
            psds = intersection_based.psds(
                scores=tables, ground_truth=truth, audio_durations=durations, max_efpr=MAX_EFPR,
                unit_of_time="hour", **settings,
            )[0]  # fmt: skip
            assert abs(psds - r["metrics"][key]) < 1e-4, (name, key, psds, r["metrics"][key])


def _read_png(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _assert_real_png(path, min_size):
    img = _read_png(path)
    h, w, _ = img.shape
    assert w >= min_size[0] and h >= min_size[1], (path, img.shape)
    # Not blank: many distinct colours and a good share of non-white pixels.
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50, path
    assert (img.min(axis=2) < 200).mean() > 0.05, path


def test_cli_weak_end_to_end(run, data, tmp_path):
    """Weak multi-label data → clip classification (accuracy, mAP), and a given --val split."""
    out = tmp_path / "RESULTS.json"
    assert _cli(run, data["weak_train"], data["weak_test"], out, "--val", data["weak_test"]) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "clip_multi" and list(res["encoders"]) == ["checkpoint", "random_init", "logmel"]
    for r in res["encoders"].values():
        assert set(r["metrics"]) == {"accuracy", "mAP"} and 0.0 <= r["metrics"]["mAP"] <= 1.0
    assert res["data"]["val"]["clips"] == 64 - N_TRAIN
    # Strong data evaluated at clip level on request.
    assert (
        _cli(run, data["strong_train"], data["strong_test"], out, "--task", "clip", "--baselines", "none")
        == 0
    )
    res = json.loads(out.read_text())
    assert res["task"] == "clip_multi" and list(res["encoders"]) == ["checkpoint"]
    assert res["plots"] == [str(tmp_path / "RESULTS_per_class.png")]  # no SED picture for clip tasks
    _assert_real_png(res["plots"][0], min_size=(300, 200))

    # The same teacher as an exported file (--weights) gives the same numbers as the run itself.
    pytest.importorskip("safetensors")
    from atst_jax.export import __main__ as export_cli

    weights = tmp_path / "teacher.safetensors"
    assert export_cli.main(["--workdir", str(run), "--format", "safetensors", "--out", str(weights)]) == 0
    out_w = tmp_path / "RESULTS_weights.json"
    argv = ["--weights", str(weights), "--train", data["strong_train"], "--test", data["strong_test"]]
    argv += ["--out", str(out_w), *FAST, "--task", "clip", "--baselines", "none", "--no_plots"]
    assert ev.main(argv) == 0
    res_w = json.loads(out_w.read_text())
    assert res_w["source"] == {"weights": str(weights), "encoder": "teacher"} and "plots" not in res_w
    for k, v in res["encoders"]["checkpoint"]["metrics"].items():
        assert res_w["encoders"]["checkpoint"]["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_embedder_batches_clips_like_one_at_a_time(run):
    """``Embedder.spec_features`` (chunks of several clips in one call) equals embedding each clip alone."""
    from atst_jax.eval.embed import Embedder, read_run_encoder

    encoder, _, _ = read_run_encoder(run)
    emb = Embedder(encoder, max_chunks=4)
    rng = np.random.default_rng(0)
    specs = [rng.normal(size=(64, t)).astype(np.float32) for t in (1001, 2, 2400, 37)]
    batched = emb.spec_features(specs)
    for spec, (tokens, scene) in zip(specs, batched, strict=True):
        alone = emb.spec_embeddings(spec)
        np.testing.assert_allclose(tokens, alone, atol=1e-5)
        if len(alone):
            np.testing.assert_allclose(scene, alone.mean(axis=0), atol=1e-5)
        else:
            assert np.isnan(scene).all()


def test_cli_refuses_bad_inputs_with_one_line(run, data, tmp_path, capsys):
    def refused(*argv, expect):
        assert ev.main([*argv, *FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expect in err, err

    out = str(tmp_path / "R.json")
    base = ["--workdir", str(run), "--out", out]
    refused(*base, "--train", str(tmp_path / "nope"), "--test", data["weak_test"], expect="no such directory")
    refused("--workdir", str(tmp_path / "norun"), "--train", data["weak_train"], "--test", data["weak_test"],
            "--out", out, expect="no such directory")  # fmt: skip
    # Another front end than the encoder's.
    kaldi = shutil.copytree(data["weak_test"], tmp_path / "kaldi")
    meta = json.loads((kaldi / "metadata.json").read_text())
    (kaldi / "metadata.json").write_text(json.dumps({**meta, "features": "kaldi_fbank128"}))
    refused(*base, "--train", data["weak_train"], "--test", str(kaldi), expect="--features atst_logmel64")
    # No labels.
    unlabelled = shutil.copytree(data["weak_test"], tmp_path / "unlabelled")
    (unlabelled / "labels.json").write_text(json.dumps({"num_classes": 0, "classes": [], "strong": False}))
    refused(*base, "--train", str(unlabelled), "--test", data["weak_test"], expect="has no labels")
    refused(
        *base, "--train", data["weak_train"], "--test", data["weak_test"], "--task", "sed", expect="strong"
    )
    refused(
        *base,
        "--train",
        data["weak_train"],
        "--test",
        data["weak_test"],
        "--baselines",
        "x",
        expect="unknown",
    )
    assert not os.path.exists(out)


def test_one_class_strong_test_set_writes_psds_and_results_before_pictures(
    run, data, embedded_cache, tmp_path, monkeypatch, capsys
):
    """The acceptance case: a strong test set whose events are all of one class (the same 24 clips as the
    other SED runs here, relabelled: the same shapes, compiled once). RESULTS.json holds PSDS; it is on
    disk, metrics and all, before the first picture is drawn, and a picture that fails is an error entry
    (the other picture is still drawn)."""
    from atst_jax.data import synthetic
    from atst_jax.eval import report

    rows = sorted(synthetic.read_strong_tsv(os.path.join(embedded_cache, "strong_labels.tsv")).items())
    one = synthetic.CLASSES[3]
    relabelled = [(name, [(a, b, one) for a, b, _ in evs]) for name, evs in rows[N_TRAIN:]]
    test = prepare_dcase(embedded_cache, relabelled, str(tmp_path / "one_class"), strong=True)
    out = tmp_path / "RESULTS.json"
    seen = []

    def per_class_fails(path, results):
        seen.append(json.loads(out.read_text()))
        raise RuntimeError("no bars today")

    monkeypatch.setattr(report, "per_class_png", per_class_fails)
    assert _cli(run, data["strong_train"], test, out, "--baselines", "none") == 0
    on_disk = seen[0]
    assert on_disk["complete"] is False and on_disk["pending"] == [] and "plots" not in on_disk
    res = json.loads(out.read_text())
    assert res["complete"] is True
    r = res["encoders"]["checkpoint"]
    assert r["errors"] == {} and r["metrics"] == on_disk["encoders"]["checkpoint"]["metrics"]
    assert all(0.0 <= r["metrics"][m] <= 1.0 for m in ("psds1", "psds2", "event_f1")), r["metrics"]
    assert [c for c in res["classes"] if r["per_class"][c]["event_f1"] is not None] == [one]
    assert res["errors"] == {"per_class.png": "RuntimeError: no bars today"}
    assert res["plots"] == [str(tmp_path / "RESULTS_sed.png")]
    _assert_real_png(res["plots"][0], min_size=(300, 200))
    err = capsys.readouterr().err
    assert "warning: per_class.png not drawn (RuntimeError: no bars today)" in err


def test_pictures_draw_class_names_and_ids_as_they_are(tmp_path):
    """Names are data, not mathtext: ``$^$`` failed matplotlib's parser when the figure was drawn."""
    from atst_jax.eval import report

    per = {c: {"ap": 0.3 + 0.2 * j} for j, c in enumerate(ODD_NAMES)}
    res = {"task": "clip_multi", "classes": ODD_NAMES, "encoders": {"checkpoint": {"per_class": per}}}
    _assert_real_png(report.per_class_png(tmp_path / "bars.png", res), min_size=(300, 200))
    rng = np.random.default_rng(0)
    clip = {"id": "$x_1$", "events": [(0.5, 2.0, 1)], "posteriors": {"checkpoint": rng.random((100, 3))}}
    _assert_real_png(report.sed_posteriors_png(tmp_path / "sed.png", [clip], ODD_NAMES, 0.04), (300, 100))


def test_non_finite_weights_or_embeddings_stop_with_one_line(run, data):
    """NaN weights: one line naming them before any work (before: an IndexError deep in PSDS for SED, "no
    training examples" for clips). Finite weights whose embeddings overflow: one line naming the encoder and
    the clip (a stand-in embedder gives them: no compile)."""
    from flax import nnx

    from atst_jax.eval.data import EvalError, read_labelled
    from atst_jax.eval.embed import read_run_encoder

    quiet = lambda *a: None  # noqa: E731
    encoder, _, _ = read_run_encoder(run)
    state = nnx.state(encoder, nnx.Param)
    nnx.update(encoder, jax.tree.map(lambda x: x.at[..., :1].set(float("nan")), state))
    for kind in ("strong", "weak"):
        train, test = (
            read_labelled(data[f"{kind}_train"], "--train"),
            read_labelled(data[f"{kind}_test"], "--test"),
        )
        source = {"workdir": "RUN", "step": 5, "encoder": "teacher"}
        with pytest.raises(EvalError, match=r"^RUN step 5 \(teacher\): non-finite \(NaN/inf\) weights in"):
            ev.evaluate(encoder, 1000, "atst_logmel64", train, test, baselines=(), source=source, log=quiet)

    class Overflowing:
        chunk_frames, patch_w = 1000, 4

        def spec_features(self, specs):
            return [
                (np.full((s.shape[1] // 4, 8), np.inf, np.float32), np.zeros(8, np.float32)) for s in specs
            ]

    for level in ("clip", "frame"):
        with pytest.raises(
            EvalError, match=f"^checkpoint: non-finite .* embeddings for clip {test.ids[0]} of"
        ):
            ev.encoder_features(Overflowing(), test, level, 32, name="checkpoint")


def test_damaged_weights_files_are_one_line(data, tmp_path, capsys):
    """An empty file, a safetensors file cut inside its header or inside its tensors: one line naming the
    file and what is wrong (before: a SafetensorError traceback, or advice to allow-list pickled classes)."""
    from safetensors.numpy import save_file

    whole = tmp_path / "whole.safetensors"
    save_file({"pos_embed": np.zeros((1, 251, 64), np.float32)}, str(whole))
    blob = whole.read_bytes()
    files = {"empty": b"", "header": blob[:40], "tensors": blob[: len(blob) // 2]}
    expect = {"empty": "empty file", "header": "damaged or truncated safetensors file",
              "tensors": "damaged or truncated safetensors file"}  # fmt: skip
    for name, content in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        argv = ["--weights", str(path), "--train", data["weak_train"], "--test", data["weak_test"]]
        assert ev.main([*argv, "--out", str(tmp_path / "R.json"), *FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --weights {path}: {expect[name]}"), err
        assert "safe_globals" not in err


def test_ctrl_c_in_evaluate_is_one_line_and_exit_130(run, data, tmp_path):
    """Ctrl-C once the evaluation has started: exit 130 with one line saying what RESULTS.json holds (before:
    a crash of the interpreter's shutdown, exit -11, when it landed in an XLA compilation)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, cli_env

    out = tmp_path / "R.json"
    argv = [
        "--workdir",
        str(run),
        "--train",
        data["weak_train"],
        "--test",
        data["weak_test"],
        "--out",
        str(out),
    ]
    # Python leaves SIGINT ignored when its parent ignored it (a test run in the background): set the handler.
    start = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    start += "runpy.run_module('atst_jax.evaluate', run_name='__main__', alter_sys=True)"
    proc = subprocess.Popen(
        [sys.executable, "-c", start, *argv, *FAST], cwd=ROOT, env=cli_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.readline().startswith("task clip_multi")  # the evaluation has started
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if "pkg_resources" not in line and line.strip()]
    assert proc.returncode == 130, err[-2000:]
    assert lines[-1].startswith(f"interrupted: {out} holds the encoders finished: "), err[-2000:]
    assert "Traceback" not in err and "Fatal Python error" not in err


# ----------------------------------------------------------------------------------------------------------
# The official linear evaluation (--protocol official)
# ----------------------------------------------------------------------------------------------------------


def _reference_official(x, y, *, softmax, norm, lr, epochs, batch, per_step, warmup, final, clip, seed):
    """An independent NumPy statement of the official head's training: PyTorch SGD (momentum 0.9, no
    dampening, no weight decay) on CE / BCE, BatchNorm1d(affine=False) in training mode, and the learning
    rate of CosineAnnealingLR stepped per epoch, or a per-step linear warm-up then a cosine to ``final``."""
    n, c = x.shape
    k = y.shape[1]
    w = np.random.default_rng(seed).normal(0.0, 0.01, (c, k))
    b = np.zeros(k)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    run_mean, run_var = np.zeros(c), np.ones(c)
    steps = -(-n // batch)
    total, warm = epochs * steps, warmup * steps
    t = 0
    for e in range(epochs):
        order = np.random.default_rng((seed, e + 1)).permutation(n)
        for s in range(steps):
            if not per_step:
                rate = 0.5 * lr * (1 + np.cos(np.pi * e / epochs))
            elif t < warm:
                rate = lr * t / (warm - 1)
            else:
                rate = final + 0.5 * (lr - final) * (1 + np.cos(np.pi * (t - warm) / (total - warm)))
            t += 1
            xb, yb = x[order[s * batch : (s + 1) * batch]], y[order[s * batch : (s + 1) * batch]]
            m = len(xb)
            mu, var = xb.mean(0), xb.var(0)
            h = (xb - mu) / np.sqrt(var + 1e-5) if norm else xb
            z = h @ w + b
            if softmax:
                q = np.exp(z - z.max(1, keepdims=True))
                dz = (q / q.sum(1, keepdims=True) - yb) / m
            else:
                dz = (1 / (1 + np.exp(-z)) - yb) / (m * k)
            gw, gb = h.T @ dz, dz.sum(0)
            if clip is not None:
                scale = min(1.0, clip / (np.sqrt((gw**2).sum() + (gb**2).sum()) + 1e-6))
                gw, gb = gw * scale, gb * scale
            vw, vb = 0.9 * vw + gw, 0.9 * vb + gb
            w, b = w - rate * vw, b - rate * vb
            run_mean = 0.9 * run_mean + 0.1 * mu
            run_var = 0.9 * run_var + 0.1 * var * m / (m - 1)
    return w, b, run_mean, run_var


@pytest.mark.parametrize("kind", ["clip_single", "clip_multi", "sed"])
def test_official_sgd_and_schedule_match_numpy(kind):
    """``train_official`` = SGD with momentum on the official schedule, step for step: clips with BatchNorm,
    the lr x batch/256 and a once-per-epoch cosine; frame level without BatchNorm, with warm-up, a cosine to
    1e-6 and gradient clipping. 10 examples in batches of 4 (the last one holds 2)."""
    rng = np.random.default_rng(3)
    n, c, k, epochs, batch = 10, 3, 2, 7, 4
    x = (rng.normal(size=(n, c)) * [1.0, 3.0, 0.5] + [0.5, -2.0, 1.0]).astype(np.float32)
    labels = rng.integers(0, k, n)
    y = np.eye(k, dtype=np.float32)[labels]
    if kind != "clip_single":
        y[:, 0] = rng.random(n) < 0.5
    recipe = ev.OFFICIAL_SED if kind == "sed" else ev.OFFICIAL_CLIP
    base = 0.5 if kind == "sed" else 20.0
    scores = iter(range(1000))  # every evaluation better than the last: the final state is kept
    probe = ev.train_official(
        x, y, lambda p: next(scores), softmax=kind == "clip_single", recipe=recipe, lrs=(base,),
        epochs=epochs, batch=batch, seed=4,
    )  # fmt: skip
    lr = base * batch / 256 if kind != "sed" else base
    w, b, mean, var = _reference_official(
        x.astype(np.float64), y.astype(np.float64), softmax=kind == "clip_single", norm=kind != "sed",
        lr=lr, epochs=epochs, batch=batch, per_step=kind == "sed", warmup=5, final=1e-6,
        clip=3.0 if kind == "sed" else None, seed=4,
    )  # fmt: skip
    assert np.abs(w).max() > 0.05  # the head moved far from its N(0, 0.01) start
    np.testing.assert_allclose(probe.kernel, w, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(probe.bias, b, rtol=2e-4, atol=2e-5)
    if kind != "sed":
        np.testing.assert_allclose(probe.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probe.var, var, rtol=1e-5, atol=1e-6)
    assert probe.norm is (kind != "sed")
    sel = probe.selection
    assert sel["epoch"] == epochs and sel["lr"] == base and sel["effective_lr"] == pytest.approx(lr)
    assert [h["epoch"] for h in sel["history"]] == list(range(1, epochs + 1))  # validated every epoch
    # The schedule itself: constant within an epoch for clips, moving every step for SED.
    sched = ev.official_lr_schedule(lr, epochs, 3, recipe)
    if kind == "sed":
        # The warm-up (5 epochs x 3 steps) ends at lr and the cosine starts there: lr twice, 20 values.
        assert sched[0, 0] == 0.0 and (sched.ravel()[14:16] == lr).all() and len(np.unique(sched)) == 20
    else:
        np.testing.assert_allclose(sched[:, 0], [0.5 * lr * (1 + np.cos(np.pi * e / 7)) for e in range(7)])
        assert (sched == sched[:, :1]).all()


def test_official_early_stopping_and_selection():
    """A run stops after ``patience`` evaluations without a better score, and the best evaluation over all
    learning rates is the head kept."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)).astype(np.float32), np.eye(2, dtype=np.float32)[rng.integers(0, 2, 12)]
    script = iter([0.1, 0.5, 0.4, 0.3, 0.2] + [0.6] + [0.0] * 20)
    probe = ev.train_official(
        x, y, lambda p: next(script), softmax=False, recipe=ev.OFFICIAL_SED, lrs=(1e-2, 1e-1), epochs=8
    )
    hist = [(h["lr"], h["epoch"]) for h in probe.selection["history"]]
    # Patience 10 > 8 epochs (SED): both runs go to the end; the best is the first run's epoch 6.
    assert len(hist) == 16 and probe.selection["lr"] == 1e-2 and probe.selection["epoch"] == 6
    # Patience 3: the first run stops at epoch 5 (no better than epoch 2 since), the second's epoch 1 wins.
    import dataclasses

    quick = dataclasses.replace(ev.OFFICIAL_SED, patience=3)
    script = iter([0.1, 0.5, 0.4, 0.3, 0.2] + [0.6] + [0.0] * 20)
    probe = ev.train_official(
        x, y, lambda p: next(script), softmax=False, recipe=quick, lrs=(1e-2, 1e-1), epochs=8
    )
    hist = [(h["lr"], h["epoch"]) for h in probe.selection["history"]]
    assert hist[:5] == [(1e-2, e) for e in range(1, 6)] and hist[5] == (1e-1, 1)
    assert probe.selection["lr"] == 1e-1 and probe.selection["epoch"] == 1 and probe.selection["val"] == 0.6


def test_official_centre_crop_and_chunk_averaging():
    """The centre crop (shorter clips kept whole) and the official chunk averaging: chunks weighted equally,
    a trailing chunk kept only when it holds more than half a chunk, ``[CLS ‖ mean]`` per chunk."""
    mel = np.arange(20, dtype=np.float32).reshape(2, 10)
    cropped, start = ev.centre_crop(mel, 4)
    assert start == 3 and cropped.tolist() == [[3, 4, 5, 6], [13, 14, 15, 16]]
    assert ev.centre_crop(mel, 12)[0] is mel

    # Equal weights over the chunks kept: the first always, a later one when it holds more than half a chunk
    # (13-frame chunks: > 6 frames), whatever its token count; a chunk with no whole patch has no vector.
    vec = [np.array([2.0]), np.array([15.0]), np.array([1000.0])]
    assert ev.official_scene(vec, [13, 7, 6], 13).tolist() == [pytest.approx(8.5)]
    assert ev.official_scene(vec[:2] + [None], [13, 13, 2], 13).tolist() == [pytest.approx(8.5)]
    assert np.isnan(ev.official_scene([None], [3], 13)).all()
    assert ev.official_pieces(30, 13) == [(0, 13), (13, 26), (26, 30)]

    # The chunks are cut every ``chunk + 1`` frames (the official ``seconds · 100 + 1``) and each is encoded on
    # its own: an embedder whose CLS is its input's first frame and whose tokens are its patches' first
    # frames. 12-frame encoder chunks → 13-frame official chunks starting at frames 0, 13, 26.
    class FirstFrames:
        chunk_frames, patch_w = 12, 4
        front = types.SimpleNamespace(feature_set=ev.feature_sets.get("atst_logmel64"))

        def chunk_outputs(self, specs):
            out = []
            for spec in specs:
                bounds = ev.inference.chunk_bounds(spec.shape[1], self.chunk_frames, self.patch_w)
                tokens = spec[0, : spec.shape[1] // 4 * 4 : 4, None]
                out.append((tokens, np.array([[spec[0, s]] for s, _ in bounds]), None))
            return out

    assert ev.official_chunk_frames(FirstFrames.front.feature_set, 12) == 13
    spec = np.tile(np.arange(33, dtype=np.float32), (2, 1))
    ((vectors, frames, _),) = ev._official_clip_vectors(FirstFrames(), [spec], 13)
    assert frames == [13, 13, 7]
    assert [v.tolist() for v in vectors] == [[0, 4], [13, 17], [26, 26]]  # [CLS ‖ mean of 0, 4, 8]; …

    # A dataset crop moves the events with it: 20 s of 10 ms frames (2001) cropped to the centre 10 s
    # (1001 frames from frame 500, 5 s): an event at 4-7 s becomes 0-2 s; one at 16-18 s falls outside.
    data = LabelledSet(
        "toy", ["a", "b"], [np.zeros((64, 2001), np.float16), np.zeros((64, 300), np.float16)],
        [np.array([0, 1]), np.array([1])],
        [np.array([[4.0, 7.0, 0], [16.0, 18.0, 1]], np.float32), np.array([[1.0, 2.0, 1]], np.float32)],
        ["x", "y"], "atst_logmel64",
    )  # fmt: skip
    out = ev.crop_set(data, 10.0)
    assert [m.shape[1] for m in out.mels] == [1001, 300]
    np.testing.assert_allclose(out.events[0], [[0.0, 2.0, 0]])
    np.testing.assert_allclose(out.events[1], [[1.0, 2.0, 1]])


def test_cli_official_protocol(run, data, tmp_path):
    """``--protocol official`` end to end: clip-level (weak) with the official SGD head, selected every
    epoch, its lr scaled by batch / 256 (32 training clips), numbers other than the probe protocol's; and
    frame-level SED on the last block only, selected on the validation loss."""
    fast = ["--epochs", "4", "--lrs", "1e-2", "--no_progress", "--no_plots", "--baselines", "none"]
    argv = ["--workdir", str(run), "--train", data["weak_train"], "--test", data["weak_test"], *fast]
    out_o, out_p = tmp_path / "official.json", tmp_path / "probe.json"
    assert ev.main([*argv, "--out", str(out_o), "--protocol", "official"]) == 0
    assert ev.main([*argv, "--out", str(out_p)]) == 0
    res, probe = json.loads(out_o.read_text()), json.loads(out_p.read_text())
    assert res["config"]["protocol"] == "official" and probe["config"]["protocol"] == "probe"
    sel = res["encoders"]["checkpoint"]["selection"]
    assert sel["effective_lr"] == pytest.approx(1e-2 * 32 / 256) and len(sel["history"]) == 4
    assert "effective_lr" not in probe["encoders"]["checkpoint"]["selection"]
    m = res["encoders"]["checkpoint"]["metrics"]
    assert set(m) == {"accuracy", "mAP"} and 0.0 <= m["mAP"] <= 1.0
    assert m != probe["encoders"]["checkpoint"]["metrics"]

    argv = ["--workdir", str(run), "--train", data["strong_train"], "--test", data["strong_test"], *fast]
    assert ev.main([*argv, "--out", str(out_o), "--protocol", "official"]) == 0
    res = json.loads(out_o.read_text())
    assert res["task"] == "sed" and res["config"]["layers"] == 1 and res["config"]["eval_every"] == 1
    r = res["encoders"]["checkpoint"]
    assert set(r["metrics"]) == {"frame_macro_f1", "psds1", "psds2", "event_f1", "frame_mAP"}
    assert r["selection"]["val"] < 0  # minus the validation BCE
    assert r["selection"]["effective_lr"] == 1e-2  # no batch scaling at frame level
