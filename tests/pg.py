"""PostgreSQL for the store's tests: a fresh, uniquely named database per test on the machine's
server (127.0.0.1:5432), dropped afterwards, so tests never see each other's rows.

The server is reached as `$PGUSER`, else `root`, else `postgres`, through the database `test`
(trust authentication, as on CI's machines; `.ci/run` starts PostgreSQL where it is not
running). Where none answers, the PostgreSQL variants of the tests skip and say why, unless
`EMBER_REQUIRE_POSTGRES=1` (CI), where they fail instead.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

HOST = os.environ.get("EMBER_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("EMBER_TEST_PG_PORT", "5432"))
ADMIN_DB = "test"
REQUIRED = os.environ.get("EMBER_REQUIRE_POSTGRES") == "1"


def _users() -> list[str]:
    given = os.environ.get("PGUSER")
    return [given] if given else ["root", "postgres"]


@functools.cache
def server() -> tuple[str | None, str]:
    """(the user that may create databases, "") or (None, why PostgreSQL cannot be used)."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed (pip install 'psycopg[binary]')"
    problems = []
    for user in _users():
        try:
            with psycopg.connect(
                host=HOST, port=PORT, dbname=ADMIN_DB, user=user, connect_timeout=3
            ) as conn:
                row = conn.execute(
                    "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
                ).fetchone()
        except psycopg.Error as exc:
            problems.append(f"as {user}: {' '.join(str(exc).split())}")
            continue
        if row and row[0]:
            return user, ""
        problems.append(f"as {user}: the role may not create databases")
    where = f"{HOST}:{PORT}, database {ADMIN_DB!r}"
    return None, f"no usable PostgreSQL at {where} ({'; '.join(problems)})"


def url(user: str, database: str) -> str:
    return f"postgresql+psycopg://{user}@{HOST}:{PORT}/{database}"


def require() -> str:
    """The user to connect as; skips the test (fails it under EMBER_REQUIRE_POSTGRES=1) where
    PostgreSQL cannot be used."""
    user, why = server()
    if user is None:
        if REQUIRED:
            pytest.fail(f"EMBER_REQUIRE_POSTGRES=1, but {why}")
        pytest.skip(why)
    return user


def _admin(sql: str) -> None:
    import psycopg

    user = require()
    with psycopg.connect(
        host=HOST, port=PORT, dbname=ADMIN_DB, user=user, autocommit=True, connect_timeout=10
    ) as conn:
        conn.execute(sql)  # type: ignore[arg-type]  # only names made here, no user input


@contextmanager
def database() -> Iterator[str]:
    """A new empty database for one test, its SQLAlchemy URL; dropped (connections and all)
    when the test is done."""
    user = require()
    name = f"ember_t_{secrets.token_hex(6)}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield url(user, name)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
