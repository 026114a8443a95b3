"""What a run reports while it trains: the progress line, ``metrics.jsonl`` and TensorBoard.

- ``log``: status lines, printed by process 0 only.
- ``MetricsWriter``: scalars and pictures, process 0 only; resumes without duplicate steps; object-store
  workdirs supported.
- ``Progress``: every ``log_every`` steps the line (loss, the method's monitors, LR, clips/s, ETA), the
  ``perf/*`` scalars (clips/s, step time, data wait, TFLOP/s, MFU) and the encoder-health warnings.
- ``ComputeMeter``: what the whole run has cost (device-hours, training FLOPs, mean MFU) over all its starts:
  the ``compute/*`` scalars and the ``compute`` entry of each checkpoint's metadata.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from atst_jax import distributed


def fetch(tree):
    """Host copies of replicated scalars. ``jax.device_get`` refuses arrays that span other processes'
    devices; a replicated value is whole on any local device, so read this process's first shard."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), tree)


def log(message: str) -> None:
    """Progress and status lines: printed by process 0 only (every process runs the same loop)."""
    if distributed.is_main():
        print(message, flush=True)


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """``metrics.jsonl`` and TensorBoard scalars, written by process 0 only.

    Object stores (a ``gs://`` workdir) cannot append, so for a remote workdir the JSONL lines go to a local
    copy (started from the remote file when resuming) that ``sync`` uploads whole at every checkpoint and at
    the end. TensorBoard writes ``gs://`` itself (with ``google-cloud-storage`` installed).

    ``resume_step``: the step the run (re)starts from. Lines of later steps (logged after the last checkpoint
    by a run that was then killed) are dropped and TensorBoard purges its later events, so after any restart
    each step appears once.
    """

    def __init__(self, workdir, resume_step: int | None = None):
        self.enabled = distributed.is_main()
        self.jsonl = None
        self._annotations: dict = {}  # fields of the next row (annotate_next_row)
        self.tb = None
        self.remote = workdir / "metrics.jsonl" if "://" in str(workdir) else None
        if self.enabled:
            local = workdir / "metrics.jsonl"
            if self.remote is not None:
                import hashlib
                import tempfile

                tag = hashlib.sha1(str(workdir).encode()).hexdigest()[:16]
                local = Path(tempfile.gettempdir()) / "atst_jax_metrics" / tag / "metrics.jsonl"
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(self.remote.read_text() if self.remote.exists() else "")
            self.local = local
            if resume_step is not None and local.exists():
                truncate_jsonl(local, resume_step)
            self.jsonl = open(local, "a")  # noqa: SIM115 - closed in close()
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)
            except ImportError:  # optional: jsonl alone is enough
                self.tb = None

    def annotate_next_row(self, **fields) -> None:
        """Adds ``fields`` (not scalars: JSON values such as the run's data fingerprint) to the next
        ``metrics.jsonl`` row, which this run start writes first; TensorBoard never sees them. A field of a
        row, not a line of its own: readers expect every line to be a step's row."""
        self._annotations.update(fields)

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        extra, self._annotations = self._annotations, {}
        self.jsonl.write(json.dumps({"step": step, **scalars, **extra}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def image(self, tag: str, panels, step: int):
        """A TensorBoard image of spectrogram panels ``[(title, spec, overlay)]`` (``eval.report.spectrogram_image``)."""
        if self.enabled and self.tb is not None:
            from atst_jax.eval import report

            self.tb.add_image(tag, report.spectrogram_image(panels), step, dataformats="HWC")
            self.tb.add_text(f"{tag}/panels", " | ".join(title for title, _, _ in panels), step)

    def sync(self):
        """Uploads the JSONL for a remote workdir (no-op for a local one)."""
        if self.enabled and self.remote is not None:
            self.jsonl.flush()
            self.remote.write_text(self.local.read_text())

    def close(self):
        if self.jsonl:
            self.sync()
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the lines of steps <= ``last_step`` (and drops a torn last line), rewriting the file atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)


class Progress:
    """The progress line and scalars: every ``log_every`` steps, the first step, and the last."""

    def __init__(
        self,
        total: int,
        global_batch: int,
        start_step: int,
        flops_per_device: float = 0.0,
        peak_tflops: float = 0.0,
        monitors: tuple[str, ...] = (),
        health_min: dict[str, float] | None = None,
        health_patience: int = 200,
        compute: ComputeMeter | None = None,
    ):
        self.total, self.global_batch, self.start_step = total, global_batch, start_step
        self.compute = compute  # the run's cumulative totals, on every row (``ComputeMeter.scalars``)
        self.monitors = monitors  # the method's collapse monitors, shown on the progress line
        # Encoder health (models/collapse.py): a monitor under its floor at every logged step for at least
        # ``health_patience`` steps puts a warning on the progress line (and ``health/warning`` = 1 in the
        # scalars); a single dip does not. Floors ≤ 0 are off.
        self.health_min = {k: float(v) for k, v in (health_min or {}).items() if float(v) > 0}
        self.health_patience = int(health_patience)
        self.below_since: dict[str, int] = {}  # monitor → first logged step of its run under the floor
        self.warned: set[str] = set()
        self.flops_per_device = flops_per_device  # analytic, per step
        self.peak_tflops = peak_tflops  # of the chip (flops.CHIPS); 0 = unknown (CPU): no MFU
        self.t0 = time.perf_counter()
        self.last_time, self.last_step = None, start_step  # the first window holds compilation: no rate
        # Host time spent waiting for the next batch (input pipeline + host→device transfer), summed over the
        # current logging window. The step itself is dispatched asynchronously, so this is data stall only
        # when the device is already idle; a large share means the input pipeline is the bottleneck.
        self.data_wait = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def pause(self, fn):
        """Runs ``fn()`` (e.g. a probe) off the clock: the step-time window does not count it."""
        started = time.perf_counter()
        try:
            return fn()
        finally:
            if self.last_time is not None:
                self.last_time += time.perf_counter() - started

    def maybe_log(self, step, metrics, writer, log_every, force=False):
        if not (force or step % log_every == 0 or step == self.start_step + 1):
            return None
        scalars = {k: float(v) for k, v in fetch(metrics).items()}  # the guard is check_finite
        now = time.perf_counter()
        rate = float("nan")
        if self.last_time is not None and step > self.last_step:
            rate = (step - self.last_step) * self.global_batch / (now - self.last_time)
            step_time = (now - self.last_time) / (step - self.last_step)
            scalars["perf/clips_per_s"] = rate
            scalars["perf/step_time_s"] = step_time
            scalars["perf/data_wait_s"] = self.data_wait / (step - self.last_step)
            scalars["perf/data_wait_frac"] = self.data_wait / (now - self.last_time)
            if self.flops_per_device:
                tflops = self.flops_per_device / step_time / 1e12
                scalars["perf/tflops_per_device"] = tflops
                if self.peak_tflops:
                    scalars["perf/mfu"] = tflops / self.peak_tflops
        self.last_time, self.last_step = now, step
        self.data_wait = 0.0
        alarms = self.health_alarms(step, scalars)
        if self.health_min:
            scalars["health/warning"] = float(bool(alarms))
        if self.compute is not None:
            scalars.update(self.compute.scalars(step))
        writer.write(step, scalars)
        eta = (self.total - step) * self.global_batch / rate if rate == rate else float("nan")
        log(
            f"step {step:>6}/{self.total} | loss {scalars['loss']:.4f} | "
            + "".join(f"{name} {scalars[name]:.4f} | " for name in self.monitors if name in scalars)
            + f"lr {scalars['lr']:.2e} | {rate:7.1f} clips/s | "
            f"ETA {fmt_time(eta) if eta == eta else '--'} | elapsed {fmt_time(self.elapsed())}"
            + "".join(f" | WARNING {a}" for a in alarms),
        )
        return {"step": step, "loss": scalars["loss"]}

    def health_alarms(self, step: int, scalars: dict) -> list[str]:
        """The encoder-health warnings due at ``step``: each monitor that has been under its floor at every
        logged step since ``step − health_patience`` or earlier. The first warning of each monitor also gets
        a line of its own that says what it means."""
        alarms = []
        for name, floor in self.health_min.items():
            value = scalars.get(name)
            if value is None or not value < floor:
                self.below_since.pop(name, None)
                continue
            since = self.below_since.setdefault(name, step)
            if step - since < self.health_patience:
                continue
            alarms.append(f"{name} {value:.4f} < {floor:g} since step {since}")
            if name not in self.warned:
                self.warned.add(name)
                log(
                    f"warning: {name} has stayed under {floor:g} since step {since}: the teacher's tokens are "
                    "collapsing (within_tea: their variance within clips; dim_tea: the directions they use) "
                    "while the loss may still look healthy. Set train.health_min.NAME=0 to silence."
                )
        return alarms


class ComputeMeter:
    """What a run has cost so far, over every start of it: a resumed run adds to the totals of the checkpoint
    it restores instead of starting them again.

    - device-hours: wall time × devices. The wall time of a start runs from its beginning (``started``: set-up,
      restore and compilation hold the devices too) to the moment the totals are read, probes included;
    - FLOPs: the analytic ``step_flops`` (``atst_jax.flops``, the whole global batch) × steps done; an
      integer, so a resumed run's total is exactly ``step_flops`` × its step;
    - mean MFU: those FLOPs / (device-seconds × the chip's peak), the peak the ``perf/mfu`` scalar uses.
      None (not meaningful) once any start ran on hardware without a stated peak (CPUs).

    A checkpoint records the totals as of its step and a resume continues from exactly those, so the time a
    killed start spent after its last checkpoint is not counted: its steps were lost and are counted again
    when they are redone. A checkpoint saved without totals (by older code) still gives the FLOPs of its
    steps; device time is then counted from that resume on (``timed_from_step``), and the mean MFU over the
    timed steps only."""

    def __init__(
        self,
        step_flops: float,
        devices: int,
        peak_tflops: float = 0.0,
        *,
        start_step: int = 0,
        saved: dict | None = None,
        started: float | None = None,
        chip: str | None = None,
        clock=time.perf_counter,
    ):
        self.step_flops = int(round(step_flops))
        self.devices, self.peak_tflops, self.chip = int(devices), float(peak_tflops), chip
        self.start_step, self.clock = int(start_step), clock
        self.started = clock() if started is None else started
        if saved:
            self.prior_device_s = float(saved["device_hours"]) * 3600.0
            self.prior_flops = int(saved["flops"])
            self.prior_peak = None if saved.get("peak_flops") is None else float(saved["peak_flops"])
            self.segments = int(saved.get("segments", 1)) + 1
            self.timed_from = int(saved.get("timed_from_step", 0))
        else:  # a fresh start, or a checkpoint without totals: its steps' FLOPs, no time
            self.prior_device_s, self.prior_peak, self.segments = 0.0, 0.0, 1
            self.prior_flops = self.step_flops * self.start_step
            self.timed_from = self.start_step

    def totals(self, step: int) -> dict:
        """The run's totals at ``step`` (the checkpoint metadata's ``compute`` entry)."""
        device_s = (self.clock() - self.started) * self.devices
        flops = self.prior_flops + self.step_flops * (int(step) - self.start_step)
        peak = None
        if self.prior_peak is not None and self.peak_tflops > 0:
            peak = self.prior_peak + device_s * self.peak_tflops * 1e12
        timed = flops - self.step_flops * self.timed_from  # the FLOPs of the steps whose time is counted
        return {
            "step": int(step),
            "device_hours": (self.prior_device_s + device_s) / 3600.0,
            "flops": flops,
            "mfu_mean": timed / peak if peak else None,
            "peak_flops": peak,  # what the devices could have done at their peak in the counted time
            "step_flops": self.step_flops,
            "devices": self.devices,
            "chip": self.chip,
            "segments": self.segments,
            "timed_from_step": self.timed_from,
        }

    def scalars(self, step: int) -> dict[str, float]:
        """The ``compute/*`` scalars of a metrics row; no ``compute/mfu_mean`` where MFU is not meaningful
        (as no ``perf/mfu``)."""
        t = self.totals(step)
        out = {"compute/device_hours": t["device_hours"], "compute/flops": float(t["flops"])}
        if t["mfu_mean"] is not None:
            out["compute/mfu_mean"] = t["mfu_mean"]
        return out

    @staticmethod
    def describe(totals: dict) -> str:
        """The totals in one line (the run's closing log lines)."""
        mfu = totals.get("mfu_mean")
        return (
            f"{totals['device_hours']:.4g} device-hours, {totals['flops']:.3e} training FLOPs (analytic), "
            + (
                f"mean MFU {mfu * 100:.3g}%"
                if mfu is not None
                else "mean MFU not meaningful (no stated chip peak)"
            )
        )
