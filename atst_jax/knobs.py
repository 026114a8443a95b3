"""Ranges of config knobs, declared once beside the fields they bound and checked before anything compiles.

A config dataclass lists its bounds in a class-level ``RANGES`` mapping, field name → interval:

    RANGES: ClassVar[dict[str, str]] = {"mask_ratio": "(0, 1)", "mask_span": "[1, inf)",
                                        "corrupt_area": "(0, 1] ordered"}

``[`` / ``]`` include the end, ``(`` / ``)`` exclude it, ``inf`` is unbounded; a tuple value has each of its
elements checked. ``pair`` asks for exactly two elements (a block's height and width), and ``ordered`` for a
non-decreasing pair (a ``(lo, hi)`` range). ``check`` raises one ``ConfigError`` line naming the field, its
value and the allowed range.
"""

from __future__ import annotations

import math
import re

from atst_jax.errors import ConfigError

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,]+?)\s*,\s*([^\])]+?)\s*([\])])\s*(ordered|pair)?\s*$")


def _bound(text: str) -> float:
    return math.inf if text in ("inf", "+inf") else -math.inf if text == "-inf" else float(text)


def inside(value, spec: str) -> bool:
    """Whether ``value`` (a number or a tuple of numbers) is in the interval ``spec``."""
    m = _INTERVAL.match(spec)
    if m is None:
        raise ValueError(f"malformed range {spec!r}")
    left, lo, hi, right, shape = m.groups()
    lo, hi = _bound(lo), _bound(hi)
    values = tuple(value) if isinstance(value, tuple | list) else (value,)
    if shape and (not isinstance(value, tuple | list) or len(values) != 2):
        return False
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            return False
        if (v < lo or (left == "(" and v == lo)) or (v > hi or (right == ")" and v == hi)):
            return False
    return shape != "ordered" or values[0] <= values[1]


def check(obj, where: str, ranges: dict[str, str] | None = None) -> None:
    """Every bounded field of ``obj`` (``type(obj).RANGES`` unless ``ranges`` is given) in its range."""
    for name, spec in (ranges if ranges is not None else getattr(type(obj), "RANGES", {})).items():
        value = obj[name] if isinstance(obj, dict) or hasattr(obj, "keys") else getattr(obj, name)
        if not inside(value, spec):
            shown = tuple(value) if isinstance(value, list) else value
            raise ConfigError(f"{where}.{name}={shown!r}: must be in {spec}")
