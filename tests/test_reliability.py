"""Reliability II (issue 14): a workdir belongs to one run, Ctrl-C saves, no output is overwritten, ``checkpoint
list`` validates like restore, prepare cleans up after and shares work with other runs.

Every test here failed on the code before the fix (the defect it covers is named in its docstring). The runs
share one tiny 3-step workdir (``tiny_run`` in conftest.py) and copy it before changing anything.
"""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli_env, tiny_config, train_cmd

from atst_jax import checkpoint as ckpt_lib
from atst_jax import sharding as shd
from atst_jax.checkpoint import Checkpointer, IncompatibleCheckpointError, read_checkpoint
from atst_jax.data import pipeline, prepare
from atst_jax.distributed import StopSignal
from atst_jax.eval import embed
from atst_jax.sharding import ConfigError
from atst_jax.train import Trainer, load_config, train
from atst_jax.trainer import make_data_iterator


def _copy(run, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


def _steps_logged(workdir):
    return [json.loads(line)["step"] for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _listing(workdir):
    return sorted(str(p.relative_to(workdir)) for p in Path(workdir).rglob("*"))


# ----------------------------------------------------------------------------------------------------------
# Defect 1: a workdir belongs to one run
# ----------------------------------------------------------------------------------------------------------
def _clip_config(cache):
    """ATST-Clip on the same model and train settings as ``tiny_config`` (another method, same sizes)."""
    config = load_config(str(ROOT / "configs" / "atst_clip.py") + ":tiny")
    reference = tiny_config(cache)
    config.model.depth = reference.model.depth
    config.atst_clip.anchor_seconds = config.atst_clip.positive_seconds = 1.0
    config.optim.warmup_steps = 1
    config.data.cache_dir, config.data.num_clips = cache, 64
    config.train.update(reference.train.to_dict())
    return config


def _width(c):
    c.model.width = 256


def _depth(c):
    c.model.depth = 2


def _crop(c):
    c.atst_frame.crop_seconds = 1.5


@pytest.mark.parametrize(
    "change, named",
    [
        (_width, "model.width: 128 -> 256"),
        (_depth, "model.depth: 1 -> 2"),
        ("atst_clip", "method: 'atst_frame' -> 'atst_clip'"),
        (_crop, "atst_frame.crop_seconds: 1.0 -> 1.5"),
    ],
    ids=["width", "depth", "method", "crop"],
)
def test_resuming_another_run_is_refused_naming_the_fields(change, named, tiny_run, embedded_cache):
    """Defect 1 (before: the step was "unreadable", training restarted from step 1 in the same workdir and a
    later save of an existing step was skipped). Now: one line naming the field, and nothing touched."""
    before = _listing(tiny_run)
    metrics = (tiny_run / "metrics.jsonl").read_text()
    if change == "atst_clip":
        config = _clip_config(embedded_cache)
    else:
        config = tiny_config(embedded_cache, steps=6)
        change(config)
    with pytest.raises(IncompatibleCheckpointError) as err:
        train(config, str(tiny_run))
    message = str(err.value)
    assert "\n" not in message and named in message, message
    assert "holds another run" in message and "--config.train.fresh=true" in message
    assert _listing(tiny_run) == before and (tiny_run / "metrics.jsonl").read_text() == metrics


def test_resume_on_another_mesh_replaces_a_damaged_step_and_logs_each_step_once(
    tiny_run, embedded_cache, tmp_path, capsys
):
    """The same run on another mesh, with more steps and another log interval, resumes (not a change of run).
    Defect 1: a damaged step 4 on disk is skipped, moved aside and step 4 is written afresh (before: the
    save was silently skipped, the damaged step stayed). Defect 2: lines a killed run logged after its last
    checkpoint (steps 4, 5 and a torn line) are dropped, so each step appears once (before: twice)."""
    work = _copy(tiny_run, tmp_path)
    shutil.copytree(work / "checkpoints" / "3", work / "checkpoints" / "4")
    (work / "checkpoints" / "4" / "data" / "process_0-of-1.json").write_text("")
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    config = tiny_config(embedded_cache, steps=4, log_every=2)
    config.mesh.update(data=2, fsdp=4)
    result = train(config, str(work))
    out, err = capsys.readouterr()
    assert f"resumed from {work / 'checkpoints' / '3'}" in out and result["step"] == 4
    assert "checkpoint step 4 is unreadable (data/process_0-of-1.json: empty file)" in err
    step, _, state = read_checkpoint(work, 4)
    assert int(state["step"]) == 4  # the new step 4, not the damaged copy of step 3
    assert dict(ckpt_lib.list_steps(work))["4"] == "good"
    assert [p.name.split("-")[:2] for p in (work / "set_aside").iterdir()] == [["4", "unreadable"]]
    assert _steps_logged(work) == [1, 2, 3, 4]


class _HardKill(BaseException):
    """Stands for SIGKILL: nothing of the trainer runs after it but its ``finally`` (which writes no line)."""


def test_a_run_killed_right_after_a_checkpoint_keeps_that_steps_line(embedded_cache, tmp_path, monkeypatch):
    """Defect 7: the line of a checkpointed step was written one step later (metrics are fetched a step
    late); a run killed between the save and that line resumed after the step, and its line was never
    written. Now the line goes out before the save, and the resumed run logs every step once."""
    save = Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if step == 3:
            self.close()  # the save commits, then the process is gone
            raise _HardKill
        return saved

    work = tmp_path / "run"
    config = tiny_config(embedded_cache, steps=6, log_every=3)
    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save", save_then_die)
        with pytest.raises(_HardKill):
            train(config, str(work))
    assert _steps_logged(work) == [1, 3] and ckpt_lib.list_steps(work) == [("3", "good")]
    train(config, str(work))
    assert _steps_logged(work) == [1, 3, 4, 6]


def test_fresh_start_moves_the_old_run_aside_and_a_rerun_resumes(tiny_run, embedded_cache, tmp_path, capsys):
    """Defect 1: ``train.fresh`` starts over in a workdir that holds another run, keeping the old one in
    set_aside/; the same command again finds its own checkpoint (requeue-safe) instead of starting over."""
    work = _copy(tiny_run, tmp_path)
    config = tiny_config(embedded_cache, steps=1, fresh=True)
    config.atst_frame.crop_seconds = 1.5
    assert train(config, str(work))["step"] == 1
    (old,) = (work / "set_aside").iterdir()
    assert old.name.startswith("run-") and (old / "checkpoints" / "3").is_dir()
    assert _steps_logged(old) == [1, 2, 3] and _steps_logged(work) == [1]
    assert [s for s, _ in ckpt_lib.list_steps(work)] == ["1", f"set_aside/{old.name}"]
    capsys.readouterr()
    train(config, str(work))
    assert "nothing to do: the checkpoint at step 1" in capsys.readouterr().out
    assert len(list((work / "set_aside").iterdir())) == 1


def test_a_save_at_a_taken_step_number_moves_what_is_there_aside(tiny_run, embedded_cache, tmp_path):
    """Defect 1: ``Checkpointer.save`` used to return without saving when the step existed."""
    config = tiny_config(embedded_cache)
    trainer = Trainer(config, shd.make_mesh(config.mesh))
    work = _copy(tiny_run, tmp_path)
    ck = Checkpointer(work, save_every=1, keep=3)
    _, state = ck.restore_latest(trainer.abstract_state, trainer.state_shardings)
    shutil.copytree(work / "checkpoints" / "3", work / "checkpoints" / "5")  # another writer's step 5
    state = dict(state, step=state["step"] + 2)
    assert ck.save(5, state, force=True)
    ck.close()
    assert int(read_checkpoint(work, 5)[2]["step"]) == 5
    assert [p.name.split("-")[:2] for p in (work / "set_aside").iterdir()] == [["5", "replaced"]]


def test_a_refused_config_leaves_no_workdir_behind(embedded_cache, tmp_path):
    """Defect 6: the workdir used to be created before the config checks."""
    work = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match=r"train.global_batch=0: must be in \[1, inf\)"):
        train(tiny_config(embedded_cache, global_batch=0), str(work))
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------------------
# Defect 2: Ctrl-C saves
# ----------------------------------------------------------------------------------------------------------
def test_ctrl_c_finishes_the_step_saves_and_the_rerun_resumes_it(embedded_cache, tmp_path):
    """Defect 2 (before: a KeyboardInterrupt traceback, exit 130, nothing saved, and the rerun logged steps
    twice). SIGINT now behaves like SIGTERM: exit 0 with the step saved; the rerun resumes it and
    metrics.jsonl holds each step once."""
    work = tmp_path / "run"
    args = [
        "--workdir", str(work), f"--config.data.cache_dir={embedded_cache}", "--config.data.num_clips=64",
        "--config.model.depth=1", "--config.atst_frame.crop_seconds=1.0", "--config.train.global_batch=4",
        "--config.optim.warmup_steps=1", "--config.train.log_every=1", "--config.train.ckpt_every=1000",
    ]  # fmt: skip
    proc = subprocess.Popen(
        train_cmd(*args, "--config.train.steps=500"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(1),
        cwd=ROOT,
    )
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
            break
        assert time.time() < deadline, "no progress line"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "interrupted: finishing the current step" in err
    (line,) = [x for x in out.splitlines() if x.startswith("stop requested: saved step")]
    saved = int(line.split("saved step ")[1].split()[0])
    assert 3 <= saved < 500 and [s for s, _ in ckpt_lib.list_steps(work)] == [str(saved)]
    assert _steps_logged(work) == list(range(1, saved + 1))

    rerun = subprocess.run(
        train_cmd(*args, f"--config.train.steps={saved + 2}"),
        capture_output=True,
        text=True,
        env=cli_env(1),
        cwd=ROOT,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {work / 'checkpoints' / str(saved)}" in rerun.stdout
    assert _steps_logged(work) == list(range(1, saved + 3))


def test_a_second_ctrl_c_aborts_at_once():
    """Defect 2: the first SIGINT only asks for a stop at the next step boundary; the second raises."""

    def deliver(sig):
        os.kill(os.getpid(), sig)
        for _ in range(100):  # the handler runs in the main thread at the next bytecode boundary
            time.sleep(0.001)

    with StopSignal() as stop:
        deliver(signal.SIGINT)
        assert stop.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------------------------------------
# Defect 3: one output per input
# ----------------------------------------------------------------------------------------------------------
def _write_audio(path, seconds=0.5, sr=16000, seed=0):
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    wave = np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * sr)).astype(np.float32)
    sf.write(str(path), wave, sr)


def test_embed_refuses_colliding_outputs_or_keeps_the_extension(tiny_run, tmp_path, capsys):
    """Defect 3: ``x.wav`` and ``x.flac`` both wrote ``x.npy`` (exit 0). Now refused before anything is written,
    or kept apart with --keep_extension; prepare gives them distinct record ids."""
    audio_dir = tmp_path / "audio"
    _write_audio(audio_dir / "x.wav", seed=1)
    _write_audio(audio_dir / "x.flac", seed=2)
    out = tmp_path / "emb"
    base = ["--workdir", str(tiny_run), "--audio", str(audio_dir), "--out", str(out), "--level", "clip"]
    assert embed.main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would both write" in err and "--keep_extension" in err
    assert not out.exists() or not list(out.iterdir())
    assert embed.main([*base, "--keep_extension"]) == 0
    a, b = np.load(out / "x.wav.npy"), np.load(out / "x.flac.npy")
    assert a.shape == b.shape and not np.array_equal(a, b)
    plan = prepare.plan_folder(str(audio_dir))
    assert sorted(it.id for it in plan.items) == ["x.flac", "x.wav"]


# ----------------------------------------------------------------------------------------------------------
# Defect 4: checkpoint list validates like restore
# ----------------------------------------------------------------------------------------------------------
def test_checkpoint_list_calls_damaged_what_the_trainer_refuses(tiny_run, embedded_cache, tmp_path, capfd):
    """Defect 4: a truncated Grain position made the trainer skip the step while ``list`` said ``good``."""
    work = _copy(tiny_run, tmp_path)
    (work / "checkpoints" / "3" / "data" / "process_0-of-1.json").write_text("")
    capfd.readouterr()
    assert ckpt_lib.main(["list", "--workdir", str(work)]) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == ["3\tdamaged (data/process_0-of-1.json: empty file)"]
    assert err == "", err  # no absl chatter, no stray "Event loop is closed" tracebacks

    config = tiny_config(embedded_cache)
    trainer = Trainer(config, shd.make_mesh(config.mesh))
    files = pipeline.ensure_embedded_dataset(embedded_cache, num_clips=64, seed=0)
    data_iter = make_data_iterator(config, trainer.method, files, "atst_logmel64")
    ck = Checkpointer(work, save_every=1, keep=3)
    assert ck.restore_latest(trainer.abstract_state, trainer.state_shardings, data_iter) == (None, None)
    ck.close()
    data_iter.close()
    assert "checkpoint step 3 is unreadable (data/process_0-of-1.json: empty file)" in capfd.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Defect 6: prepare
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def two_files(tmp_path):
    audio_dir = tmp_path / "audio"
    for i, name in enumerate(("a.wav", "b.wav")):
        _write_audio(audio_dir / name, seconds=0.3, seed=i)
    return audio_dir


def _prepare(audio_dir, out):
    plan = prepare.plan_folder(str(audio_dir))
    return prepare.build(plan, str(out), workers=0, files_per_shard=1, progress=False)


def test_prepare_removes_a_killed_runs_temporary_shard(two_files, tmp_path):
    """Defect 6: a ``.tmp-PID`` shard of a killed run stayed forever."""
    out = tmp_path / "out"
    first = _prepare(two_files, out)
    shard = Path(first["shards"][0]).name
    orphans = [out / f".{shard}.tmp-999999", out / "_progress" / f".{shard}.json.tmp-999999"]
    for p in orphans:
        p.write_bytes(b"partial")
    again = _prepare(two_files, out)
    assert again["complete"] and again["reused"] == [0, 1]
    assert not any(p.exists() for p in orphans)


def test_two_prepares_into_one_out_do_not_both_build_a_shard(two_files, tmp_path):
    """Defect 6: a second prepare into the same --out redid every shard. A shard whose lock another process
    holds is left to it; the run that finishes last writes the metadata."""
    out = tmp_path / "out"
    (out / "_progress").mkdir(parents=True)
    shard0 = prepare.records.shard_name("folder", "train", 0, 2)
    with open(out / "_progress" / f"{shard0}.lock", "w") as held:  # "another prepare" is building shard 0
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        partial = _prepare(two_files, out)
    assert partial["built"] == [1] and partial["busy"] == [0] and not partial["complete"]
    assert not (out / shard0).exists() and not (out / "dataset_info.json").exists()
    rest = _prepare(two_files, out)
    assert rest["built"] == [0] and rest["reused"] == [1] and rest["complete"]


def test_a_malformed_dcase_tsv_reports_every_bad_row_at_once(tmp_path, capsys):
    """Defect 6: only the first bad row was reported."""
    tsv = tmp_path / "strong.tsv"
    tsv.write_text(
        "filename\tonset\toffset\tevent_label\n"
        "a.wav\t0.1\t0.5\tDog\n"
        "b.wav\t0.1\tDog\n"
        "c.wav\t0.1\t0.5\tCat\n"
        "d.wav\tx\t0.5\tCat\n"
        "e.wav\t0.9\t0.5\tCat\n"
    )
    (tmp_path / "audio").mkdir()
    argv = ["dcase", "--tsv", str(tsv), "--audio_dir", str(tmp_path / "audio"), "--out", str(tmp_path / "o")]
    assert prepare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 malformed row(s)" in err
    assert all(f"{tsv}:{n}:" in err for n in (3, 5, 6)) and f"{tsv}:4:" not in err


def test_an_audioset_label_missing_from_the_class_list_skips_that_clip_only(tmp_path, capsys):
    """Defect 6: one unknown label stopped the whole run; now that clip is skipped and reported (or, with
    --unknown_labels error, every such row is listed in one error)."""
    audio_dir = tmp_path / "audio"
    _write_audio(audio_dir / "aaaaaaaaaaa.wav", seconds=0.3, seed=1)
    _write_audio(audio_dir / "bbbbbbbbbbb.wav", seconds=0.3, seed=2)
    labels = tmp_path / "class_labels_indices.csv"
    labels.write_text('index,mid,display_name\n0,/m/dog,"Dog"\n1,/m/cat,"Cat"\n')
    segments = tmp_path / "segments.csv"
    segments.write_text(
        '# YTID, start_seconds, end_seconds, positive_labels\naaaaaaaaaaa, 0.0, 10.0, "/m/dog"\n'
        'bbbbbbbbbbb, 0.0, 10.0, "/m/cat,/m/nope"\n'
    )
    base = ["audioset", "--csv", str(segments), "--labels", str(labels), "--audio_dir", str(audio_dir)]
    out = tmp_path / "out"
    assert prepare.main([*base, "--out", str(out), "--workers", "0", "--no_progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 1
    assert [s["file"] for s in report["skipped"]] == ["bbbbbbbbbbb"] and "/m/nope" in report["skipped"][0][
        "reason"
    ]
    capsys.readouterr()
    assert prepare.main([*base, "--out", str(tmp_path / "o2"), "--unknown_labels", "error"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{segments}:3:" in err and "/m/nope" in err
