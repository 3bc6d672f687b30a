"""Typed, validated stage parameters read from `params.yaml`.

Each stage declares a dataclass (fields with defaults and docstring comments, checks in
`__post_init__`). `load_section` builds it from one top-level section of `params.yaml`, refusing
unknown keys, so a typo fails before any work starts instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
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
