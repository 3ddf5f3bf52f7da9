"""p2p.settings: the one set of typed config checks both binaries use."""

from __future__ import annotations

import math

import pytest

from p2p.settings import expect_bool, expect_float, expect_int, expect_str, expect_str_list
from protocol.errors import ConfigError
from tests.assertions import raises_exactly


@pytest.mark.parametrize("value", [True, "3", 3.0, None])
def test_int_refuses_non_integers_bools_included(value) -> None:
    with raises_exactly(ConfigError, match="must be an integer"):
        expect_int("k", value)


def test_int_bounds_are_inclusive_and_optional() -> None:
    assert expect_int("k", 5, 5, 5) == 5 and expect_int("k", -7) == -7 and expect_int("k", 10**9, 0) == 10**9
    with raises_exactly(ConfigError, match=r"must be in \[1, 3\], got 4"):
        expect_int("k", 4, 1, 3)
    with raises_exactly(ConfigError, match=r"must be in \[1, ∞\], got 0"):
        expect_int("k", 0, 1)
    with raises_exactly(ConfigError, match=r"\(-∞, 3\]"):
        expect_int("k", 4, None, 3)


def test_float_is_finite_and_honours_an_open_lower_bound() -> None:
    assert expect_float("k", 2) == 2.0 and isinstance(expect_float("k", 2), float)
    assert expect_float("k", 0.0, 0.0) == 0.0
    with raises_exactly(ConfigError, match=r"must be in \(0.0, ∞\], got 0.0"):
        expect_float("k", 0.0, 0.0, lo_open=True)
    for bad in (math.nan, math.inf, -math.inf):
        with raises_exactly(ConfigError, match="must be in"):
            expect_float("k", bad)
    with raises_exactly(ConfigError, match="must be a number"):
        expect_float("k", False)
    with raises_exactly(ConfigError, match=r"got 2.5"):
        expect_float("k", 2.5, 0.0, 2.0)


def test_str_bool_and_list() -> None:
    assert expect_str("k", "a", ("a", "b")) == "a" and expect_str("k", "", allow_empty=True) == ""
    with raises_exactly(ConfigError, match="must be a non-empty string"):
        expect_str("k", "  ")
    with raises_exactly(ConfigError, match="must be a string, got 3"):
        expect_str("k", 3, allow_empty=True)
    with raises_exactly(ConfigError, match="must be one of a, b, got 'c'"):
        expect_str("k", "c", ("a", "b"))
    assert expect_bool("k", False) is False
    with raises_exactly(ConfigError, match="true or false"):
        expect_bool("k", 0)
    assert expect_str_list("k", ["x"]) == ["x"]
    for bad in ("x", ["x", 1]):
        with raises_exactly(ConfigError, match="list of strings"):
            expect_str_list("k", bad)
    err = pytest.raises(ConfigError, expect_int, "agent.seed", "x").value
    assert "agent.seed" in str(err)
