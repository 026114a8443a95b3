"""One front door: every ``python -m atst_jax.*`` command answers a mistyped config field and a mistyped flag
with the same shape — exit status 2 and one line on stderr naming the mistake — and the commands that read a
config take the trainer's ``--config.a.b=value`` overrides (typed, with "did you mean").

The argparse commands run in-process (``main(argv)``); the absl ones (``train``, ``plan``) parse their flags at
start-up, so they run as processes. Nothing here compiles a step: every mistake is caught before that.
"""

import importlib
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, config_path

from atst_jax.config import apply_overrides, load_config, split_overrides
from atst_jax.sharding import ConfigError

FRAME = config_path("atst_frame") + ":tiny"
ASIT = config_path("asit") + ":tiny"
TYPO_FIELD = "--config.model.widht=3"
FIELD_LINE = "unknown config field 'model.widht' (did you mean 'model.width'?)"


def _one_line(code, err, needle):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0] and needle in lines[0], lines[0]


def _in_process(module, argv, capsys):
    capsys.readouterr()
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


def _process(module, argv):
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv],
        capture_output=True,
        text=True,
        env=cli_env(1),
        cwd=ROOT,
        timeout=120,
    )
    return proc.returncode, proc.stderr


# The commands that read a config: a mistyped field is named with its closest match.
CONFIG_COMMANDS = {
    "bench step": ("atst_jax.bench", ["step", "--config", FRAME, "--batch", "8", TYPO_FIELD]),
    "bench gpu": ("atst_jax.bench", ["gpu", "--dry-run", "--out", "{tmp}/gpu.json", TYPO_FIELD]),
    "bench parity": ("atst_jax.bench", ["parity", "--official", "{tmp}", "--config", ASIT, TYPO_FIELD]),
    "sweep": ("atst_jax.tools.sweep", ["--config", FRAME, "--root", "{tmp}/sweep", "--dry-run", TYPO_FIELD]),
}
# The commands that read a run, data or files instead: a config override is not theirs, in one line.
OTHER_COMMANDS = {
    "bench data": ("atst_jax.bench", ["data"]),
    "scaling": ("atst_jax.tools.scaling", ["{tmp}"]),
    "evaluate": (
        "atst_jax.evaluate",
        ["--workdir", "{tmp}", "--train", "{tmp}", "--test", "{tmp}", "--out", "{tmp}/r"],
    ),
    "finetune": (
        "atst_jax.finetune",
        ["--workdir", "{tmp}", "--train", "{tmp}", "--test", "{tmp}", "--out", "{tmp}/f"],
    ),
    "embed": ("atst_jax.embed", ["--workdir", "{tmp}", "--audio", "{tmp}", "--out", "{tmp}/e"]),
    "export": (
        "atst_jax.export.__main__",
        ["--workdir", "{tmp}", "--format", "safetensors", "--out", "{tmp}/e"],
    ),
    "checkpoint": ("atst_jax.checkpoint", ["list", "--workdir", "{tmp}"]),
    "data.prepare": ("atst_jax.data.prepare", ["folder", "--audio_dir", "{tmp}", "--out", "{tmp}/o"]),
}


def _argv(argv, tmp_path):
    return [a.format(tmp=tmp_path) for a in argv]


@pytest.mark.parametrize("name", sorted(CONFIG_COMMANDS))
def test_a_mistyped_config_field_is_one_line_with_the_closest_field(name, tmp_path, capsys):
    module, argv = CONFIG_COMMANDS[name]
    _one_line(*_in_process(module, _argv(argv, tmp_path), capsys), FIELD_LINE)


@pytest.mark.parametrize("name", sorted(CONFIG_COMMANDS) + sorted(OTHER_COMMANDS))
def test_a_mistyped_flag_is_one_line(name, tmp_path, capsys):
    module, argv = {**CONFIG_COMMANDS, **OTHER_COMMANDS}[name]
    argv = [a for a in _argv(argv, tmp_path) if a != TYPO_FIELD]
    _one_line(*_in_process(module, [*argv, "--batchh", "2"], capsys), "--batchh")


@pytest.mark.parametrize("name", sorted(OTHER_COMMANDS))
def test_a_config_override_where_no_config_is_read_is_one_line(name, tmp_path, capsys):
    module, argv = OTHER_COMMANDS[name]
    _one_line(*_in_process(module, [*_argv(argv, tmp_path), TYPO_FIELD], capsys), TYPO_FIELD)


@pytest.mark.parametrize("module", ["atst_jax.train", "atst_jax.plan"])
def test_the_absl_commands_answer_alike(module, tmp_path):
    base = ["--config", FRAME] + (["--workdir", str(tmp_path / "run")] if module.endswith("train") else [])
    base += ["--mesh", "data=1"] if module.endswith("plan") else []
    _one_line(*_process(module, [*base, TYPO_FIELD]), FIELD_LINE)
    _one_line(*_process(module, [*base, "--batchh=2"]), "batchh")
    # A value the shell split ("--config configs/compose.py:tiny, patch2d") is not silently dropped.
    _one_line(*_process(module, [*base, "patch2d"]), "unexpected arguments")


# Out-of-range knobs: the ranges declared beside the fields (knobs.py), every method, before any compile.
OUT_OF_RANGE = [
    ("atst_frame", "atst_frame.mask_ratio=1.5", "config.atst_frame.mask_ratio=1.5: must be in (0, 1)"),
    ("atst_frame", "atst_frame.mask_span=0", "config.atst_frame.mask_span=0: must be in [1, inf)"),
    ("atst_frame", "optim.base_lr=-1", "optim.base_lr=-1.0: must be in [0, inf)"),
    ("atst_frame", "model.width=0", "model.width=0: must be in [1, inf)"),
    ("atst_clip", "model.depth=0", "model.depth=0: must be in [1, inf)"),
    ("asit", "asit.paste_prob=2", "config.asit.paste_prob=2.0: must be in [0, 1]"),
    ("aasp", "aasp.mask_block=(0, 0)", "config.aasp.mask_block=(0, 0): must be in [1, inf)"),
    (
        "compose",
        "compose.corrupt_area=(0.7, 0.5)",
        "config.compose.corrupt_area=(0.7, 0.5): must be in (0, 1) ordered",
    ),
    ("compose", "compose.corrupt_area=(1, 1)", "config.compose.corrupt_area=(1, 1)"),
    ("compose", "compose.paste_prob=2", "config.compose.paste_prob=2.0"),
    ("compose", "compose.max_block=0", "config.compose.max_block=0.0: must be in (0, 1]"),
    ("compose", "compose.mask_block=(5,)", "config.compose.mask_block=(5,): must be in [1, inf) pair"),
    ("aasp", "aasp.mask_block=(5, 5, 5)", "must be in [1, inf) pair"),
    (
        "atst_clip",
        "atst_clip.time_scale=(1.0,)",
        "config.atst_clip.time_scale=(1.0,): must be in (0, inf) ordered",
    ),
]


@pytest.mark.parametrize("method,override,needle", OUT_OF_RANGE)
def test_an_out_of_range_knob_is_refused_before_compiling(method, override, needle):
    from atst_jax.config import check_config

    config = apply_overrides(load_config(config_path(method) + ":tiny"), [tuple(override.split("=", 1))])
    with pytest.raises(ConfigError) as e:
        check_config(config, 1)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_grid_value_spelled_twice_is_one_line_not_two_runs(tmp_path, capsys):
    argv = ["--config", FRAME, "--grid", "model.width=64,064", "--root", str(tmp_path / "s"), "--dry-run"]
    _one_line(*_in_process("atst_jax.tools.sweep", argv, capsys), "repeats a value (64,064 reads as 64,64)")


def test_overrides_are_typed_as_the_field():
    config = load_config(FRAME)
    rest, overrides = split_overrides(
        ["--batch", "2", "--config.model.width=64", "--config.model.scan_layers", "false"]
        + ["--config.atst_frame.freq_scale=(0.5, 2)"]
    )
    assert rest == ["--batch", "2"]
    apply_overrides(config, overrides)
    assert config.model.width == 64 and config.model.scan_layers is False
    assert config.atst_frame.freq_scale == (0.5, 2)
    for bad, needle in [
        ("model.width=3.5", "expected an integer"),
        ("model.scan_layers=maybe", "expected true or false"),
        ("model=3", "a section, not a field"),
        ("atst_frame.freq_scale=5", r"holds a tuple such as \(0.5,2\); give a value of that form"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            apply_overrides(config, [tuple(bad.split("=", 1))])
    with pytest.raises(ConfigError, match="needs a value"):
        split_overrides(["--config.model.width"])


def _outside(spec: str, like):
    """A value just outside the interval ``spec`` (atst_jax.knobs), of the type of the field's value ``like``;
    a tuple field keeps its other elements."""
    import math

    from atst_jax import knobs

    left, lo, hi, right, _ = knobs._INTERVAL.match(spec).groups()
    lo, hi = knobs._bound(lo), knobs._bound(hi)
    if not math.isinf(lo):
        bad = lo - 1 if left == "[" else lo
    else:
        bad = hi + 1 if right == "]" else hi
    element = like[0] if isinstance(like, tuple) else like
    bad = type(element)(bad)
    return (bad, *like[1:]) if isinstance(like, tuple) else bad


def _every_range():
    from atst_jax import methods
    from atst_jax.config import OPTIM_RANGES, TRAIN_RANGES
    from atst_jax.models.encoder import EncoderConfig

    for name in methods.names():
        for field, spec in methods.get_class(name).Config.RANGES.items():
            yield name, name, field, spec
        for field, spec in EncoderConfig.RANGES.items():
            yield name, "model", field, spec
    for section, ranges in (("optim", OPTIM_RANGES), ("train", TRAIN_RANGES)):
        for field, spec in ranges.items():
            yield "atst_frame", section, field, spec


def test_every_declared_knob_out_of_range_is_one_line_before_compiling(monkeypatch):
    """Each range declared beside a field (every method's, the encoder's, optim's and train's), walked: a value
    just outside it is refused by check_config in one line naming the field — before any compile."""
    from atst_jax.config import check_config
    from atst_jax.trainer import Trainer

    monkeypatch.setattr(Trainer, "jit_train_step", lambda *a, **k: pytest.fail("compiled"))
    configs = {}
    walked = 0
    for method, section, field, spec in _every_range():
        config = configs.get(method) or load_config(config_path(method) + ":tiny")
        configs[method] = config
        config = config.copy_and_resolve_references()
        if section == "model" and field not in config.model:  # a stem's own field (patch_size: patch2d)
            continue
        assert field in config[section], f"{section}.{field}: declared but not in the config"
        config[section][field] = _outside(spec, config[section][field])
        with pytest.raises(ConfigError) as e:
            check_config(config, 1)
        message = str(e.value)
        assert f"{field}" in message and "\n" not in message, (section, field, spec, message)
        walked += 1
    assert walked > 60  # every method's, the encoder's (per method), optim's and train's


def test_every_numeric_knob_has_a_declared_range():
    """No numeric field of a method's or the encoder's config dataclass, nor of optim / train, goes unchecked."""
    from atst_jax import methods
    from atst_jax.config import OPTIM_RANGES, TRAIN_RANGES
    from atst_jax.methods.base import dataclass_defaults
    from atst_jax.models.encoder import EncoderConfig

    def numeric(v):
        values = v if isinstance(v, tuple) and v else (v,)
        return all(isinstance(x, int | float) and not isinstance(x, bool) for x in values)

    unbounded = []
    for cls in [methods.get_class(n).Config for n in methods.names()] + [EncoderConfig]:
        unbounded += [
            f"{cls.__name__}.{k}"
            for k, v in dataclass_defaults(cls).items()
            if numeric(v) and k not in cls.RANGES
        ]
    config = load_config(FRAME)
    for section, ranges in (("optim", OPTIM_RANGES), ("train", TRAIN_RANGES)):
        unbounded += [f"{section}.{k}" for k, v in config[section].items() if numeric(v) and k not in ranges]
    assert not unbounded, unbounded
