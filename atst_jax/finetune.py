"""Fine-tuning and ATST-C2F (``python -m atst_jax.finetune``); the command is :mod:`atst_jax.eval.finetune_run`,
the method :mod:`atst_jax.eval.finetune`."""

import signal
import sys

from atst_jax.cli import run

STOPS = (signal.SIGINT, signal.SIGTERM)


def main(argv=None, after_step=None) -> int:
    # The command's modules import JAX: seconds. A Ctrl-C raised in the middle of that can land in a callback
    # of the garbage collector, where Python prints "Exception ignored" with a traceback, drops the interrupt
    # and the run goes on. So the signals are only noted while the modules load (the command installs its
    # own stop handling once it runs), and one that came ends the command before it starts.
    noted = []
    previous = {}
    for sig in STOPS:
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: noted.append(signum))
        except ValueError:  # not the main thread: no handler can be installed, nor is one needed
            pass
    try:
        from atst_jax.eval.finetune_run import main as command
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if noted:
        print("interrupted while starting: nothing was done", file=sys.stderr, flush=True)
        return 130 if noted[0] == signal.SIGINT else 0
    return command(argv, after_step=after_step)


if __name__ == "__main__":
    sys.exit(run(main))
