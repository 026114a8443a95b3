"""``python -m atst_jax.sweep``: the command's entry; the code is ``atst_jax/tools/sweep.py``."""

import sys

from atst_jax.cli import run
from atst_jax.tools.sweep import main

if __name__ == "__main__":
    sys.exit(run(main))
