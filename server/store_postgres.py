"""The PostgreSQL `Database` for `SqlStore`: the tenant store that replicas share.

Chosen by a `postgresql://` (or `postgres://`) store URL in libpq's syntax, e.g.
`postgresql://loramerge@db:5432/loramerge?sslmode=require`; a password is best given by
`PGPASSWORD` or a `.pgpass` file rather than in the URL (and never appears in messages).
Writers take one transaction-level advisory lock, the equivalent of SQLite's `BEGIN IMMEDIATE`:
writes from every replica are serialised (they are rare: tenant and adapter changes), reads are
not. Tables live in the connection's `search_path` (`?options=-csearch_path%3Dname` picks a
schema).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import pq

from .errors import ConfigError, StoreUnavailableError
from .store import Cursor, SqlStore

# One lock for every loramerge writer on the database; a constant, so all replicas agree.
WRITE_LOCK_KEY = zlib.crc32(b"loramerge.store.write")


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return f"{url.partition('://')[0]}://(unparsable URL)"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))


class PostgresDatabase:
    """`Database` on one psycopg connection in autocommit mode, with explicit transactions:
    writes run at READ COMMITTED after taking `WRITE_LOCK_KEY` (each statement then sees every
    write committed before the lock was granted); reads run in a REPEATABLE READ snapshot.
    A broken connection (server restart, failover) is reopened at the next transaction."""

    key_type = 'TEXT COLLATE "C"'  # byte order, as SQLite's TEXT, whatever the database locale

    def __init__(self, url: str, connect_timeout_seconds: int = 10) -> None:
        self.name = redact(url)
        self._url = url
        self._password = urlsplit(url).password
        self._timeout = connect_timeout_seconds
        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            raise ConfigError(
                f"cannot connect to the store {self.name!r}: {self._clean(exc)}", "store.url"
            ) from None

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)

    def _clean(self, exc: BaseException) -> str:
        message = str(exc).strip()
        return message.replace(self._password, "***") if self._password else message

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if params:
            sql = sql.replace("%", "%%").replace("?", "%s")
        try:
            return self._conn.execute(sql, params or None)
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(
                f"the store {self.name!r} is unavailable: {self._clean(exc)}"
            ) from None

    def begin(self, write: bool) -> None:
        statement = (
            "BEGIN ISOLATION LEVEL READ COMMITTED"
            if write
            else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        )
        try:
            self.execute(statement)
        except StoreUnavailableError:
            # The connection was cut since the last transaction (restart, failover, idle
            # timeout): nothing has run yet, so open a new one and begin again, once.
            if not (self._conn.broken or self._conn.closed):
                raise
            self._reconnect()
            self.execute(statement)
        if write:
            self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))

    def _reconnect(self) -> None:
        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot reconnect to the store {self.name!r}: {self._clean(exc)}"
            ) from None

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.broken or self._conn.closed:
            return  # the server ended the transaction with the connection
        if self._conn.info.transaction_status != pq.TransactionStatus.IDLE:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


class PostgresStore(SqlStore):
    """`Store` on a PostgreSQL database (see `PostgresDatabase`), shared by replicas."""

    def __init__(self, url: str, connect_timeout_seconds: int = 10) -> None:
        super().__init__(PostgresDatabase(url, connect_timeout_seconds))
