"""The run config: loading ``path/to/config.py[:variant]``, the checks every run passes before anything is
compiled, and the ``--config.a.b=value`` overrides of the command line.

Every entry point loads configs through here (``load_config``), so a missing file, an unknown variant, a
mistyped override ("did you mean …") and a config that cannot run are each one ``ConfigError`` line.
``check_config`` builds the method once and returns it, for the caller to pass down.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import logging
from flax import nnx

from atst_jax import knobs, methods, optim
from atst_jax import sharding as shd
from atst_jax.flops import CHIPS
from atst_jax.models.encoder import EncoderConfig, FrameAST
from atst_jax.sharding import ConfigError

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_config",
    "check_overrides",
    "config_spec_from_argv",
    "load_config",
    "parse_with_overrides",
    "split_overrides",
]


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:variant]`` the way ``config_flags`` does, for programmatic use."""
    import importlib.util

    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config {spec}: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_atst_config", path)
    if module_spec is None:
        raise ConfigError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except (ValueError, KeyError) as e:  # e.g. an unknown variant
        raise ConfigError(f"--config {spec}: {str(e).strip(chr(39))}") from None
    except Exception as e:  # noqa: BLE001 - a broken config file: its error, on one line
        raise ConfigError(f"--config {spec}: {type(e).__name__}: {e}") from None


# Ranges of the shared knobs (the methods' and the encoder's are declared beside their fields, ``RANGES``).
OPTIM_RANGES = {
    "base_lr": "[0, inf)",
    "final_lr": "[0, inf)",
    "warmup_steps": "[0, inf)",
    "b1": "[0, 1)",
    "b2": "[0, 1)",
    "eps": "(0, inf)",
    "ema": "[0, 1]",
    "clip_norm": "[0, inf)",  # 0: no clipping
    "wd_start": "[0, inf)",
    "wd_end": "[0, inf)",
}
TRAIN_RANGES = {
    "steps": "[1, inf)",
    "log_every": "[1, inf)",
    "ckpt_every": "[1, inf)",
    "keep_checkpoints": "[1, inf)",
    "grad_accum_steps": "[1, inf)",
    "max_skipped": "[0, inf)",
    "global_batch": "[1, inf)",
    "health_patience": "[0, inf)",
    "image_every": "[0, inf)",  # 0: no pictures
    "inject_nan_at_step": "[-1, inf)",  # -1: none (a fault-injection hook for tests)
    "keep_every": "[0, inf)",  # 0: keep only the newest
}


def check_config(config, num_devices: int, process_count: int = 1) -> methods.Method:
    """Raises ``ConfigError`` (one line) for configs that cannot run; returns the built method."""
    # The declared ranges first: the checks below divide by some of these knobs.
    knobs.check(config.optim, "optim", OPTIM_RANGES)
    knobs.check(config.train, "train", {k: v for k, v in TRAIN_RANGES.items() if k in config.train})
    knobs.check(config.model, "model", {k: v for k, v in EncoderConfig.RANGES.items() if k in config.model})
    mesh_sizes = shd.mesh_shape(config.mesh, num_devices)
    rules = shd.rules_from_config(config.sharding_rules)
    sizes = dict(zip(shd.MESH_AXES, mesh_sizes, strict=True))
    names = shd.batch_axes(rules)
    dp = shd.data_parallel_size(sizes, rules)
    gb = config.train.global_batch
    if gb <= 0:
        raise ConfigError(f"train.global_batch={gb} must be positive")
    if gb % dp:
        raise ConfigError(
            f"train.global_batch={gb} is not divisible by the data-parallel size {dp} "
            f"(mesh {sizes}, batch sharded over {names})"
        )
    if gb % process_count:
        raise ConfigError(f"train.global_batch={gb} is not divisible by the process count {process_count}")
    accum = int(config.train.get("grad_accum_steps", 1))
    if accum < 1 or gb % accum or (gb // accum) % dp:
        raise ConfigError(
            f"train.grad_accum_steps={accum}: the global batch {gb} must split into {accum} microbatches "
            f"that are each divisible by the data-parallel size {dp}"
        )
    chip = config.train.get("chip", "")
    if chip and chip not in CHIPS:
        raise ConfigError(f"train.chip={chip!r}: choose one of {', '.join(CHIPS)} (or '' to detect)")
    m = config.model
    if m.width % m.heads:
        raise ConfigError(f"model.width={m.width} is not divisible by model.heads={m.heads}")
    if m.remat not in ("none", "full", "save_dots"):
        raise ConfigError(f"model.remat={m.remat!r}: choose none, full or save_dots")
    if m.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={m.dtype!r}: choose float32 or bfloat16")
    optim.check_config(config.optim)
    method = methods.build(config)
    # The token rule belongs to the encoder's patch stem; an abstract encoder answers it without allocating.
    encoder = nnx.eval_shape(lambda: FrameAST(method.enc_cfg, rngs=nnx.Rngs(0)))
    for crop in method.inputs():
        if crop.frames < m.patch_w:
            raise ConfigError(
                f"the {crop.name!r} crop of {config.method} has {crop.frames} frames: crop lengths (the "
                f"*_seconds fields of config.{config.method}) must be positive and at least one patch long"
            )
        tokens = encoder.num_tokens(crop.frames)
        if tokens + 1 > m.num_pos:
            raise ConfigError(
                f"the {crop.name!r} crop of {config.method} ({crop.frames} frames) gives {tokens} tokens, more "
                f"than the {m.num_pos - 1} positional slots of the encoder (model.num_pos={m.num_pos})"
            )
    if config.train.steps <= 0:
        raise ConfigError(f"train.steps={config.train.steps} must be positive")
    if config.optim.warmup_steps >= config.train.steps:
        # Not an error for short demo runs: the schedule then never leaves warm-up. Warn only.
        logging.warning(
            "optim.warmup_steps=%d >= train.steps=%d", config.optim.warmup_steps, config.train.steps
        )
    return method


def config_spec_from_argv(argv: list[str]) -> str | None:
    """The value of ``--config`` (its last occurrence; absl also takes one dash), read before flags are parsed."""
    spec = None
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            spec = arg.split("=", 1)[1]
    return spec


def check_overrides(argv: list[str]) -> None:
    """Rejects ``--config.a.b=...`` for fields the config does not have, with one line (config_flags would
    raise a multi-screen traceback from inside flag parsing)."""
    config_spec = config_spec_from_argv(argv)
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if config_spec is None or not overrides:
        return
    config = load_config(config_spec)
    for path in overrides:
        find_field(config, path)


# ------------------------------------------------------------------------------------------------------
# Overrides: one syntax for every command, ``--config.a.b=value`` (also ``--config.a.b value``)
# ------------------------------------------------------------------------------------------------------
def find_field(config, path: str):
    """``(parent ConfigDict, leaf name)`` of ``a.b.c``, or a one-line error with the closest field."""
    import difflib

    node, walked, parts = config, [], path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f" (did you mean {'.'.join(walked + close)!r}?)" if close else ""
            raise ConfigError(f"unknown config field {path!r}{hint}")
        if i == len(parts) - 1:
            return node, part
        node = node[part]
        walked.append(part)


def parse_value(current, text: str, path: str = "value"):
    """``text`` as the type of the field's current value: bool (true/false, 1/0, yes/no), int, float, str;
    other fields (tuples, lists, None) take a Python literal (``(16,16)``, ``[1,2]``, ``None``) or, when it
    is not one, the text itself. One line when it does not parse."""
    import ast

    kinds = {bool: "true or false", int: "an integer", float: "a number"}
    for kind, wanted in kinds.items():
        if isinstance(current, kind):
            try:
                if kind is bool:
                    low = text.lower()
                    if low not in ("true", "1", "yes", "false", "0", "no"):
                        raise ValueError(text)
                    return low in ("true", "1", "yes")
                return kind(text)
            except ValueError:
                raise ConfigError(f"--config.{path}={text}: expected {wanted}") from None
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(current, tuple | list) and isinstance(value, tuple | list) else value


def apply_overrides(config, overrides) -> ml_collections.ConfigDict:
    """Sets ``[(path, text), ...]`` on ``config`` (typed as each field's current value); returns it."""
    for path, text in overrides:
        node, leaf = find_field(config, path)
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"--config.{path} is a section, not a field (set one of its fields)")
        value = parse_value(node[leaf], text, path)
        try:
            node[leaf] = value
        except TypeError:  # ml_collections keeps a field's type: a number where a tuple stands, and so on
            like = repr(node[leaf]).replace(" ", "")  # as an override spells it
            raise ConfigError(
                f"--config.{path}={text}: the field holds a {type(node[leaf]).__name__} such as {like}; "
                "give a value of that form"
            ) from None
    return config


def split_overrides(argv) -> tuple[list[str], list[tuple[str, str]]]:
    """``(other arguments, [(path, text), ...])`` of an argument list: ``--config.a.b=v`` and ``--config.a.b v``
    are overrides; everything else is left for the command's own parser."""
    rest, overrides, argv, i = [], [], list(argv), 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            path, sep, text = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value (--config.{path}=VALUE)")
                text, i = argv[i + 1], i + 1
            if not path:
                raise ConfigError(f"{arg}: no field named (write --config.a.b=VALUE)")
            overrides.append((path, text))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_with_overrides(parser, argv):
    """``(args, overrides)``: the command's own flags by ``parser`` plus ``--config.a.b=v`` overrides; any other
    unknown argument is the parser's one-line usage error."""
    rest, overrides = split_overrides(argv if argv is not None else sys.argv[1:])
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, overrides
