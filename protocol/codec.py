"""The one msgpack codec: message dataclass ⇄ body bytes, symmetric and strict.

Decoding is defensive by construction: ``raw=False`` (str stays str, bytes stay bytes),
``strict_map_key=True`` (map keys must be str/bytes), every ext type refused, the exact
field set required, every field type-checked, floats finite. Anything else raises a
``MalformedFrame`` / ``UnknownMessage`` — never a bare ``msgpack`` or ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

import msgpack

from . import messages as _messages
from .errors import MalformedFrame, UnknownMessage
from .messages import MESSAGE_TYPES

Validator = Callable[[Any], Any]


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedFrame(f"msgpack ext type {code} is not allowed")


def unpack_strict(data: bytes) -> Any:
    """Unpack exactly one msgpack object with the project's safety settings.

    The caller has already bounded ``len(data)`` (framing), and msgpack's own
    per-container limits default to that length, so declared sizes cannot exceed it.
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            use_list=True,
        )
    except MalformedFrame:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedFrame(f"invalid msgpack: {type(exc).__name__}") from None
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedFrame(f"invalid msgpack: {type(exc).__name__}: {exc}") from None


def pack(obj: Any) -> bytes:
    """Deterministic packing (no floats as float32, bin type for bytes)."""
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False)


# --- validators derived from the dataclass annotations --------------------------------


def _scalar(tp: type) -> Validator:
    def check(value: Any) -> Any:
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MalformedFrame(f"expected float, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value):
                raise MalformedFrame("non-finite float")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise MalformedFrame(f"expected int, got {type(value).__name__}")
            return value
        if tp is type(None):
            if value is not None:
                raise MalformedFrame("expected nil")
            return None
        if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
            raise MalformedFrame(f"expected {tp.__name__}, got {type(value).__name__}")
        return value

    return check


def _any_scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return value
    if isinstance(value, float):
        return _scalar(float)(value)
    raise MalformedFrame(f"row value must be a scalar, got {type(value).__name__}")


def _row(value: Any) -> Any:
    if not isinstance(value, list):
        raise MalformedFrame("row must be an array of [column, value] pairs")
    out = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise MalformedFrame("row entry must be [str, scalar]")
        out.append((pair[0], _any_scalar(pair[1])))
    return tuple(out)


def _validator(tp: Any) -> Validator:
    if tp == _messages.Row:
        return _row
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_validator(a) for a in typing.get_args(tp)]

        def check_union(value: Any) -> Any:
            for option in options:
                try:
                    return option(value)
                except MalformedFrame:
                    continue
            raise MalformedFrame(f"value does not match {tp}")

        return check_union
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported tuple type {tp}")
        item = _validator(args[0])

        def check_tuple(value: Any) -> Any:
            if not isinstance(value, list):
                raise MalformedFrame("expected array")
            return tuple(item(v) for v in value)

        return check_tuple
    if tp in (int, float, str, bytes, bool, type(None)):
        return _scalar(tp)
    raise TypeError(f"unsupported field type {tp!r}")


_SCHEMAS: dict[type, tuple[tuple[str, Validator], ...]] = {}
for _cls in MESSAGE_TYPES.values():
    _hints = typing.get_type_hints(_cls, vars(_messages))
    _SCHEMAS[_cls] = tuple((f.name, _validator(_hints[f.name])) for f in dataclasses.fields(_cls))


def _to_wire(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def encode_body(message: Any) -> bytes:
    """Message dataclass → msgpack map of its fields (tuples become arrays)."""
    cls = type(message)
    if cls not in _SCHEMAS:
        raise UnknownMessage(f"not a protocol message: {cls.__name__}")
    return pack({name: _to_wire(getattr(message, name)) for name, _ in _SCHEMAS[cls]})


def decode_body(type_name: str, body: bytes) -> Any:
    """msgpack body bytes → message of ``type_name``; strict field set and types."""
    cls = MESSAGE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise UnknownMessage(f"unknown message type {type_name!r}")
    data = unpack_strict(body)
    if not isinstance(data, dict):
        raise MalformedFrame(f"{type_name} body must be a map")
    schema = _SCHEMAS[cls]
    expected = {name for name, _ in schema}
    if set(data) != expected:
        missing = sorted(expected - set(data))
        extra = sorted(str(k) for k in set(data) - expected)
        raise MalformedFrame(f"{type_name} fields mismatch: missing={missing} extra={extra}")
    try:
        return cls(**{name: check(data[name]) for name, check in schema})
    except RecursionError:
        raise MalformedFrame("nesting too deep") from None


def message_type(message: Any) -> str:
    return type(message).__name__
