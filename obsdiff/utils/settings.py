"""Settings as typed dataclasses: each setting and its default said once, in its dataclass.

The config groups take their keys and defaults from the dataclasses (`plain_defaults`, which the
app layer registers with Hydra), and the apps and the Python API turn plain values back into
them (`from_mapping`): every value is converted to its field's type, or one `SettingError`
names the key as the user typed it (`calibration.batch_size`), the value, and an example (the
field's default, or its `example` metadata).

Field metadata a dataclass may give: `example` (shown when the default is None), `minimum` (for
numbers), `hint` (the message for a value of the wrong form, e.g. a block range).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union


T = TypeVar("T")


class SettingError(ValueError):
    """A setting has a value it cannot take: the message names its key and how to fix it."""


def plain_defaults(cls: type) -> dict[str, Any]:
    """Every field of dataclass `cls` with its default as plain data (nested dataclasses as
    dicts, tuples as lists); a field without a default is "???" (Hydra's mandatory value)."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        value = _default(field)
        values[field.name] = "???" if value is dataclasses.MISSING else _plain(value)
    return values


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_mapping(
    cls: type[T], data: Mapping[str, Any], prefix: str = "", base: T | None = None
) -> T:
    """An instance of dataclass `cls` from plain `data` (missing keys keep `base`'s values, or
    the defaults), each value converted to its field's type; `prefix` is where the fields sit
    in the config (`"calibration."`), for the messages. Nested dataclass fields take mappings.
    A ValueError of the dataclass's own checks passes through (its message names the key)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or cls.__name__
        raise SettingError(
            f"{prefix}{unknown[0]} is not a setting; {where} has {', '.join(fields)}"
        )
    values: dict[str, Any] = {}
    for name, field in fields.items():
        current = getattr(base, name) if base is not None else _default(field)
        if name not in data:
            if current is not dataclasses.MISSING:
                values[name] = current
            continue
        values[name] = _convert(data[name], hints[name], field, prefix + name, current)
    return cls(**values)


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _example(field: dataclasses.Field[Any]) -> str:
    if "example" in field.metadata:
        return str(field.metadata["example"])
    value = _plain(_default(field))
    if value is dataclasses.MISSING:
        return "<value>"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value).replace(" ", "")


def _convert(
    value: Any,
    kind: Any,
    field: dataclasses.Field[Any],
    key: str,
    current: Any,
    strict_text: bool = False,
) -> Any:
    """`value` as type `kind` (the field's annotation), or one SettingError (`strict_text`: a
    text member of a union takes text only, so that a number is judged as a number)."""
    example = _example(field)
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        members = [m for m in typing.get_args(kind) if m is not type(None)]
        if value is None:
            if len(members) == len(typing.get_args(kind)):
                raise SettingError(f"{key} must be set; set e.g. {key}={example}")
            return None
        errors = []
        for member in members:
            try:
                return _convert(value, member, field, key, current, strict_text=True)
            except SettingError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):  # type: ignore[arg-type]
            return value
        if not isinstance(value, Mapping):
            raise SettingError(f"{key}={value!r} is not a group of settings; set {key}.<name>=...")
        assert isinstance(kind, type)
        return from_mapping(
            kind, value, f"{key}.", current if dataclasses.is_dataclass(current) else None
        )
    if "hint" in field.metadata and origin in (tuple, list):
        hint = field.metadata["hint"]
        if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
            raise SettingError(f"{key}={value!r}: {hint}")
        if origin is tuple and len(value) != len(typing.get_args(kind)):
            raise SettingError(f"{key}={value!r}: {hint}")
        return origin(int(v) for v in value)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise SettingError(f"{key}={value!r} is not a list; set e.g. {key}={example}")
        (member, *_) = typing.get_args(kind) or (Any,)
        return origin(_convert(v, member, field, key, current) for v in value)
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingError(f"{key}={value!r} is not true or false; set e.g. {key}={example}")
        return value
    if kind in (int, float):
        number = _number(value, kind, key, example)
        minimum = field.metadata.get("minimum")
        if minimum is not None and number < minimum:
            raise SettingError(f"{key}={value!r} must be >= {minimum:g}; set e.g. {key}={example}")
        return number
    if kind is str:
        text = (str,) if strict_text else (str, int, float)
        if isinstance(value, bool) or not isinstance(value, text):
            raise SettingError(f"{key}={value!r} is not a text value; set e.g. {key}={example}")
        return str(value)
    return value  # Any, dict: as given


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, kind: type, key: str, example: str) -> int | float:
    """As int or float: numbers and numeric text; not booleans, not a fraction for an int."""
    problem = f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}"
    if isinstance(value, bool) or value is None:
        raise SettingError(f"{problem}; set e.g. {key}={example}")
    try:
        converted = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{problem}; set e.g. {key}={example}") from None
    if not math.isfinite(converted) or (kind is int and converted != int(converted)):
        raise SettingError(f"{problem}; set e.g. {key}={example}")
    return kind(converted)  # type: ignore[no-any-return]
