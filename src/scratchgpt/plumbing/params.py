"""Typed, validated stage parameters read from `params.yaml`.

Each stage declares a dataclass (fields with defaults, each documented by a docstring under it;
checks in `__post_init__`, written with the `check_*` helpers below). `load_section` builds it from
one top-level section of `params.yaml`, refusing unknown keys, so a typo fails before any work
starts instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A parameter file or section is missing, malformed or holds an invalid value."""


class _Yaml12FloatLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading `1e-05` as a float.

    `dvc exp run -S key=1e-5` writes floats back as `1e-05`: a float in YAML 1.2, but a string to
    PyYAML, which follows YAML 1.1 (a dot in the mantissa).
    """


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def parse_yaml(text: str) -> Any:
    """Parse YAML as params.yaml is meant: safe, with YAML 1.2 exponent floats."""
    return yaml.load(text, Loader=_Yaml12FloatLoader)


def read_params(path: str | os.PathLike[str] = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """Read a whole params file as a dict."""
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"params file not found: {p}")
    try:
        data = parse_yaml(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields.

    Unknown keys raise ParamsError naming the key and the allowed ones; values are checked by the
    dataclass's own `__post_init__` (a ValueError there is re-raised as ParamsError with `where`).
    """
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ParamsError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints.get(name))
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{where}.{name}" if where else name)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ParamsError):
            raise
        raise ParamsError(f"{where or cls.__name__}: {exc}") from exc


def load_section(
    cls: type[T], section: str, path: str | os.PathLike[str] = DEFAULT_PARAMS_FILE
) -> T:
    """Load and validate the top-level `section` of a params file as dataclass `cls`."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{path}: no '{section}' section")
    return from_dict(cls, data[section], section)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (for logging to MLflow or writing next to a checkpoint)."""
    return dataclasses.asdict(obj)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# Field checks for `__post_init__`: each reads `obj.<name>` and raises ValueError naming the field
# and the bad value. (`from_dict` turns that into a ParamsError prefixed with the section.)


def check_int(obj: Any, name: str, minimum: int) -> None:
    """`obj.<name>` must be an int (not a bool) >= `minimum`."""
    value = getattr(obj, name)
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be {_int_phrase(minimum)}, got {value!r}")


def check_number(obj: Any, name: str, minimum: float | None = None, *, exclusive: bool = False) -> None:
    """`obj.<name>` must be a finite int or float (not a bool), and `>= minimum` (`> minimum` if `exclusive`)."""
    value = getattr(obj, name)
    if not is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {_number_phrase(minimum, exclusive)}, got {value!r}")


def check_ratio(obj: Any, name: str, *, zero: bool = False) -> None:
    """`obj.<name>` must be a number in (0, 1), or in [0, 1) with `zero=True`."""
    value = getattr(obj, name)
    if not is_number(value) or not (0 <= value < 1 if zero else 0 < value < 1):
        raise ValueError(f"{name} must be a number in {'[0' if zero else '(0'}, 1), got {value!r}")


def check_choice(obj: Any, name: str, choices: Collection[str]) -> None:
    """`obj.<name>` must be one of `choices`."""
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_bool(obj: Any, name: str) -> None:
    """`obj.<name>` must be True or False (YAML `true`/`false`), not 0, 1 or a string."""
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_str(obj: Any, name: str) -> None:
    """`obj.<name>` must be a string holding more than whitespace."""
    value = getattr(obj, name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def is_int(value: object) -> bool:
    """An int, and not a bool (YAML `true` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_phrase(minimum: int) -> str:
    return {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")


def _number_phrase(minimum: float, exclusive: bool) -> str:
    if minimum == 0:
        return "a positive number" if exclusive else "a non-negative number"
    return f"a number {'>' if exclusive else '>='} {minimum}"


def _dataclass_type(hint: Any) -> type | None:
    if hint is None:
        return None
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None
