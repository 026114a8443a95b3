"""The fine-tuning command end to end on the embedded generator's weak labels, with one-block checkpoints
written directly (no pretraining: the path is the point, not the numbers): the C2F recipe (Clip fine-tune →
Frame fine-tuned with and without distillation), runs stopped by SIGTERM / Ctrl-C in every model and
continued, the ``--out`` folder's owner, ``--teacher`` given a run's folder, and the checks made before any
work.

One uninterrupted C2F run (module fixture) is the reference every stopped-and-continued run must reproduce;
the stops are real signals sent to this process by ``after_step`` (the command's per-step test hook), which
``distributed.StopSignal`` turns into a save at the next step boundary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, cli_env, prepare_dcase
from flax import nnx

from atst_jax import finetune as entry
from atst_jax.eval import finetune as ft
from atst_jax.eval import finetune_run as ftr

N_TRAIN = 40
EPOCHS = 2
# 40 clips, 8 held out: 4 steps of 8 per epoch. A recipe whose remaining values are the defaults: the run is
# the plain one, recorded per model.
OPTIONS = ["--epochs", str(EPOCHS), "--batch", "8", "--crop_s", "2", "--lr", "1.6", "--no_progress"]
OPTIONS += ["--distill_lambda", "0.5", "--recipe", "spcv2", "--warmup_epochs", "1", "--mixup", "0"]


def _write_run(root, config_file, width=64, seed=0, **method):
    """A one-block ``tiny`` checkpoint of the config's method at its initialisation (step 1); ``method``:
    fields of the method's config section to set."""
    from atst_jax.checkpoint import Checkpointer
    from atst_jax.methods import build
    from atst_jax.train import load_config

    config = load_config(f"configs/{config_file}:tiny")
    config.model.width, config.model.depth, config.model.heads = width, 1, 1
    config[config.method].update(method)
    student, teacher, _ = build(config).init(jax.random.key(seed))
    state = {
        "step": np.asarray(1, np.int32),
        "params": nnx.to_pure_dict(nnx.state(student, nnx.Param)),
        "teacher": nnx.to_pure_dict(nnx.state(teacher, nnx.Param)),
        "opt": {"count": np.asarray(1, np.int32)},
        "rng": np.zeros((2,), np.uint32),
    }
    ckpt = Checkpointer(root, save_every=1, keep=1, async_save=False)
    ckpt.save(1, state, config=config, force=True)
    ckpt.close()
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, embedded_cache):
    """The data sets and the runs the models start from."""
    from atst_jax.data import synthetic

    rows = sorted(synthetic.read_strong_tsv(os.path.join(embedded_cache, "strong_labels.tsv")).items())
    root = tmp_path_factory.mktemp("ft_inputs")
    data = [
        "--train",
        prepare_dcase(embedded_cache, rows[:N_TRAIN], str(root / "train"), strong=False),
        "--test",
        prepare_dcase(embedded_cache, rows[N_TRAIN:], str(root / "test"), strong=False),
    ]
    return {
        "data": data,
        "clip": str(_write_run(root / "clip_run", "atst_clip.py", seed=1)),
        "frame": str(_write_run(root / "frame_run", "atst_frame.py", seed=2)),
        # An ATST-Clip run evaluated on another feature set than the data's. (``clip_run`` trains on the
        # unfloored log-mel, the official per-crop floor, and is evaluated on the data's floored one.)
        "other_features": str(_write_run(root / "fbank", "atst_clip.py", seed=3, features="kaldi_fbank128")),
    }


def _c2f_argv(inputs, out):
    return ["--workdir", inputs["frame"], "--c2f_clip", inputs["clip"], *inputs["data"], "--out", str(out)]


def _plain_argv(inputs, out):
    return ["--workdir", inputs["frame"], *inputs["data"], "--out", str(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs):
    """The uninterrupted C2F run."""
    out = tmp_path_factory.mktemp("c2f_reference") / "c2f"
    assert ftr.main(_c2f_argv(inputs, out) + OPTIONS) == 0
    return out


def _stop_at(sig, name, epoch, steps):
    """``after_step``: sends ``sig`` to this process once model ``name`` has taken ``steps`` steps of epoch
    ``epoch`` (0-based); the rest of the run stops at the next step boundary (after the epoch's validation
    and checkpoint when ``steps`` ends the epoch)."""

    def hook(model, e, s):
        if (model, e, s) == (name, epoch, steps):
            # Only under the command's handler: the default one would end the test process itself.
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), sig)

    return hook


def _comparable(out) -> str:
    """RESULTS.json without what differs between equal runs: the seconds taken, the --out path."""
    doc = json.loads((out / "RESULTS.json").read_text())
    for m in doc["models"].values():
        del m["seconds"], m["model"]
    return json.dumps(doc, sort_keys=True)


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, inputs):
    """A plain fine-tuning run (the C2F run's undistilled Frame model alone) stopped by Ctrl-C in its second
    epoch and continued by the same command: ``(out, [exit statuses], RESULTS.json after the stop)``."""
    out = tmp_path_factory.mktemp("plain") / "ft"
    argv = _plain_argv(inputs, out) + OPTIONS
    codes = [ftr.main(argv, after_step=_stop_at(signal.SIGINT, "finetuned", 1, 2))]
    stopped = (out / "RESULTS.json").exists()
    codes.append(entry.main(argv))
    return out, codes, stopped


def test_c2f_runs_end_to_end_and_reports_distilled_beside_undistilled(reference, inputs):
    out = reference
    res = json.loads((out / "RESULTS.json").read_text())
    assert res["task"] == "clip_multi" and list(res["models"]) == ["clip", "frame", "frame_distilled"]
    assert res["recipe"] == "spcv2" and res["options"] == res["models"]["clip"]["options"]
    assert res["pending"] == []
    families = {n: m["recipe"]["family"] for n, m in res["models"].items()}
    assert families == {"clip": "clip", "frame": "frame", "frame_distilled": "c2f"}
    assert res["models"]["frame"]["options"]["lr"] == 1.6 and res["models"]["frame"]["options"]["batch"] == 8
    doc = json.loads((out / "frame_distilled" / "model" / "model.json").read_text())
    assert doc["recipe"]["family"] == "c2f" and doc["options"]["distill_lambda"] == 0.5
    for name, m in res["models"].items():
        assert 0.0 <= m["metrics"]["mAP"] <= 1.0, (name, m["metrics"])
        assert len(m["selection"]["history"]) == EPOCHS
        assert (out / name / "model" / "params.msgpack").is_file()
        assert not (out / name / "checkpoints").exists()  # removed once the model's results are written
    assert res["models"]["frame_distilled"]["distilled"] and not res["models"]["frame"]["distilled"]
    # The distillation term changes what the Frame model learns (same seed, same batches otherwise).
    assert (
        res["models"]["frame"]["selection"]["history"]
        != res["models"]["frame_distilled"]["selection"]["history"]
    )
    model, meta = ft.load_finetuned(out / "clip")
    assert meta["task"] == "clip_multi" and model.encoder.cfg.use_cls
    # Training lowers the task loss on this structured data (the head starts from scratch).
    hist = res["models"]["frame"]["selection"]["history"]
    assert hist[-1]["loss"] < hist[0]["loss"], hist
    # The same command again finds every model finished: nothing is trained, nothing changes.
    before = (out / "RESULTS.json").read_text()
    assert ftr.main(_c2f_argv(inputs, out) + OPTIONS) == 0
    assert (out / "RESULTS.json").read_text() == before


def test_c2f_stopped_by_sigterm_in_each_model_and_rerun_ends_as_the_uninterrupted_run(
    reference, inputs, tmp_path
):
    """SIGTERM in the Clip model's first epoch, at the end of the Frame model's first epoch, and in the
    distilled model's second: each run saves and exits 0, RESULTS.json holds the models finished so far (and
    the ones pending), and the fourth run ends with the uninterrupted run's RESULTS.json and parameters."""
    out = tmp_path / "c2f"
    argv = _c2f_argv(inputs, out) + OPTIONS
    stops = [("clip", 0, 2), ("frame", 0, 4), ("frame_distilled", 1, 1)]
    finished = [None, ["clip"], ["clip", "frame"]]
    for (name, epoch, steps), done in zip(stops, finished, strict=True):
        assert ftr.main(argv, after_step=_stop_at(signal.SIGTERM, name, epoch, steps)) == 0
        assert (out / name / "checkpoints").is_dir()
        if done is None:
            assert not (out / "RESULTS.json").exists()
            continue
        res = json.loads((out / "RESULTS.json").read_text())
        assert list(res["models"]) == done and res["pending"] == [n for n, *_ in stops if n not in done]
    assert ftr.main(argv) == 0
    assert _comparable(out) == _comparable(reference)
    for name in ("clip", "frame", "frame_distilled"):
        ours, theirs = (d / name / "model" / "params.msgpack" for d in (out, reference))
        assert ours.read_bytes() == theirs.read_bytes(), name


def test_finetune_stopped_by_ctrl_c_saves_exits_0_and_the_rerun_ends_as_the_uninterrupted_run(
    plain, reference, inputs
):
    out, codes, stopped_with_results = plain
    assert codes == [0, 0] and not stopped_with_results
    res = json.loads((out / "RESULTS.json").read_text())
    ours = res["models"]["finetuned"]
    theirs = json.loads((reference / "RESULTS.json").read_text())["models"]["frame"]
    for m in (ours, theirs):
        m.pop("seconds"), m.pop("model")
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    a, b = out / "finetuned" / "model", reference / "frame" / "model"
    assert (a / "params.msgpack").read_bytes() == (b / "params.msgpack").read_bytes()
    # Fine-tuning moved the encoder away from the pretrained one.
    pretrained = ftr._load(inputs["frame"], None, None, "teacher", "--workdir")[0]
    tuned = ft.load_finetuned(a)[0].encoder
    assert not np.array_equal(pretrained.patch_embed.kernel[...], tuned.patch_embed.kernel[...])


def test_mixup_memory_is_checkpointed_and_a_run_stopped_mid_epoch_ends_as_the_uninterrupted_one(
    inputs, tmp_path
):
    """``--mixup`` with the memory partner: the memory (here 12 examples, refilled several times over the run)
    is saved with the checkpoint and restored, so a run stopped in its second epoch and continued ends with
    the uninterrupted run's model, bit for bit."""
    opts = OPTIONS[: OPTIONS.index("--mixup")] + ["--mixup", "0.5", "--mixup_memory", "12"]
    runs = []
    for name, hook in (("whole", None), ("stopped", _stop_at(signal.SIGINT, "finetuned", 1, 1))):
        out = tmp_path / name
        argv = _plain_argv(inputs, out) + opts
        assert ftr.main(argv, after_step=hook) == 0
        if hook is not None:
            assert not (out / "RESULTS.json").exists()
            assert entry.main(argv) == 0
        runs.append(out)
    assert _comparable(runs[0]).replace(str(runs[0]), "") == _comparable(runs[1]).replace(str(runs[1]), "")
    a, b = (out / "finetuned" / "model" / "params.msgpack" for out in runs)
    assert a.read_bytes() == b.read_bytes()
    options = json.loads((runs[0] / "RESULTS.json").read_text())["models"]["finetuned"]["options"]
    assert (options["mixup"], options["mixup_partner"], options["mixup_memory"]) == (0.5, "memory", 12)


def test_importing_the_command_entry_imports_no_jax():
    """Ctrl-C during the seconds JAX takes to import is one line ("interrupted", exit 130) only if the
    import happens inside the CLI guard: the entry module itself must not import JAX."""
    code = "import sys, atst_jax.finetune; print('jax' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT
    )
    assert proc.stdout.strip() == "False", proc.stderr


def test_a_stop_while_the_command_loads_ends_it_before_it_starts_in_one_line(monkeypatch, capsys):
    """Ctrl-C or SIGTERM while the command's modules load (JAX's import: seconds) is held until they have
    loaded — raised in the middle of the import it can land in a garbage-collection callback, which prints
    "Exception ignored" with a traceback, drops the interrupt and lets the run go on — and then ends the
    command before it starts: one line, exit 130 (SIGTERM: 0), nothing done."""
    import builtins

    real = builtins.__import__

    for sig, want in ((signal.SIGINT, 130), (signal.SIGTERM, 0)):

        def importing(name, *args, sig=sig, **kwargs):
            if name == "atst_jax.eval.finetune_run":
                # Only under the entry's handler: the default ones would end the test process itself.
                assert signal.getsignal(sig) not in (signal.default_int_handler, signal.SIG_DFL), sig
                os.kill(os.getpid(), sig)
            return real(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", importing)
        assert entry.main(["--not_an_option"]) == want  # the command never ran: no usage error
        assert capsys.readouterr().err == "interrupted while starting: nothing was done\n"
        monkeypatch.setattr(builtins, "__import__", real)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_an_out_folder_belongs_to_one_run(plain, inputs, tmp_path, capsys):
    """Another command into a run's --out is refused in one line naming what differs; so is a non-empty
    folder without RUN.json, and an --out that is, holds, or lies inside the --teacher's folder. Nothing in
    the folder changes."""
    out = plain[0]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = ftr.main(_plain_argv(inputs, out) + OPTIONS + ["--lr", "0.8"])
    _one_line_error(capsys, code, f"--out {out} holds another fine-tuning run", "finetuned.lr: 1.6 -> 0.8")
    for where in (out, out / "finetuned", out.parent):
        code = ftr.main(
            ["--workdir", inputs["frame"], *inputs["data"], "--out", str(where), "--teacher", str(out)]
        )
        _one_line_error(capsys, code, "overlaps the --teacher's folder")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code = ftr.main(_plain_argv(inputs, other) + OPTIONS)
    _one_line_error(capsys, code, "is not empty and holds no fine-tuning run")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_teacher_may_be_the_out_folder_of_a_finetune_run(plain, reference):
    """``--teacher ft/`` (the run's --out) is its one model; a C2F folder holds three: name one."""
    _, meta = ft.load_finetuned(plain[0])
    assert meta["task"] == "clip_multi"
    assert ft.finetuned_dir(plain[0]) == plain[0] / "finetuned" / "model"
    with pytest.raises(ft.FinetuneError, match=r"3 fine-tuned models \(clip, frame, frame_distilled\)"):
        ft.load_finetuned(reference)


def test_every_input_is_checked_before_any_work(inputs, reference, tmp_path, capsys):
    """Each mistake is one line, exit 2, before anything is trained or written: an --out below a file, a
    Frame run as C2F's Clip teacher, C2F's student step or feature set, the Clip run's feature set, a
    --teacher of another task."""
    file = tmp_path / "frame.pt"
    file.write_text("")
    code = ftr.main(_plain_argv(inputs, file / "ft") + OPTIONS)
    _one_line_error(capsys, code, f"--out {file / 'ft'}", "is a file")
    out = tmp_path / "c2f"
    c2f = _c2f_argv(inputs, out) + OPTIONS
    cases = {
        "a Frame run as the Clip teacher": (
            [*c2f[:2], "--c2f_clip", inputs["frame"], *c2f[4:]],
            ["--c2f_clip", "without a CLS token"],
        ),
        "the student's step": (c2f + ["--step", "7"], [f"--workdir {inputs['frame']}:", "step 7"]),
        "the student's feature set": (
            ["--workdir", inputs["other_features"], *c2f[2:]],
            ["feature set 'atst_logmel64'", "--features kaldi_fbank128"],
        ),
        "the Clip run's feature set": (
            [*c2f[:2], "--c2f_clip", inputs["other_features"], *c2f[4:]],
            [f"--c2f_clip {inputs['other_features']}:", "--features kaldi_fbank128"],
        ),
    }
    for what, (argv, needles) in cases.items():
        _one_line_error(capsys, ftr.main(argv), *needles)
        assert not out.exists(), what
    # A teacher fine-tuned on another task (other classes).
    bad = tmp_path / "bad_teacher" / "model"
    bad.mkdir(parents=True)
    doc = json.loads((reference / "clip" / "model" / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**doc, "classes": ["a", "b"]}))
    (bad / "params.msgpack").write_bytes((reference / "clip" / "model" / "params.msgpack").read_bytes())
    argv = ["--workdir", inputs["frame"], *inputs["data"], "--out", str(out), "--teacher", str(bad.parent)]
    _one_line_error(capsys, ftr.main(argv + OPTIONS), "--teacher was fine-tuned on another task")
    assert not out.exists()
