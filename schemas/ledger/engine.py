"""The ledger's database: the engine, the schema check, and the one edge where database
errors become skufleet's.

Every statement of the ledger runs inside :func:`translated`, or inside :func:`begin` or
:func:`connect`, which open a transaction or a connection within it: the driver's and
SQLAlchemy's failures reach callers as :class:`~skufleet.schemas.errors.LedgerUnavailable`
(retryable), naming the database without its password. Callers that pass a Connection into
the ledger open it with :func:`begin` or :func:`connect` for the same reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from skufleet.schemas.errors import LedgerUnavailable, SchemaMissingError
from skufleet.schemas.tables import SCHEMA_REVISION


def utcnow() -> datetime:
    """Now, in UTC: every time the ledger records is one of these."""
    return datetime.now(UTC)


def create_engine(url: str) -> Engine:
    """An engine for the ledger at ``url``, set up for many concurrent workers.

    A plain ``postgresql://`` URL is served by psycopg 3, the driver skufleet installs.
    SQLite gets WAL, a 30 s busy timeout and ``BEGIN IMMEDIATE`` transactions, so that
    several worker processes on one machine queue for the write lock instead of failing.
    """
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        # pre_ping replaces connections the server dropped (restart, pg_terminate_backend).
        return sa.create_engine(parsed, pool_pre_ping=True, pool_recycle=1800)

    engine = sa.create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def describe(engine: Engine) -> str:
    """The engine's URL without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)


def unavailable(exc: DBAPIError | PoolTimeout, engine: Engine) -> LedgerUnavailable:
    """The retryable error :func:`translated` raises for ``exc``, naming the database but
    not its password: "cannot reach" when no statement got as far as the database (the
    connection failed), "failed" when one did."""
    if not isinstance(exc, DBAPIError):
        return LedgerUnavailable(f"ledger at {describe(engine)} failed: {exc}")
    if exc.statement is None:
        return LedgerUnavailable(f"cannot reach the ledger at {describe(engine)}: {exc.orig}")
    return LedgerUnavailable(f"ledger at {describe(engine)} failed: {exc.orig!r}")


@contextlib.contextmanager
def translated(engine: Engine) -> Iterator[None]:
    """Raise the database's failures inside the block as LedgerUnavailable.

    That is every error of the driver (DBAPIError: refused, dropped, timed out, or a
    statement the database refused) and a connection pool that had no connection to give
    in time. Everything else (a skufleet error, a bug) passes through unchanged.
    """
    try:
        yield
    except (DBAPIError, PoolTimeout) as exc:
        raise unavailable(exc, engine) from exc


@contextlib.contextmanager
def begin(engine: Engine) -> Iterator[Connection]:
    """A transaction on the ledger, committed when the block ends (rolled back if it
    raises), with the database's failures raised as LedgerUnavailable."""
    with translated(engine), engine.begin() as conn:
        yield conn


@contextlib.contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A connection to the ledger for reading, with the database's failures raised as
    LedgerUnavailable; whatever it has not committed is rolled back when the block ends."""
    with translated(engine), engine.connect() as conn:
        yield conn


def require_schema(engine: Engine) -> None:
    """Raise a plain-spoken error unless the ledger's tables exist at this code's revision."""
    with connect(engine) as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            raise SchemaMissingError(
                f"the ledger at {describe(engine)} has no skufleet tables yet: "
                "run `skufleet db upgrade` first"
            )
        revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    if revision != SCHEMA_REVISION:
        raise SchemaMissingError(
            f"the ledger at {describe(engine)} is at schema revision {revision}, this skufleet "
            f"needs {SCHEMA_REVISION}: run `skufleet db upgrade`"
        )
