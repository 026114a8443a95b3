"""Evaluation of pretrained encoders: what a representation is worth on labelled data.

The map, in reading order: each module imports only those above it, plus the library below the package
(``features``, ``inference``, ``models``, ``data``, ``sharding``, ``checkpoint``, ``export.load``, ``cli``);
never the trainer or the tools, which may import it.

- ``data``: labelled data — prepared labelled sets read into memory (``read_labelled``), their checks
  (``check_sets``), the validation hold-out, the task the labels imply, clip and per-step targets.
- ``metrics``: pure NumPy metrics (no JAX) — AP / mAP, accuracy, median filter, frame F1, PSDS1 / PSDS2 and
  the collar-based event F1.
- ``report``: ``RESULTS.json``, the metrics table and the pictures (per-class bars, SED posteriors, and the
  spectrogram panels TensorBoard shows during pretraining).
- ``embed``: frame- and clip-level embeddings of audio or spectrograms from a run or an exported file
  (``python -m atst_jax.embed``); the chunking and time-step conventions are ``atst_jax.inference``'s,
  shared with the PyTorch export.
- ``probe``: the frozen-encoder linear probes (and ``--protocol official``) next to the random-init and
  log-mel baselines (``python -m atst_jax.evaluate``).
- ``recipes``: the official per-task fine-tuning presets (``--recipe``).
- ``finetune``: full fine-tuning and ATST-C2F distillation — the models, the schedule, the resumable fit.
- ``finetune_run``: the fine-tuning command (``python -m atst_jax.finetune``) — its checks before any work,
  who owns ``--out``, per-epoch checkpoints, stop and resume, results written as each model finishes.
- ``pretrain_probe``: the probe during and after pretraining (config section ``probe``), built by the trainer.

``atst_jax/evaluate.py``, ``finetune.py`` and ``embed.py`` are the thin entry modules of the commands.
"""
