"""params.yaml → frozen dataclasses. Every key is required and typed; unknown or missing keys are errors.

Each stage declares a frozen dataclass for its section (no defaults in code: params.yaml is the one place
they live) and loads it with `load_section`. Range checks live in the dataclass's `__post_init__` and raise
`ValueError` with the full key name; `load_section` turns any problem into a one-line `StageError`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from stages.errors import StageError

T = TypeVar("T")
PARAMS_FILE = "params.yaml"


def read_params(path: str | Path = PARAMS_FILE) -> dict:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StageError(f"params file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise StageError(f"params file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(doc, dict):
        raise StageError(f"params file {path} must be a mapping of sections")
    return doc


def load_section(cls: type[T], section: str, path: str | Path = PARAMS_FILE) -> T:
    doc = read_params(path)
    if section not in doc:
        raise StageError(f"{path}: missing section '{section}'")
    return build(cls, doc[section], section)


def build(cls: type[T], raw: Any, where: str) -> T:
    """Check `raw` against dataclass `cls` (recursively) and construct it."""
    if not isinstance(raw, dict):
        raise StageError(f"params: '{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise StageError(f"params: unknown key '{where}.{unknown[0]}' (allowed: {', '.join(names)})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise StageError(f"params: missing key '{where}.{missing[0]}'")
    values = {n: _coerce(hints[n], raw[n], f"{where}.{n}") for n in names}
    try:
        return cls(**values)
    except ValueError as exc:
        raise StageError(f"params: {exc}") from exc


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return _coerce(opt, value, key)
            except StageError as exc:
                errors.append(str(exc))
        raise StageError(errors[0] if len(errors) == 1 else f"params: '{key}' has the wrong type: {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise StageError(f"params: '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise StageError(f"params: '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise StageError(f"params: '{key}' must be {tp.__name__}, got {value!r}")
    return value


def as_dict(obj: Any) -> dict:
    """Plain dict of a params dataclass, for logging."""
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out
