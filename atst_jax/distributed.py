"""Multi-process start-up: one JAX process per host (TPU VM, SLURM task, or a local process for tests).

Called once, before anything touches a JAX backend. Three cases:

- ``ATST_COORDINATOR=host:port``, ``ATST_NUM_PROCESSES``, ``ATST_PROCESS_ID`` set (``launch/local_multiprocess.sh``
  and any hand-rolled launcher): explicit ``jax.distributed.initialize``. CPU collectives go over gloo, so N
  processes with simulated CPU devices form one mesh on one machine.
- ``ATST_DISTRIBUTED=auto``, a SLURM job step with more than one task, or a multi-host Cloud TPU (the
  ``TPU_WORKER_HOSTNAMES`` list): JAX's own cluster auto-detection, ``jax.distributed.initialize()``.
- otherwise: a single process, nothing to do.
"""

from __future__ import annotations

import os
import sys

import jax

from atst_jax.sharding import ConfigError


def _wants_auto(env) -> bool:
    if env.get("ATST_DISTRIBUTED", "").lower() == "auto":
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_STEP_ID" in env:
        return True  # inside `srun` with several tasks (the batch script itself is not a step)
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(env=None) -> str:
    """Starts the distributed runtime if this process is one of several. Returns how: ``explicit``,
    ``auto`` or ``single``. Safe to call twice."""
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return "explicit" if env.get("ATST_COORDINATOR") else "auto"
    coordinator = env.get("ATST_COORDINATOR")
    if coordinator:
        try:
            num = int(env["ATST_NUM_PROCESSES"])
            pid = int(env["ATST_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise ConfigError(
                "ATST_COORDINATOR is set, so ATST_NUM_PROCESSES and ATST_PROCESS_ID must be integers too"
            ) from e
        if not 0 <= pid < num:
            raise ConfigError(f"ATST_PROCESS_ID={pid} is not in [0, ATST_NUM_PROCESSES={num})")
        # Only the CPU client reads this; harmless on GPU/TPU, required for cross-process CPU collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
        return "explicit"
    if _wants_auto(env):
        jax.distributed.initialize()
        return "auto"
    return "single"


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_main() -> bool:
    """Process 0 writes logs, metrics and shared files."""
    return jax.process_index() == 0


class StopSignal:
    """SIGTERM (preemption notice, ``scancel``, Kubernetes) and SIGINT (Ctrl-C) → finish the current step,
    save, exit 0. A second Ctrl-C aborts at once (``KeyboardInterrupt``; the CLI exits 130).

    The handler only sets a flag; the loop acts on it at the next step boundary, so a signal that arrives
    during start-up, compilation or a long evaluation is honoured right after it, at the first step boundary.
    """

    def __init__(self):
        self.requested = None
        self.interrupts = 0
        self._previous = {}

    def __enter__(self):
        import signal

        handlers = {signal.SIGTERM: self._handle, signal.SIGINT: self._handle}
        if jax.process_count() > 1:
            # Several processes must stop at the same step, or the ones still stepping hang in a collective.
            # JAX's preemption service (started by jax.distributed.initialize) catches SIGTERM itself and
            # agrees on a common step, which the loop reads through ``ckpt.reached_preemption``; a Python
            # handler here would replace it. Ctrl-C is passed to it as a SIGTERM to this process.
            handlers = {signal.SIGINT: self._interrupt_to_sigterm}
        for sig, handler in handlers.items():
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test harness thread): no handler
                pass
        return self

    def _count_interrupt(self, signum):
        import signal

        if signum != signal.SIGINT:
            return
        self.interrupts += 1
        if self.interrupts > 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a third one interrupts the clean-up
            raise KeyboardInterrupt
        print(
            "interrupted: finishing the current step, saving it and exiting (Ctrl-C again to abort without "
            "saving)",
            file=sys.stderr,
            flush=True,
        )

    def _handle(self, signum, frame):
        del frame
        self._count_interrupt(signum)
        self.requested = signum

    def _interrupt_to_sigterm(self, signum, frame):
        import signal

        del frame
        self._count_interrupt(signum)
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
