"""The tools wing: what is built on top of training rather than part of it.

- ``plan``: the ahead-of-time planner (the real step compiled for a mesh on simulated devices);
- ``sweep`` and ``scaling``: grids of training runs and the scaling analysis over them;
- ``bench_step``, ``bench_data``, ``bench_gpu``, ``bench_parity`` (+ ``bench_official``, the official code's
  loader): the suites behind ``python -m atst_jax.bench``.

These modules import the core (config, data, models, methods, trainer, checkpoint, evaluation, export); the
core never imports them. Their commands keep their names: ``python -m atst_jax.plan``, ``.sweep``,
``.scaling`` and ``.bench`` are thin entry modules at the package's top.
"""
