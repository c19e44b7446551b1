"""Persistence of tenants (versioned) and API-registered adapters.

`Store` is the narrow interface the servicers use. `SqlStore` implements it once, in SQL that
SQLite and PostgreSQL both accept (no UPSERT, no RETURNING, no dialect-only types), over a small
`Database` layer that says how to connect, begin a transaction and spell a placeholder:
`SqliteStore` (one file, this module) and `PostgresStore` (`store_postgres.py`, shared by
replicas). Inputs are validated before they reach the store: it stores what it is given.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from loramerge.merge_engine import TaraPhi
from loramerge.merge_engine.methods.tara import float32_bytes, tensor_from_float32_bytes

from .domain import (
    AdapterRegistration,
    ApiKey,
    MergeChoice,
    TenantRecord,
    TunedSummary,
    TunedWeights,
    validate_tenant_id,
)
from .errors import AlreadyExistsError, ConfigError, ConflictError, NotFoundError

logger = logging.getLogger(__name__)


class Store(Protocol):
    """Tenants and registered adapters. Every method is blocking; the server calls them from
    worker threads (`asyncio.to_thread`), so implementations are thread-safe."""

    def set_tenant(
        self,
        tenant_id: str,
        preference: Mapping[str, float],
        merge: MergeChoice,
        expected_version: int | None = None,
        tuned: TunedWeights | None = None,
    ) -> TenantRecord:
        """Store a new version of the tenant (1 for the first, then +1) and return it.
        With `expected_version`, store only if the latest version equals it (0: the tenant must
        not exist yet), else raise `ConflictError` naming the current version. `tuned` gives
        the version TARA weights φ (stored once per content, by digest)."""
        ...

    def get_phi(self, digest: str) -> TaraPhi:
        """The TARA weights φ with this digest (`NotFoundError` if none is stored)."""
        ...

    def get_tenant(self, tenant_id: str, version: int | None = None) -> TenantRecord:
        """The latest version, or the given one. `NotFoundError` (field "tenant_id" or
        "version") if there is none."""
        ...

    def list_tenants(self, limit: int, after: str | None = None) -> list[TenantRecord]:
        """At most `limit` tenants' latest versions, ordered by id, with ids after `after`."""
        ...

    def delete_tenant(self, tenant_id: str) -> None:
        """Delete the tenant with its whole history (`NotFoundError` if absent)."""
        ...

    def add_adapter(self, name: str, path: Path) -> AdapterRegistration:
        """Record an adapter registered through the API (`AlreadyExistsError` if the name is)."""
        ...

    def remove_adapter(self, name: str) -> None:
        """Forget a registered adapter (`NotFoundError` if absent)."""
        ...

    def list_adapters(self) -> list[AdapterRegistration]:
        """The registered adapters, ordered by name."""
        ...

    def add_api_key(self, key: ApiKey) -> None:
        """Store a new API key (its hash; `AlreadyExistsError` if the id is taken)."""
        ...

    def get_api_key(self, key_id: str) -> ApiKey | None:
        """The key with this id, revoked or not; None if there is none."""
        ...

    def list_api_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, ordered by creation time."""
        ...

    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Mark the key revoked (idempotent) and return it (`NotFoundError` if absent)."""
        ...

    def close(self) -> None: ...


SQLITE_SCHEME = "sqlite"
POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_store(url_or_path: str) -> Store:
    """The store a configuration names: `postgresql://user@host:port/db` (libpq URL; replicas
    share it), `sqlite:///abs/path.db` (`sqlite:///~/x.db` is under the home directory) or a
    plain file path. Other schemes raise `ConfigError`."""
    scheme, separator, rest = url_or_path.partition("://")
    if not separator:
        if not url_or_path.strip():
            raise ConfigError("the store URL is empty", "store.url")
        return SqliteStore(Path(url_or_path).expanduser())
    # Only the scheme goes into messages: a database URL may carry a password.
    if scheme.lower() in POSTGRES_SCHEMES:
        from .store_postgres import PostgresStore

        return PostgresStore(url_or_path)
    if scheme.lower() != SQLITE_SCHEME:
        raise ConfigError(
            f"unsupported store scheme {scheme!r}; supported: 'sqlite:///absolute/path.db', "
            "a plain file path or 'postgresql://user@host:port/database'",
            "store.url",
        )
    if not rest.startswith("/") or rest == "/":
        raise ConfigError(
            "a sqlite store URL needs a path after three slashes: 'sqlite:///absolute/path.db'",
            "store.url",
        )
    path = Path(rest[1:]).expanduser() if rest.startswith("/~") else Path(rest)
    return SqliteStore(path)


# --- the database layer -------------------------------------------------------------------------


class Cursor(Protocol):
    """What `SqlStore` reads from a statement's result (DB-API 2.0)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Database(Protocol):
    """One connection to one database, in the shape `SqlStore` uses: statements with `?`
    placeholders, and explicit transactions. Implementations raise `ConfigError` when they cannot
    open the database and `StoreUnavailableError` when it goes away later."""

    name: str
    """How messages name the database (a path, or a URL without its password)."""
    key_type: str
    """Column type of text keys, compared and ordered byte by byte (as SQLite's TEXT is)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def begin(self, write: bool) -> None:
        """Start a transaction. A write transaction excludes every other writer of the same
        database (other connections and processes too) until it ends, so that a writer never
        reads a version that another writer is about to take; a read transaction sees one
        snapshot."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """End the current transaction, if any, without its changes."""
        ...

    def close(self) -> None: ...


# --- schema -------------------------------------------------------------------------------------

_Migration = Callable[[Database], None]


def _migrate_0_to_1(db: Database) -> None:
    # `tenants` holds one row per live tenant and its latest version: the row a writer checks;
    # `tenant_versions` is the history.
    db.execute(
        f"""
        CREATE TABLE tenants (
            tenant_id {db.key_type} PRIMARY KEY,
            latest_version INTEGER NOT NULL
        )
        """
    )
    db.execute(
        f"""
        CREATE TABLE tenant_versions (
            tenant_id {db.key_type} NOT NULL
                REFERENCES tenants (tenant_id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            preference TEXT NOT NULL,  -- JSON object: adapter name -> weight
            merge TEXT NOT NULL,       -- JSON: MergeChoice.to_json()
            updated_at TEXT NOT NULL,  -- ISO 8601, UTC offset included
            PRIMARY KEY (tenant_id, version)
        )
        """
    )
    db.execute(
        f"""
        CREATE TABLE adapters (
            name {db.key_type} PRIMARY KEY,
            path TEXT NOT NULL,
            registered_at TEXT NOT NULL  -- ISO 8601, UTC offset included
        )
        """
    )


def _migrate_1_to_2(db: Database) -> None:
    # API keys: only a slow salted hash of the secret is stored (server/auth.py). Booleans are
    # INTEGER 0/1 and times ISO 8601 TEXT, which SQLite and PostgreSQL both accept.
    db.execute(
        f"""
        CREATE TABLE api_keys (
            key_id {db.key_type} PRIMARY KEY,
            secret_hash TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('admin', 'tenant')),
            tenant_id TEXT,               -- NULL for admin keys
            allow_inline INTEGER NOT NULL,
            created_at TEXT NOT NULL,     -- ISO 8601, UTC offset included
            revoked_at TEXT               -- NULL while the key is valid
        )
        """
    )


def _migrate_2_to_3(db: Database) -> None:
    # TARA weights φ: a tenant version names its φ by digest (with a JSON summary of what φ was
    # tuned for); φ itself (tens of KiB) is stored once per content in `tuned_weights`, so that
    # reading a tenant stays cheap and versions that keep the same φ share it.
    db.execute("ALTER TABLE tenant_versions ADD COLUMN tuned_digest TEXT")  # NULL: no φ
    db.execute("ALTER TABLE tenant_versions ADD COLUMN tuned TEXT")  # JSON: TunedSummary
    db.execute(
        f"""
        CREATE TABLE tuned_weights (
            digest {db.key_type} PRIMARY KEY,  -- SHA-256 of φ (TaraPhi.digest)
            phi TEXT NOT NULL,                 -- JSON: adapters, and per module shape + base64
            created_at TEXT NOT NULL           -- ISO 8601, UTC offset included
        )
        """
    )


# Step i takes the schema from version i to i + 1. Released steps never change: a new schema
# appends a step (a function, so that it can rewrite data as well as tables).
_MIGRATIONS: tuple[_Migration, ...] = (_migrate_0_to_1, _migrate_1_to_2, _migrate_2_to_3)
SCHEMA_VERSION = len(_MIGRATIONS)


# --- the store ----------------------------------------------------------------------------------


class SqlStore:
    """`Store` over one `Database` connection.

    Thread safety: one connection guarded by a lock. Every operation is a few indexed
    statements (well under a millisecond locally), so serialising them costs nothing next to a
    merge, and a single connection is closed deterministically by `close()`, unlike per-thread
    connections that outlive the executor's threads. Writers in other connections or processes
    (a second replica, the CLI) are excluded by the database's write transactions
    (`Database.begin(write=True)`). The schema is migrated on open, inside a write transaction,
    so replicas starting together migrate once.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        try:
            self._migrate()
        except BaseException:
            db.close()
            raise

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
            current = 0 if row is None else int(row[0])
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"the store {self._db.name!r} has schema version {current}, but this "
                    f"loramerge only knows versions up to {SCHEMA_VERSION}; upgrade loramerge "
                    "or point it at another store"
                )
            for version in range(current, SCHEMA_VERSION):
                logger.info(
                    "store %s: migrating schema %d -> %d", self._db.name, version, version + 1
                )
                _MIGRATIONS[version](conn)
            if row is None:
                conn.execute(
                    "INSERT INTO schema_version (id, version) VALUES (1, ?)", (SCHEMA_VERSION,)
                )
            elif current < SCHEMA_VERSION:
                conn.execute(
                    "UPDATE schema_version SET version = ? WHERE id = 1", (SCHEMA_VERSION,)
                )

    @contextmanager
    def _write(self) -> Iterator[Database]:
        """One write transaction: committed on success, rolled back on any exception."""
        with self._lock:
            self._db.begin(write=True)
            try:
                yield self._db
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise

    @contextmanager
    def _read(self) -> Iterator[Database]:
        """One read transaction, so that several statements see one snapshot."""
        with self._lock:
            self._db.begin(write=False)
            try:
                yield self._db
            finally:
                self._db.rollback()  # nothing to keep; ends the snapshot

    # --- tenants ---

    def set_tenant(
        self,
        tenant_id: str,
        preference: Mapping[str, float],
        merge: MergeChoice,
        expected_version: int | None = None,
        tuned: TunedWeights | None = None,
    ) -> TenantRecord:
        validate_tenant_id(tenant_id)
        # allow_nan=False: NaN is not JSON (PostgreSQL's jsonb rejects it); validation upstream
        # keeps it out, so reaching this raises ValueError as the bug it would be.
        preference_json = json.dumps(
            {name: float(weight) for name, weight in preference.items()},
            sort_keys=True,
            allow_nan=False,
        )
        merge_json = json.dumps(merge.to_json(), sort_keys=True, allow_nan=False)
        digest = tuned.summary.digest if tuned is not None else None
        tuned_json = (
            json.dumps(tuned.summary.to_json(), sort_keys=True, allow_nan=False)
            if tuned is not None
            else None
        )
        with self._write() as conn:
            updated_at = _now()  # inside the write lock: later versions never get earlier times
            row = conn.execute(
                "SELECT latest_version FROM tenants WHERE tenant_id = ?", (tenant_id,)
            ).fetchone()
            current = 0 if row is None else int(row[0])
            if expected_version is not None and expected_version != current:
                state = f"is at version {current}" if current else "does not exist (version 0)"
                raise ConflictError(
                    f"tenant {tenant_id!r} {state}, not at version {expected_version}",
                    "expected_version",
                )
            version = current + 1
            if row is None:
                conn.execute(
                    "INSERT INTO tenants (tenant_id, latest_version) VALUES (?, ?)",
                    (tenant_id, version),
                )
            else:
                conn.execute(
                    "UPDATE tenants SET latest_version = ? WHERE tenant_id = ?",
                    (version, tenant_id),
                )
            if tuned is not None and not self._has_phi(conn, tuned.phi.digest):
                conn.execute(
                    "INSERT INTO tuned_weights (digest, phi, created_at) VALUES (?, ?, ?)",
                    (tuned.phi.digest, _phi_text(tuned.phi), updated_at.isoformat()),
                )
            conn.execute(
                "INSERT INTO tenant_versions (tenant_id, version, preference, merge, updated_at,"
                " tuned_digest, tuned) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant_id,
                    version,
                    preference_json,
                    merge_json,
                    updated_at.isoformat(),
                    digest,
                    tuned_json,
                ),
            )
        # Decoded from what was stored, so that this equals what get_tenant returns later.
        return _tenant(
            tenant_id, version, preference_json, merge_json, updated_at.isoformat(), tuned_json
        )

    @staticmethod
    def _has_phi(conn: Database, digest: str) -> bool:
        query = "SELECT 1 FROM tuned_weights WHERE digest = ?"
        return conn.execute(query, (digest,)).fetchone() is not None

    def get_phi(self, digest: str) -> TaraPhi:
        with self._read() as conn:
            row = conn.execute(
                "SELECT phi FROM tuned_weights WHERE digest = ?", (digest,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no TARA weights {digest[:16]}… are stored", "phi_digest")
        phi = _phi_from_text(row[0])
        if phi.digest != digest:
            raise ValueError(f"the stored TARA weights {digest[:16]}… do not match their digest")
        return phi

    def get_tenant(self, tenant_id: str, version: int | None = None) -> TenantRecord:
        with self._read() as conn:
            if version is None:
                row = conn.execute(
                    f"{_SELECT_LATEST} WHERE t.tenant_id = ?", (tenant_id,)
                ).fetchone()
            else:
                row = conn.execute(
                    f"{_SELECT_VERSION} WHERE tenant_id = ? AND version = ?", (tenant_id, version)
                ).fetchone()
            if row is None and version is not None and self._tenant_exists(conn, tenant_id):
                raise NotFoundError(f"tenant {tenant_id!r} has no version {version}", "version")
        if row is None:
            raise NotFoundError(f"no tenant {tenant_id!r}", "tenant_id")
        return _tenant(*row)

    @staticmethod
    def _tenant_exists(conn: Database, tenant_id: str) -> bool:
        query = "SELECT 1 FROM tenants WHERE tenant_id = ?"
        return conn.execute(query, (tenant_id,)).fetchone() is not None

    def list_tenants(self, limit: int, after: str | None = None) -> list[TenantRecord]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        # Byte order in both dialects: the key columns are declared with `Database.key_type`.
        with self._read() as conn:
            rows = conn.execute(
                f"{_SELECT_LATEST} WHERE t.tenant_id > ? ORDER BY t.tenant_id LIMIT ?",
                ("" if after is None else after, limit),
            ).fetchall()
        return [_tenant(*row) for row in rows]

    def delete_tenant(self, tenant_id: str) -> None:
        with self._write() as conn:
            # ON DELETE CASCADE removes the history.
            deleted = conn.execute("DELETE FROM tenants WHERE tenant_id = ?", (tenant_id,))
            if deleted.rowcount == 0:
                raise NotFoundError(f"no tenant {tenant_id!r}", "tenant_id")
            conn.execute(
                "DELETE FROM tuned_weights WHERE digest NOT IN (SELECT tuned_digest"
                " FROM tenant_versions WHERE tuned_digest IS NOT NULL)"
            )

    # --- adapters ---

    def add_adapter(self, name: str, path: Path) -> AdapterRegistration:
        with self._write() as conn:
            registered_at = _now()
            if conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone():
                raise AlreadyExistsError(f"adapter {name!r} is already registered", "name")
            conn.execute(
                "INSERT INTO adapters (name, path, registered_at) VALUES (?, ?, ?)",
                (name, str(path), registered_at.isoformat()),
            )
        return AdapterRegistration(name=name, path=Path(path), registered_at=registered_at)

    def remove_adapter(self, name: str) -> None:
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM adapters WHERE name = ?", (name,))
            if deleted.rowcount == 0:
                raise NotFoundError(f"no registered adapter {name!r}", "name")

    def list_adapters(self) -> list[AdapterRegistration]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT name, path, registered_at FROM adapters ORDER BY name"
            ).fetchall()
        return [
            AdapterRegistration(
                name=name, path=Path(path), registered_at=datetime.fromisoformat(registered_at)
            )
            for name, path, registered_at in rows
        ]

    # --- API keys ---

    def add_api_key(self, key: ApiKey) -> None:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (key.key_id,)).fetchone():
                raise AlreadyExistsError(f"API key {key.key_id!r} exists", "key_id")
            conn.execute(
                f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key.key_id,
                    key.secret_hash,
                    key.role,
                    key.tenant_id,
                    int(key.allow_inline),
                    key.created_at.isoformat(),
                    key.revoked_at.isoformat() if key.revoked_at else None,
                ),
            )

    def get_api_key(self, key_id: str) -> ApiKey | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if row is None else _api_key(*row)

    def list_api_keys(self) -> list[ApiKey]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
            ).fetchall()
        return [_api_key(*row) for row in rows]

    def revoke_api_key(self, key_id: str) -> ApiKey:
        with self._write() as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (_now().isoformat(), key_id),
            )
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no API key {key_id!r}", "key_id")
        return _api_key(*row)

    def close(self) -> None:
        with self._lock:
            self._db.close()


_KEY_COLUMNS = "key_id, secret_hash, role, tenant_id, allow_inline, created_at, revoked_at"


def _api_key(
    key_id: str,
    secret_hash: str,
    role: str,
    tenant_id: str | None,
    allow_inline: int,
    created_at: str,
    revoked_at: str | None,
) -> ApiKey:
    return ApiKey(
        key_id=key_id,
        secret_hash=secret_hash,
        role=role,
        tenant_id=tenant_id,
        allow_inline=bool(allow_inline),
        created_at=datetime.fromisoformat(created_at),
        revoked_at=datetime.fromisoformat(revoked_at) if revoked_at else None,
    )


_COLUMNS = "tenant_id, version, preference, merge, updated_at, tuned"
_SELECT_VERSION = f"SELECT {_COLUMNS} FROM tenant_versions"
_SELECT_LATEST = (
    "SELECT v.tenant_id, v.version, v.preference, v.merge, v.updated_at, v.tuned"
    " FROM tenants t JOIN tenant_versions v"
    " ON v.tenant_id = t.tenant_id AND v.version = t.latest_version"
)


def _now() -> datetime:
    return datetime.now(UTC)


def _tenant(
    tenant_id: str,
    version: int,
    preference: str,
    merge: str,
    updated_at: str,
    tuned: str | None = None,
) -> TenantRecord:
    weights: dict[str, Any] = json.loads(preference)
    return TenantRecord(
        tenant_id=tenant_id,
        preference=MappingProxyType({name: float(weight) for name, weight in weights.items()}),
        merge=MergeChoice.from_json(json.loads(merge)),
        version=int(version),
        updated_at=datetime.fromisoformat(updated_at),
        tuned=TunedSummary.from_json(json.loads(tuned)) if tuned else None,
    )


def _phi_text(phi: TaraPhi) -> str:
    """φ as JSON: its adapters and, per module, the shape and the float32 values (little
    endian, base64). Exact: decoding gives the same digest."""
    modules = {
        key: {
            "shape": list(value.shape),
            "values": base64.b64encode(float32_bytes(value)).decode(),
        }
        for key, value in phi.modules.items()
    }
    return json.dumps({"adapters": list(phi.adapters), "modules": modules}, sort_keys=True)


def _phi_from_text(text: str) -> TaraPhi:
    data = json.loads(text)
    modules = {}
    for key, item in data["modules"].items():
        modules[key] = tensor_from_float32_bytes(base64.b64decode(item["values"]), item["shape"])
    return TaraPhi(data["adapters"], modules)


# --- SQLite -------------------------------------------------------------------------------------


class SqliteDatabase:
    """`Database` on one SQLite file: WAL journal, foreign keys on, synchronous=NORMAL. Write
    transactions are `BEGIN IMMEDIATE`, which takes SQLite's write lock up front."""

    key_type = "TEXT"  # SQLite compares TEXT byte by byte (BINARY collation)

    def __init__(self, path: Path, busy_timeout_seconds: float = 5.0) -> None:
        self.name = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; begin/commit are explicit.
        self._conn = sqlite3.connect(
            path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
        )
        try:
            (mode,) = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":  # e.g. a file system without shared memory
                logger.warning("store %s: WAL journal unavailable, using %s", path, mode)
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
            self._conn.close()
            raise ConfigError(f"cannot open the store {self.name!r}: {exc}") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._conn.execute(sql, params)

    def begin(self, write: bool) -> None:
        self.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


class SqliteStore(SqlStore):
    """`Store` on one SQLite file (see `SqliteDatabase`). Other processes may open the same
    file; a second host may not (SQLite over a network file system loses locks): replicas share
    a `PostgresStore` instead."""

    def __init__(self, path: Path, busy_timeout_seconds: float = 5.0) -> None:
        self.path = path
        super().__init__(SqliteDatabase(path, busy_timeout_seconds))
