"""Benchmarks: one command, four suites (their code is in ``atst_jax/tools/``).

python -m atst_jax.bench step --config configs/atst_frame.py:small --batch 8 [--steps 5] [--chip h100]
    [--set model.dtype=bfloat16 ...]                                   (tools/bench_step.py)
python -m atst_jax.bench data [...]      (input pipeline and preparation throughput, tools/bench_data.py)
python -m atst_jax.bench gpu [--dry-run] [--official PATH] [...]   (accelerator suite, tools/bench_gpu.py)
python -m atst_jax.bench parity --official PATH --config configs/M.py:V [...]   (tools/bench_parity.py)
"""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "step": ("bench_step", "time the full train step"),
    "data": ("bench_data", "input pipeline and preparation throughput"),
    "gpu": ("bench_gpu", "accelerator suite: bf16 step variants, official PyTorch step"),
    "parity": ("bench_parity", "one step of ours against the official PyTorch step, same weights and inputs"),
}


def main(argv=None):
    from atst_jax.cli import ArgumentParser, run

    parser = ArgumentParser(prog="python -m atst_jax.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    for name, (module, help_) in SUITES.items():
        # Each suite parses its own flags (``python -m atst_jax.bench NAME --help``).
        sub.add_parser(name, help=f"{help_} (atst_jax/tools/{module}.py)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"atst_jax.tools.{SUITES[args.what][0]}")
    return run(module.main, rest)


if __name__ == "__main__":
    from atst_jax.cli import run

    sys.exit(run(main))
