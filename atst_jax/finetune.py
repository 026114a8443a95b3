"""Fine-tuning and ATST-C2F (``python -m atst_jax.finetune``); the code is :mod:`atst_jax.eval.finetune`."""

import sys

from atst_jax.cli import run
from atst_jax.eval.finetune import main

if __name__ == "__main__":
    sys.exit(run(main))
