"""``python -m atst_jax.plan``: the command's entry; the code is ``atst_jax/tools/plan.py``."""

import sys

from atst_jax.cli import run
from atst_jax.tools.plan import main

if __name__ == "__main__":
    sys.exit(run(main))
