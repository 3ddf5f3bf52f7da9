"""PostgreSQL for the test suite: one throwaway server per test session, one database in
it, and a fresh schema per test (``benchmarks.pgserver`` starts and removes the server).

Why a schema per test: tests must not see each other's rows, and a new schema costs a
few milliseconds where ``CREATE DATABASE`` cost 0.5 s on this loaded 2-core machine
(it WAL-logs the whole template). The store is pointed at it the way an operator
would keep the CPM in its own schema (``?options=-csearch_path%3D<schema>``): the
schema is missing until the first read-write open creates it, so the contract's
"empty store" is the real thing. ``new_database()`` gives a whole database where a test
needs one. The server starts on the first test that asks for it —
a run that selects no PostgreSQL test never starts one — and is stopped and deleted at
the end of the session, whether the tests passed, failed or were interrupted.

Where no server binary exists, every test that needs one skips, loudly: the reason
names what is missing, shows in ``-rs`` and, for a plain ``pytest -q``, in the warnings
summary — a backend whose tests silently did nothing would look green. ``.ci/run``
installs Debian's ``postgresql`` so CI always runs them.

Fixtures (imported by tests/conftest.py): ``pg_server`` (session) → ``PgTestServer``;
``pg_url`` → the URL of a new, empty store (a schema not created yet).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.pgserver import PgServer, PgServerUnavailable


class PgTestServer:
    """The session's server plus an admin connection for fast ``CREATE DATABASE``."""

    def __init__(self, server: PgServer) -> None:
        import psycopg

        self.server = server
        self.admin: Any = psycopg.connect(server.url(), autocommit=True)
        self.admin.execute('CREATE DATABASE "knexa"')
        self._n = 0

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, dbname: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return self.server.url(dbname) + (f"?{query}" if query else "")

    def new_store(self) -> str:
        """The location of a new, empty store: a schema of the ``knexa`` database that
        does not exist yet (the first read-write ``open_store`` creates it)."""
        self._n += 1
        return self.url("knexa", options=f"-csearch_path%3Dt_{self._n}")

    def new_database(self, prefix: str = "t") -> str:
        """A new, empty database (dropped with the server at the end of the session)."""
        self._n += 1
        name = f"{prefix}_{self._n}"
        self.admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sql(self, url: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on the database of ``url`` behind the store's back (a test
        corrupting or inspecting state); returns its rows."""
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(statement, args or None)
            return cur.fetchall() if cur.description is not None else []

    def close(self) -> None:
        try:
            self.admin.close()
        finally:
            self.server.stop()



def _unavailable(reason: str) -> None:
    message = f"PostgreSQL tests not run: {reason}"
    warnings.warn(message, UserWarning, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgTestServer]:
    try:
        server = PgServer()
    except PgServerUnavailable as exc:
        _unavailable(str(exc))
    try:
        server.start()
        test_server = PgTestServer(server)
    except BaseException:
        server.stop()
        raise
    try:
        yield test_server
    finally:
        test_server.close()


@pytest.fixture()
def pg_url(pg_server: PgTestServer) -> str:
    return pg_server.new_store()
