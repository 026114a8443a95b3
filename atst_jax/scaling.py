"""``python -m atst_jax.scaling``: the command's entry; the code is ``atst_jax/tools/scaling.py``."""

import sys

from atst_jax.cli import run
from atst_jax.tools.scaling import main

if __name__ == "__main__":
    sys.exit(run(main))
