"""Find the test PostgreSQL server and give each test its own schema.

The server comes from `scripts/ci_postgres.sh` (CI runs it from `.ci/run`; a developer runs it
once). Its DSN is read from `CONDUCTORD_TEST_POSTGRES_DSN`, else from the file the script
writes (`$CONDUCTORD_PG_DIR/dsn`, default /tmp/conductord-postgres/dsn).

Without a server (or without psycopg) PostgreSQL tests FAIL when `CI` is set, so CI can never
pass by skipping them, and skip elsewhere with the reason and the command that fixes it.

Isolation: each test gets a fresh schema `t_<random>` and a DSN whose `search_path` points at
it (`options=-csearch_path=…`), so every connection of every process using that DSN, Control
API subprocesses included, sees only that test's tables; the schema is dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

DSN_ENV = "CONDUCTORD_TEST_POSTGRES_DSN"
HOW_TO = "run `bash scripts/ci_postgres.sh` (or set CONDUCTORD_TEST_POSTGRES_DSN)"


def dsn_file() -> Path:
    return Path(os.environ.get("CONDUCTORD_PG_DIR") or "/tmp/conductord-postgres") / "dsn"


def find_dsn() -> str | None:
    """The test server's DSN, or None when none is configured."""
    given = os.environ.get(DSN_ENV, "").strip()
    if given:
        return given
    try:
        return dsn_file().read_text().strip() or None
    except OSError:
        return None


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere: CI must run the PostgreSQL tests for real."""
    message = f"PostgreSQL tests need a server: {reason}; {HOW_TO}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)")
    pytest.skip(message)


def require_dsn() -> str:
    """The DSN of a reachable server, or fail/skip (see `unavailable`)."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed (pip install -e '.[test]')")
    dsn = find_dsn()
    if dsn is None:
        unavailable(f"no {DSN_ENV} and no {dsn_file()}")
    try:
        with psycopg.connect(dsn, connect_timeout=5):
            pass
    except psycopg.Error as exc:
        # The reason names host and port only: the DSN carries a password.
        unavailable(f"cannot connect ({type(exc).__name__})")
    return dsn


def with_search_path(dsn: str, schema: str) -> str:
    """`dsn` whose sessions use `schema` (URL form, as `--db` takes it)."""
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-csearch_path={schema}')}"


def admin(dsn: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


@contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """Create a schema for one test; yield a DSN bound to it; drop it afterwards."""
    schema = f"t_{secrets.token_hex(6)}"
    admin(dsn, f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(dsn, schema)
    finally:
        admin(dsn, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
