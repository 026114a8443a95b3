"""The method contract: everything the trainer, data pipeline, FLOPs counter, planner, bench, checkpoint and
export know about a pretraining method (DESIGN.md, "Core contracts").

A method is a subclass of :class:`Method` in one file of ``atst_jax/methods/``, registered by name in
``atst_jax/methods/__init__.py``. It is built from the run config (``build(config)``) and provides:

- ``Config``: a frozen dataclass, the **single source** of the method's defaults. The config file's section
  ``config.<name>`` may override any field; an unknown key is a one-line ``ConfigError``.
- ``inputs()``: the crops it needs per clip, as :class:`Crop` (name, frames, feature set). The pipeline
  produces one ``float32 [B, n_mels, frames]`` array per crop under ``crop.name`` and the valid frames
  ``int32 [B]`` under ``crop.length_key``; the trainer derives batch shardings, abstract inputs (planner),
  bench inputs and data checks from this list alone. ``roll_prob()``: the probability that the pipeline
  rotates a clip's frames before drawing its crops (the config's ``circular_shift``; 0 when it has none).
- ``init(rng) -> (student, teacher, method_state)``: NNX modules (parameters ``nnx.Param``, buffers
  ``nnx.BatchStat``) and a pytree of arrays that persists across steps (e.g. DINO centres). Method state is
  part of the train state everywhere: sharded (leaves that are ``nnx.Variable`` with ``axes`` metadata follow
  the sharding rules, plain arrays are replicated), checkpointed, resumed, carried through gradient
  accumulation, and left untouched by a non-finite step.
- ``loss(student, teacher, method_state, batch, key, step) -> (loss, metrics, new_method_state)``.
- ``ema_covers`` (the student sub-modules whose parameters the teacher tracks, same names on both sides) and
  ``ema_momentum(step)`` (cosine from ``optim.ema`` to 1 over the run by default).
- Optimizer knobs beyond the shared AdamW come from ``config.optim`` (``grad_clip`` none / global_norm /
  per_param with ``clip_norm``, betas, ``wd_schedule``); a method's config file states the ones that differ.
- ``pictures(batch, key, step)`` (optional): the first clip's views and masks as the step drew them, for
  TensorBoard (``train.image_every``); the default shows the crops.
- ``step_flops(global_batch)``: analytic matmul FLOPs of one train step from the shared encoder/head helpers
  in ``atst_jax.flops`` (so ``perf/mfu`` and the planner work for every method), counting the health
  monitors' covariance (``flops.token_covariance`` over the teacher's sequences); ``monitors``: the metric
  names of its own collapse monitors, shown on the progress line; ``check()``: method-level one-line errors.
- Encoder health, every method: ``loss`` reports ``within_tea`` and ``dim_tea`` (``models.collapse.health``
  on the teacher's final-normed patch tokens and their validity). Projector-side monitors (BatchNorm,
  centring, normalisation) can look healthy while the encoder's tokens collapse within clips; these two
  read the features a downstream probe reads. The trainer shows them after the method's ``monitors`` and
  warns when one stays below ``config.train.health_min`` for ``train.health_patience`` steps.
- ``lightning_hparams(config_dict, width=, depth=, heads=)`` (a classmethod): the ``hyper_parameters`` of the official PyTorch Lightning module, for
  the ``lightning`` export (``None``: the method has no official Lightning layout).
- ``official_step_inputs()``: what the official PyTorch train step needs to run on this method's inputs
  (``bench_gpu`` times it beside ours), or ``None`` when the method has no official step the bench can run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp

from atst_jax import knobs, optim
from atst_jax.features import DEFAULT_FEATURES
from atst_jax.models.collapse import HEALTH_MONITORS
from atst_jax.models.encoder import EncoderConfig
from atst_jax.sharding import ConfigError


@dataclasses.dataclass(frozen=True)
class Crop:
    """One crop per clip that a method consumes: ``batch[name]`` is ``[B, n_mels, frames]`` and
    ``batch[length_key]`` its valid frames (shorter clips are padded)."""

    name: str
    frames: int
    features: str = DEFAULT_FEATURES

    @property
    def length_key(self) -> str:
        return f"{self.name}_length"


def crop_frames(seconds: float, sample_rate: int, hop_length: int) -> int:
    """Frames of a crop of ``seconds``: ``samples // hop + 1`` (10 s → 1001), as the official transforms."""
    return int(round(seconds * sample_rate)) // hop_length + 1


def dataclass_from_section(cls, section, where: str):
    """``cls(**section)`` with one-line errors for unknown keys; lists become tuples (ConfigDicts and the JSON
    saved in checkpoints store tuples as lists)."""
    section = dict(section or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
    obj = cls(**kwargs)
    knobs.check(obj, where)  # the ranges declared beside the fields (``cls.RANGES``)
    return obj


def dataclass_defaults(cls) -> dict[str, Any]:
    """The defaults of a config dataclass as a plain dict (what a config file starts its section from)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# The official Lightning modules build their encoders by these names (hyper_parameters "arch").
_ARCHS = {(384, 12, 6): "small", (768, 12, 12): "base"}


class Method:
    """Base class of every pretraining method; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    ema_covers: ClassVar[tuple[str, ...]] = ()
    monitors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config):
        self.config = config
        self.cfg = dataclass_from_section(self.Config, config.get(self.name), f"config.{self.name}")
        try:
            self.enc_cfg = EncoderConfig.from_config(config.model)
        except ValueError as e:  # a bad model field (stem, positions, AaPE): one line, before any compile
            raise ConfigError(str(e)) from None

    # --- data -----------------------------------------------------------------------------------------
    def inputs(self) -> tuple[Crop, ...]:
        raise NotImplementedError

    def input_shapes(self, global_batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """``{batch key: (shape, dtype)}`` of one global batch, derived from ``inputs()``."""
        out = {}
        for crop in self.inputs():
            out[crop.name] = ((global_batch, self.enc_cfg.n_mels, crop.frames), jnp.float32)
            out[crop.length_key] = ((global_batch,), jnp.int32)
        return out

    # --- model and loss -------------------------------------------------------------------------------
    def init(self, rng):
        raise NotImplementedError

    def loss(self, student, teacher, method_state, batch, key, step):
        raise NotImplementedError

    def roll_prob(self) -> float:
        """Probability that the pipeline rotates a clip's frames by a random count before drawing its crops
        (``pipeline.CropExample``; ASiT's waveform ``torch.roll``): the config's ``circular_shift``, else 0."""
        return float(getattr(self.cfg, "circular_shift", 0.0))

    def pad_is_signal(self) -> bool:
        """Whether a short clip's padding counts as audio (the config's ``pad_is_signal``; False without one)."""
        return bool(getattr(self.cfg, "pad_is_signal", False))

    def padding_as_signal(self, batch):
        """``batch`` with every crop's valid length set to the crop's width where the method's config has
        ``pad_is_signal`` (a short clip's padding then counts as audio: keys, loss terms and statistics, as the
        official ATST and ASiT data code, which zero-pads the waveform); unchanged otherwise. Methods call it
        first in ``loss`` and ``pictures``."""
        if not self.pad_is_signal():
            return batch
        out = dict(batch)
        for crop in self.inputs():
            out[crop.length_key] = jnp.full_like(batch[crop.length_key], batch[crop.name].shape[-1])
        return out

    # --- teacher and optimizer ------------------------------------------------------------------------
    def ema_momentum(self, step):
        """Teacher momentum at ``step``: cosine from ``optim.ema`` to 1.0 over ``train.steps``."""
        return optim.ema_momentum(step, self.config.optim.ema, self.config.train.steps)

    # --- pictures -------------------------------------------------------------------------------------
    def pictures(self, batch, key, step) -> list[tuple[str, Any, Any]]:
        """What the step with this ``batch``, ``key`` and ``step`` fed the networks, for the first clip:
        ``[(title, spec [F, T], overlay [F, T] in [0, 1] or None)]`` (overlay: the masked / corrupted
        pixels). Traced under ``jit`` with the step's own key, so the views are exactly the step's. The
        default shows each crop as it arrives; methods show their views and masks."""
        del key, step
        return [(crop.name, batch[crop.name][0], None) for crop in self.inputs()]

    # --- cost, monitors, checks -----------------------------------------------------------------------
    def step_flops(self, global_batch: int) -> float:
        return 0.0

    @property
    def progress_monitors(self) -> tuple[str, ...]:
        """The progress line's monitors: the method's own, then the encoder-health ones every method reports."""
        return tuple(dict.fromkeys(self.monitors + HEALTH_MONITORS))

    def check(self) -> None:
        """Method-level config errors (``ConfigError``, one line), before anything is compiled."""

    @classmethod
    def lightning_hparams(cls, config: Mapping, *, width: int, depth: int, heads: int):
        """``(hyper_parameters, warnings)`` of the method's official Lightning module for a run's saved config
        (a plain dict), or ``None`` when the method has no official Lightning layout."""
        del config, width, depth, heads
        return None

    def official_step_inputs(self) -> dict[str, Any] | None:
        """The inputs of the official PyTorch train step at this run's shapes (``bench_official``), or ``None``
        when the method has none the bench can run."""
        return None


def official_schedule_hparams(config, width: int, depth: int, heads: int):
    """``arch``, ``learning_rate`` (peak), ``warmup_steps``, ``max_steps`` and ``ema`` — the hyper-parameters
    both official ATST Lightning modules take — with warnings for what they cannot represent."""
    warnings = []
    arch = _ARCHS.get((width, depth, heads))
    if arch is None:
        arch = f"custom_d{width}_l{depth}_h{heads}"
        warnings.append(
            f"width {width} / depth {depth} / heads {heads} is not an official size: arch={arch!r}, which the "
            "official Lightning module cannot build (the tensors are still in its layout)"
        )
    optim_cfg, train_cfg = config["optim"], config["train"]
    warmup, steps = int(optim_cfg["warmup_steps"]), int(train_cfg["steps"])
    if steps <= warmup:
        # The official modules build a cosine schedule of max_steps − warmup_steps entries at load time.
        warnings.append(f"train.steps={steps} <= warmup_steps={warmup}: writing max_steps={warmup + 1}")
        steps = warmup + 1
    hp = {
        "arch": arch,
        "learning_rate": float(optim_cfg["base_lr"]) * int(train_cfg["global_batch"]) / 256.0,
        "warmup_steps": warmup,
        "max_steps": steps,
        "ema": float(optim_cfg["ema"]),
    }
    return hp, warnings
