"""Dataclasses built from YAML mappings, every key and scalar type checked on the way.

Why not pydantic or dacite: evo's promise is one error line naming the file and the dotted field
(``quickstart.yaml: optimizer.population: expected int, got 'ten'``) and frozen standard
dataclasses that ``dataclasses.asdict`` writes back unchanged; that needs ~60 lines, not a
dependency whose errors span several lines and whose models are not plain dataclasses.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from evo.core.errors import EvoError


def build(cls, data: Any, source: str, prefix: str = "", *, aliases: dict | None = None):
    """Dataclass ``cls`` from mapping ``data``: unknown keys, wrong types and missing required
    fields are one EvoError line naming ``source`` and the field. ``aliases`` maps
    ``(class name, YAML key)`` to a field name (YAML keys that are Python keywords)."""
    aliases = aliases or {}
    if not isinstance(data, dict):
        raise EvoError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    data = {aliases.get((cls.__name__, k), k): v for k, v in data.items()}
    unknown = set(data) - set(fields)
    if unknown:
        raise EvoError(f"{source}: {prefix}{sorted(unknown)[0]}: unknown field (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: coerce(hints[name], value, source, f"{prefix}{name}", aliases) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default
        raise EvoError(f"{source}: {prefix.rstrip('.')}: {exc}") from None


def coerce(hint, value, source: str, where: str, aliases: dict | None = None):
    """``value`` as type ``hint`` (optionals, nested dataclasses, lists, mappings, scalars; an int
    is a valid float, a bool is not an int), or one EvoError line naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, source, where, aliases)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, where + ".", aliases=aliases)
    if origin is list:
        if not isinstance(value, list):
            raise EvoError(f"{source}: {where}: expected a list, got {type(value).__name__}")
        return [coerce(args[0], v, source, f"{where}[{i}]", aliases) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise EvoError(f"{source}: {where}: expected a mapping, got {type(value).__name__}")
        return {str(k): coerce(args[1], v, source, f"{where}.{k}", aliases) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, Path)):
        return str(value)
    raise EvoError(f"{source}: {where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
