"""The frozen-encoder probe during and after pretraining (config section ``probe``), so a run shows what its
representation is worth, not only its SSL loss.

``probe.train`` / ``probe.test``: prepared labelled datasets (``atst_jax.eval.probe``'s inputs), or
``probe.train=embedded`` for the **held-out embedded probe split**: clips drawn by the embedded generator
with another seed (``PROBE_SEED``; pretraining never sees them), ``PROBE_TRAIN`` clips to train the probe on
(20 % of them held out for its model selection) and ``PROBE_TEST`` to test on, strong labels, in the run's
feature set; built once next to the embedded dataset's cache.

* ``probe.every = N`` (0 = never): every N steps the teacher's encoder gets a quick probe (``probe.quick_lrs``,
  ``probe.quick_epochs``, no baselines); its metrics go to TensorBoard under ``probe/…`` and to
  ``WORKDIR/probe.jsonl`` (one line per probe, with the step).
* ``probe.final = True``: after the last step, the full probe (``probe.lrs``, ``probe.epochs``) with the
  baselines (``probe.baselines``: random init and log-mel statistics), the table printed, and
  ``WORKDIR/probe/RESULTS.json`` + its PNGs written (``atst_jax.eval.probe``'s formats; the JSON as each
  encoder's results are earned, ``"complete": true`` once done). It is part of the run: a run whose final
  probe is missing (a second Ctrl-C, SIGTERM, a crash) gets it from a rerun of the same command
  (:func:`run_missing_final`), and Ctrl-C during it says what goes on (:func:`final_probe_signals`).

The probe reads the teacher's parameters off the train state and never changes it, the data iterator or
any random stream, so a run with probes is bit-identical to one without. It runs on one process (multi-host
runs skip it with a warning: evaluate the checkpoints afterwards with ``python -m atst_jax.evaluate``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import jax

from atst_jax import features as feature_sets

PROBE_SEED = 1
PROBE_TRAIN = 192
PROBE_TEST = 64
_MARKER = "probe_split.json"


def ensure_embedded_probe_split(cache_dir: str, features: str) -> tuple[str, str]:
    """``(train_dir, test_dir)``: the held-out embedded probe split, built once (a lock serialises builders;
    a marker written last makes an interrupted build redo itself)."""
    import fcntl

    from atst_jax.data import pipeline, prepare, synthetic

    root = Path(cache_dir) / f"probe_seed{PROBE_SEED}"
    train_dir, test_dir = root / f"train_{features}", root / f"test_{features}"
    marker = root / f"{features}_{_MARKER}"
    expected = {
        "seed": PROBE_SEED,
        "train": PROBE_TRAIN,
        "test": PROBE_TEST,
        "features": features,
        # The generator's version (the embedded dataset's): a new one changes the sounds, not the file names
        # or labels, so the split is rebuilt and its old shards are not reused (clear_stale_records).
        "version": pipeline.EMBEDDED_VERSION,
    }

    def finished() -> bool:
        try:
            return json.loads(marker.read_text()) == expected
        except (OSError, ValueError):
            return False

    if finished():
        return str(train_dir), str(test_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if finished():
            return str(train_dir), str(test_dir)
        for out in (train_dir, test_dir):
            pipeline.clear_stale_records(str(out), pipeline.EMBEDDED_VERSION)
        tsv = synthetic.write_dataset(root, PROBE_TRAIN + PROBE_TEST, seed=PROBE_SEED)
        rows = list(synthetic.read_strong_tsv(tsv).items())
        for rows_part, out in ((rows[:PROBE_TRAIN], train_dir), (rows[PROBE_TRAIN:], test_dir)):
            part_tsv = root / f"{out.name}.tsv"
            lines = ["filename\tonset\toffset\tevent_label"]
            lines += [f"{name}\t{a:.3f}\t{b:.3f}\t{c}" for name, evs in rows_part for a, b, c in evs]
            part_tsv.write_text("\n".join(lines) + "\n")
            plan = prepare.plan_dcase(str(part_tsv), str(root / "audio"), classes=list(synthetic.CLASSES))
            prepare.build(
                plan, str(out), options=prepare.Options(features=features), workers=0, progress=False
            )
        tmp = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(expected))
        os.replace(tmp, marker)
    return str(train_dir), str(test_dir)


class FinalProbeInterrupted(KeyboardInterrupt):
    """A second Ctrl-C during the final probe: the last step is saved, its probe is not."""

    def __init__(self, step: int):
        super().__init__(
            f"interrupted during the final probe: step {step} is saved, its probe is not; rerun the same "
            "command to produce it"
        )


@contextlib.contextmanager
def final_probe_signals(step: int):
    """While the final probe runs, Ctrl-C tells the truth: the trainer's own handler would announce an exit
    while the probe runs on for minutes. The first Ctrl-C says the probe is being finished; a second raises
    :class:`FinalProbeInterrupted` (the rerun then produces the probe). SIGTERM stays the trainer's."""
    import signal

    count = 0

    def handler(signum, frame):
        nonlocal count
        count += 1
        if count > 1:
            raise FinalProbeInterrupted(step)
        print(
            f"interrupted: step {step} is saved; finishing the final probe (Ctrl-C again to stop it: rerunning "
            "the same command then produces it)",
            file=sys.stderr,
            flush=True,
        )

    try:
        previous, installed = signal.signal(signal.SIGINT, handler), True
    except ValueError:  # not the main thread: no handler can be set, Ctrl-C stays as it was
        previous, installed = None, False
    try:
        yield
    finally:
        if installed:  # ``previous`` is None for a handler not set from Python: SIG_DFL then
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def final_probe_done(workdir, step: int) -> bool:
    """Whether ``WORKDIR`` holds the whole final probe of ``step``: a complete ``probe/RESULTS.json`` of that
    step (files written before ``"complete"`` existed were only ever written whole) and its line in
    ``probe.jsonl``, which is written after it."""
    workdir = Path(str(workdir))
    try:
        res = json.loads((workdir / "probe" / "RESULTS.json").read_text())
        lines = (workdir / "probe.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return False
    if not (res.get("complete", True) and res.get("source", {}).get("step") == step):
        return False
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line torn by a kill
            continue
        if entry.get("step") == step and entry.get("final"):
            return True
    return False


def run_missing_final(config, workdir, run_config: dict, features: str, state, step: int, log=print) -> bool:
    """The final probe of a finished run (``step`` = ``train.steps``) when it is missing, on the restored
    ``state``; True when it ran. A line of an unfinished final probe in ``probe.jsonl`` is dropped first."""
    from atst_jax.distributed import is_main
    from atst_jax.metrics import MetricsWriter, truncate_jsonl

    p = config.get("probe")
    if not (p and p.train and p.final) or final_probe_done(workdir, step):
        return False
    probe = PretrainProbe(config, workdir, run_config, features, log=log)
    if not probe.enabled:
        return False
    log(f"the checkpoint at step {step} is the last one, but its final probe is missing: running it")
    if is_main() and probe.jsonl.exists():
        truncate_jsonl(probe.jsonl, step - 1)
    writer = MetricsWriter(Path(str(workdir)), resume_step=step)
    try:
        probe.maybe_run(state, step, writer, last=True)
    finally:
        writer.close()
    return True


class PretrainProbe:
    """Built by the trainer when ``probe.train`` is set; ``maybe_run(state, step, writer, last=...)``."""

    def __init__(self, config, workdir, run_config: dict, features: str, log=print):
        from atst_jax.eval.data import EvalError

        p = config.probe
        self.every, self.final = int(p.every), bool(p.final)
        self.workdir = Path(str(workdir))
        self.run_config = run_config
        # ``features``: the training data's set; the probe embeds what inference computes for such an encoder.
        features = feature_sets.get(features).inference_name
        self.features = features
        self.log = log
        self.enabled = jax.process_count() == 1
        if not self.enabled:
            log(
                "warning: probe: multi-process run; skipped (evaluate its checkpoints with atst_jax.evaluate)"
            )
            return
        try:
            self._load(config, p, features)
        except EvalError as e:  # bad probe data: one line, as every config error
            from atst_jax.sharding import ConfigError

            raise ConfigError(f"probe: {e}") from None
        self.jsonl = self.workdir / "probe.jsonl"

    def _load(self, config, p, features):
        from atst_jax.eval.data import EvalError, check_sets, read_labelled
        from atst_jax.eval.probe import Options

        if p.train == "embedded":
            if p.test:  # the split brings its own test half: a second test set would be silently unused
                raise EvalError(f"probe.train=embedded brings its own test split: drop probe.test={p.test!r}")
            cache = config.data.cache_dir or os.path.join(
                os.path.expanduser("~"), ".cache", "atst_jax", "embedded"
            )
            train_dir, test_dir = ensure_embedded_probe_split(cache, features)
        else:
            train_dir, test_dir = p.train, p.test
            if not p.test:
                raise EvalError("probe.train names a dataset: give probe.test too")
        self.train = read_labelled(train_dir, "probe.train")
        self.test = read_labelled(test_dir, "probe.test")
        layers = int(p.layers) or None
        common = dict(task=p.task, layers=layers, seed=int(p.seed), progress=False)
        self.quick = Options(lrs=tuple(p.quick_lrs), epochs=int(p.quick_epochs), **common)
        self.full = Options(lrs=tuple(p.lrs), epochs=int(p.epochs), **common)
        self.baselines = tuple(p.baselines)
        check_sets({"--train": self.train, "--test": self.test}, features, int(config.model.n_mels))

    def _encoder(self, state):
        from atst_jax import inference
        from atst_jax.checkpoint import to_pure

        params = jax.device_get(to_pure(state["teacher"])["encoder"])
        cfg = inference.run_encoder_config(self.run_config, params)
        enc = inference.encoder_from_params(params, cfg)
        return enc, inference.encoder_chunk_frames(enc.cfg, self.run_config)

    def due(self, step: int, last: bool) -> bool:
        return self.enabled and ((self.every > 0 and step % self.every == 0) or (last and self.final))

    def maybe_run(self, state, step: int, writer, last: bool = False) -> dict | None:
        if not self.due(step, last):
            return None
        full = last and self.final
        with final_probe_signals(step) if full else contextlib.nullcontext():
            return self._run(state, step, writer, full)

    def _run(self, state, step: int, writer, full: bool) -> dict:
        from atst_jax.eval.probe import evaluate
        from atst_jax.eval.report import error_lines, fmt, table

        t0 = time.perf_counter()
        enc, chunk = self._encoder(state)
        quiet = lambda *a, **k: None  # noqa: E731
        out = self.workdir / "probe" / "RESULTS.json"
        if full:
            out.parent.mkdir(parents=True, exist_ok=True)
        results = evaluate(
            enc,
            chunk,
            self.features,
            self.train,
            self.test,
            None,
            self.full if full else self.quick,
            self.baselines if full else (),
            {"workdir": str(self.workdir), "step": step, "encoder": "teacher"},
            log=quiet,
            plots=(self.workdir / "probe" / "RESULTS") if full else None,
            out=out if full else None,  # written as earned, before the pictures
        )
        metrics = results["encoders"]["checkpoint"]["metrics"]
        seconds = time.perf_counter() - t0
        scalars = {f"probe/{k}": float(v) for k, v in metrics.items() if v is not None}
        if writer is not None and getattr(writer, "tb", None) is not None:
            for k, v in scalars.items():
                writer.tb.add_scalar(k, v, step)
        # After RESULTS.json: this line marks the final probe done (final_probe_done).
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "final": full, **scalars, "seconds": round(seconds, 2)}) + "\n")
        for line in error_lines(results):
            self.log(f"probe at step {step}: {line}")
        shown = ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())
        if full:
            self.log(
                f"probe at step {step} on the held-out {results['task']} split "
                f"({len(self.train)} train / {len(self.test)} test clips, {seconds:.0f} s):\n{table(results)}\n"
                f"wrote {out}" + "".join(f", {p}" for p in results.get("plots", []))
            )
        else:
            self.log(f"probe at step {step}: {shown} ({seconds:.1f} s)")
        return results
