"""Hypothesis strategies for every protocol message, derived from the dataclass types."""

from __future__ import annotations

import dataclasses
import types
import typing

from hypothesis import strategies as st

from protocol import messages as m

_scalars = {
    int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
    float: st.floats(allow_nan=False, allow_infinity=False),
    str: st.text(max_size=40),
    bytes: st.binary(max_size=64),
    bool: st.booleans(),
    type(None): st.none(),
}
_any_scalar = st.one_of(*_scalars.values())


def strategy_for(tp: typing.Any) -> st.SearchStrategy:
    if tp == m.Row:
        return st.lists(st.tuples(st.text(max_size=10), _any_scalar), max_size=4).map(tuple)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(a) for a in typing.get_args(tp)))
    if origin is tuple:
        return st.lists(strategy_for(typing.get_args(tp)[0]), max_size=5).map(tuple)
    return _scalars[tp]


def message_strategy(cls: type) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls, vars(m))
    return st.builds(cls, **{f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)})


any_message = st.one_of(*(message_strategy(c) for c in m.MESSAGE_TYPES.values()))
