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
  ``WORKDIR/probe/RESULTS.json`` + its PNGs written (``atst_jax.eval.probe``'s formats).

The probe reads the teacher's parameters off the train state and never changes it, the data iterator or
any random stream, so a run with probes is bit-identical to one without. It runs on one process (multi-host
runs skip it with a warning: evaluate the checkpoints afterwards with ``python -m atst_jax.evaluate``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax

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


class PretrainProbe:
    """Built by the trainer when ``probe.train`` is set; ``maybe_run(state, step, writer, last=...)``."""

    def __init__(self, config, workdir, run_config: dict, features: str, log=print):
        from atst_jax.eval.data import EvalError

        p = config.probe
        self.every, self.final = int(p.every), bool(p.final)
        self.workdir = Path(str(workdir))
        self.run_config = run_config
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
        from atst_jax.eval.probe import evaluate
        from atst_jax.eval.report import fmt, table, write_results

        t0 = time.perf_counter()
        enc, chunk = self._encoder(state)
        full = last and self.final
        quiet = lambda *a, **k: None  # noqa: E731
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
        )
        metrics = results["encoders"]["checkpoint"]["metrics"]
        seconds = time.perf_counter() - t0
        scalars = {f"probe/{k}": float(v) for k, v in metrics.items() if v is not None}
        if writer is not None and getattr(writer, "tb", None) is not None:
            for k, v in scalars.items():
                writer.tb.add_scalar(k, v, step)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "final": full, **scalars, "seconds": round(seconds, 2)}) + "\n")
        shown = ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())
        if full:
            out = self.workdir / "probe" / "RESULTS.json"
            write_results(out, results)
            self.log(
                f"probe at step {step} on the held-out {results['task']} split "
                f"({len(self.train)} train / {len(self.test)} test clips, {seconds:.0f} s):\n{table(results)}\n"
                f"wrote {out}" + "".join(f", {p}" for p in results.get("plots", []))
            )
        else:
            self.log(f"probe at step {step}: {shown} ({seconds:.1f} s)")
        return results
