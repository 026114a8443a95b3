"""Frozen-encoder probes of a pretrained encoder (``python -m atst_jax.evaluate``); the code is :mod:`atst_jax.eval.probe`."""

import sys

from atst_jax.cli import run
from atst_jax.eval.probe import main

if __name__ == "__main__":
    sys.exit(run(main))
