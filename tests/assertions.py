"""Assertion helpers shared by the suite."""

from __future__ import annotations

from typing import Any

import pytest


class raises_exactly:  # noqa: N801 — used like pytest.raises
    """``pytest.raises`` that refuses subclasses of the expected type.

    Our errors form a tree (``Expired`` and ``Replay`` are ``ProtocolError`` subclasses),
    so a check on a base class passes when the code fails for another reason — as the
    knowledge-stream tests did when their envelopes had expired.
    """

    def __init__(self, error: type[BaseException], match: str | None = None) -> None:
        self._error = error
        self._ctx = pytest.raises(error, match=match)
        self.info: Any = None

    def __enter__(self) -> Any:
        self.info = self._ctx.__enter__()
        return self.info

    def __exit__(self, *exc_info: Any) -> bool:
        handled = self._ctx.__exit__(*exc_info)
        got = self.info.value
        assert type(got) is self._error, f"expected exactly {self._error.__name__}, got {type(got).__name__}: {got}"
        return handled
