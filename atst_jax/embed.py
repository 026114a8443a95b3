"""Embeddings of audio files (``python -m atst_jax.embed``); the code is :mod:`atst_jax.eval.embed`."""

import sys

from atst_jax.cli import run
from atst_jax.eval.embed import main

if __name__ == "__main__":
    sys.exit(run(main))
