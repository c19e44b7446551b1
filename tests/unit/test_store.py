"""The store on both backends, each real: SQLite on files and PostgreSQL on a server started
for the session (tests/conftest.py). Versioned tenants, pagination, preconditions, restarts,
concurrent writers (two connections), registered adapters and the schema version."""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import torch

from loramerge.merge_engine import TaraPhi
from loramerge.server.domain import MergeChoice, TunedSummary, TunedWeights
from loramerge.server.errors import (
    AlreadyExistsError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    StoreUnavailableError,
)
from loramerge.server.store import SCHEMA_VERSION, SqliteStore, SqlStore, open_store
from loramerge.server.store_postgres import PostgresStore
from pgserver import PostgresServer

TIES = MergeChoice(method="ties", pico=True, params={"density": 0.5}, rank=8)


@dataclass
class Backend:
    """One database of one backend: `open()` gives a new store (a new connection) on it,
    `run()` executes SQL on it directly, `name` is how messages name it."""

    name: str
    open: Callable[[], SqlStore]
    run: Callable[[str], None]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "loramerge.db"  # the parent does not exist yet


def _sqlite_run(path: Path) -> Callable[[str], None]:
    def run(sql: str) -> None:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(sql)
        conn.close()

    return run


def _postgres_run(url: str) -> Callable[[str], None]:
    def run(sql: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)

    return run


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, db: Path) -> Backend:
    if request.param == "sqlite":
        return Backend(str(db), lambda: open_store(f"sqlite://{db}"), _sqlite_run(db))
    postgres: PostgresServer = request.getfixturevalue("postgres")
    url = postgres.create_database()
    return Backend(url, lambda: open_store(url), _postgres_run(url))


@pytest.fixture
def store(backend: Backend) -> Iterator[SqlStore]:
    opened = backend.open()
    yield opened
    opened.close()


def test_every_set_is_a_new_version_and_history_stays_readable(store: SqlStore) -> None:
    first = store.set_tenant("acme", {"code": 1.0}, MergeChoice())
    second = store.set_tenant("acme", {"code": 0.25, "math": 0.75}, TIES)
    store.set_tenant("globex", {"math": 1.0}, MergeChoice())  # versions are per tenant

    assert (first.version, second.version) == (1, 2)
    assert store.get_tenant("acme") == second
    assert store.get_tenant("acme", version=1) == first
    assert store.get_tenant("acme", version=2).preference == {"code": 0.25, "math": 0.75}
    assert store.get_tenant("acme").merge == TIES
    assert store.get_tenant("globex").version == 1
    assert second.updated_at.utcoffset() == timedelta(0)
    assert first.updated_at <= second.updated_at


def test_missing_tenant_or_version_names_the_field(store: SqlStore) -> None:
    with pytest.raises(NotFoundError) as absent:
        store.get_tenant("nobody")
    assert absent.value.field == "tenant_id"
    with pytest.raises(NotFoundError) as absent:
        store.get_tenant("nobody", version=1)
    assert absent.value.field == "tenant_id"

    store.set_tenant("acme", {"code": 1.0}, MergeChoice())
    for version in (0, 2):
        with pytest.raises(NotFoundError) as missing:
            store.get_tenant("acme", version=version)
        assert missing.value.field == "version"


def test_invalid_tenant_id_is_not_stored(store: SqlStore) -> None:
    with pytest.raises(InvalidRequestError) as invalid:
        store.set_tenant("no spaces", {"code": 1.0}, MergeChoice())
    assert invalid.value.field == "tenant_id"
    assert store.list_tenants(limit=10) == []


def test_list_gives_latest_versions_ordered_by_id_and_pages_with_after(
    store: SqlStore,
) -> None:
    for tenant_id in ["delta", "bravo", "alpha", "charlie"]:
        store.set_tenant(tenant_id, {"code": 1.0}, MergeChoice())
    store.set_tenant("bravo", {"math": 1.0}, TIES)

    page = store.list_tenants(limit=2)
    assert [(t.tenant_id, t.version) for t in page] == [("alpha", 1), ("bravo", 2)]
    assert page[1] == store.get_tenant("bravo")
    page = store.list_tenants(limit=2, after=page[-1].tenant_id)
    assert [t.tenant_id for t in page] == ["charlie", "delta"]
    assert store.list_tenants(limit=2, after="delta") == []
    assert [t.tenant_id for t in store.list_tenants(limit=10, after="b")] == [
        "bravo",
        "charlie",
        "delta",
    ]


def test_delete_removes_history_and_a_new_tenant_starts_at_version_1(
    store: SqlStore,
) -> None:
    for weight in (1.0, 2.0, 3.0):
        store.set_tenant("acme", {"code": weight}, MergeChoice())
    store.delete_tenant("acme")

    with pytest.raises(NotFoundError):
        store.get_tenant("acme")
    assert store.list_tenants(limit=10) == []
    reborn = store.set_tenant("acme", {"math": 1.0}, MergeChoice())
    assert reborn.version == 1
    assert store.get_tenant("acme", version=1).preference == {"math": 1.0}
    with pytest.raises(NotFoundError) as gone:
        store.get_tenant("acme", version=2)  # the old history went with the delete
    assert gone.value.field == "version"

    with pytest.raises(NotFoundError) as absent:
        store.delete_tenant("nobody")
    assert absent.value.field == "tenant_id"


def test_expected_version_is_a_precondition(store: SqlStore) -> None:
    assert store.set_tenant("acme", {"code": 1.0}, MergeChoice(), expected_version=0).version == 1
    with pytest.raises(ConflictError) as exists:
        store.set_tenant("acme", {"code": 2.0}, MergeChoice(), expected_version=0)
    assert exists.value.field == "expected_version"
    assert "version 1" in str(exists.value)

    assert store.set_tenant("acme", {"code": 2.0}, MergeChoice(), expected_version=1).version == 2
    with pytest.raises(ConflictError) as stale:
        store.set_tenant("acme", {"code": 9.0}, MergeChoice(), expected_version=1)
    assert "version 2" in str(stale.value)
    assert store.get_tenant("acme").preference == {"code": 2.0}  # nothing stored on conflict

    with pytest.raises(ConflictError) as absent:
        store.set_tenant("globex", {"code": 1.0}, MergeChoice(), expected_version=3)
    assert "does not exist" in str(absent.value)
    with pytest.raises(NotFoundError):
        store.get_tenant("globex")


def test_tenants_and_adapters_survive_a_restart(backend: Backend, tmp_path: Path) -> None:
    before = backend.open()
    stored = [
        before.set_tenant("acme", {"code": 1.0}, MergeChoice()),
        before.set_tenant("acme", {"code": 0.5, "math": 0.5}, TIES),
    ]
    registered = before.add_adapter("legal", tmp_path / "adapters" / "legal")
    before.close()

    after = backend.open()
    try:
        assert [after.get_tenant("acme", version=v) for v in (1, 2)] == stored
        assert after.list_adapters() == [registered]
        assert after.set_tenant("acme", {"code": 1.0}, MergeChoice()).version == 3
    finally:
        after.close()


def test_concurrent_sets_get_consecutive_versions(backend: Backend) -> None:
    """8 threads on two stores (two connections, as two replicas) on one database: the
    in-process lock and the database's write transactions both serialise the writers."""
    threads, sets_each = 8, 50
    stores = [backend.open(), backend.open()]
    start = threading.Barrier(threads)

    def writer(index: int) -> list[int]:
        start.wait()
        store = stores[index % len(stores)]
        return [
            store.set_tenant("acme", {"code": float(index)}, MergeChoice()).version
            for _ in range(sets_each)
        ]

    try:
        with ThreadPoolExecutor(threads) as pool:
            versions = [v for batch in pool.map(writer, range(threads)) for v in batch]
        total = threads * sets_each
        assert sorted(versions) == list(range(1, total + 1))
        assert stores[0].get_tenant("acme").version == total
        assert all(stores[1].get_tenant("acme", version=v) for v in range(1, total + 1))
    finally:
        for store in stores:
            store.close()


def test_adapters_are_added_listed_and_removed(store: SqlStore, tmp_path: Path) -> None:
    store.add_adapter("math", tmp_path / "math")
    legal = store.add_adapter("legal", tmp_path / "legal")
    assert legal.path == tmp_path / "legal"
    assert legal.registered_at.utcoffset() == timedelta(0)
    assert [a.name for a in store.list_adapters()] == ["legal", "math"]

    with pytest.raises(AlreadyExistsError) as duplicate:
        store.add_adapter("legal", tmp_path / "elsewhere")
    assert duplicate.value.field == "name"
    assert store.list_adapters()[0] == legal

    store.remove_adapter("legal")
    assert [a.name for a in store.list_adapters()] == ["math"]
    with pytest.raises(NotFoundError) as absent:
        store.remove_adapter("legal")
    assert absent.value.field == "name"


def test_a_newer_schema_is_refused_naming_store_and_versions(backend: Backend) -> None:
    backend.open().close()
    backend.run(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 98}")

    with pytest.raises(ConfigError) as newer:
        backend.open()
    message = str(newer.value)
    assert backend.name in message
    assert f"schema version {SCHEMA_VERSION + 98}" in message
    assert f"up to {SCHEMA_VERSION}" in message


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are not the tables you are looking for" * 100)
    with pytest.raises(ConfigError, match=r"notes\.db"):
        SqliteStore(path)


def test_sqlite_journal_is_wal(db: Path) -> None:
    SqliteStore(db).close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        conn.close()


def test_ids_are_ordered_byte_by_byte_whatever_the_database_locale(store: SqlStore) -> None:
    """The PostgreSQL test database collates by ICU en-US ('a' < 'B' there); pages must
    still follow byte order, as SQLite's, or `after` would skip and repeat tenants."""
    ids = ["a", "B", "_x", "Z9", "b.c", "A"]
    for tenant_id in ids:
        store.set_tenant(tenant_id, {"code": 1.0}, MergeChoice())
    assert [t.tenant_id for t in store.list_tenants(limit=10)] == sorted(ids)
    assert [t.tenant_id for t in store.list_tenants(limit=10, after="Z9")] == ["_x", "a", "b.c"]


def test_postgres_reconnects_after_its_connection_is_cut(postgres: PostgresServer) -> None:
    """A failover or restart cuts the connection; the next operation reconnects by itself."""
    url = postgres.create_database()
    store = PostgresStore(url)
    try:
        store.set_tenant("acme", {"code": 1.0}, MergeChoice())
        database = url.rsplit("/", 1)[1]
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
        assert store.get_tenant("acme").version == 1
        assert store.set_tenant("acme", {"code": 2.0}, MergeChoice()).version == 2
    finally:
        store.close()


def test_an_unreachable_postgres_is_a_config_error_without_the_password() -> None:
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError) as refused:
            open_store(f"postgresql://loramerge:hunter2@127.0.0.1:{port}/loramerge")
    assert refused.value.field == "store.url"
    assert f"postgresql://loramerge@127.0.0.1:{port}/loramerge" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_a_lost_postgres_is_unavailable_until_it_is_back(postgres: PostgresServer) -> None:
    """While the database refuses connections, operations raise StoreUnavailableError (gRPC
    UNAVAILABLE: clients retry) instead of a driver error; then the store recovers."""
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    store = PostgresStore(url)
    try:
        store.set_tenant("acme", {"code": 1.0}, MergeChoice())
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )
            with pytest.raises(StoreUnavailableError) as lost:
                store.get_tenant("acme")
            assert database in str(lost.value)
            admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
        assert store.get_tenant("acme").version == 1
    finally:
        store.close()


def test_open_store_accepts_sqlite_urls_and_plain_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for spec, expected in [
        (f"sqlite://{tmp_path}/url.db", tmp_path / "url.db"),
        (str(tmp_path / "plain.db"), tmp_path / "plain.db"),
        ("sqlite:///~/.local/share/loramerge/home.db", tmp_path / "home/.local/share/loramerge"),
    ]:
        store = open_store(spec)
        store.close()
        assert isinstance(store, SqliteStore)
        assert expected.exists()


@pytest.mark.parametrize(
    "spec", ["mysql://loramerge:hunter2@db/loramerge", "sqlite://relative.db", "sqlite:///", ""]
)
def test_open_store_refuses_other_urls(spec: str) -> None:
    with pytest.raises(ConfigError) as refused:
        open_store(spec)
    assert refused.value.field == "store.url"
    assert "hunter2" not in str(refused.value)  # URLs may carry passwords
    if spec.startswith("mysql"):
        assert "sqlite:///" in str(refused.value)
        assert "postgresql://" in str(refused.value)


def test_api_keys_round_trip_and_revoke(store: SqlStore) -> None:
    from loramerge.server.auth import new_key

    _, tenant_key = new_key("tenant", "acme", allow_inline=True)
    _, admin_key = new_key("admin")
    store.add_api_key(tenant_key)
    store.add_api_key(admin_key)
    assert store.get_api_key(tenant_key.key_id) == tenant_key
    assert store.get_api_key("0" * 16) is None
    with pytest.raises(AlreadyExistsError):
        store.add_api_key(tenant_key)
    revoked = store.revoke_api_key(tenant_key.key_id)
    assert revoked.revoked_at is not None and revoked.tenant_id == "acme"
    assert store.revoke_api_key(tenant_key.key_id).revoked_at == revoked.revoked_at  # idempotent
    assert {k.key_id for k in store.list_api_keys()} == {tenant_key.key_id, admin_key.key_id}
    with pytest.raises(NotFoundError) as missing:
        store.revoke_api_key("f" * 16)
    assert missing.value.field == "key_id"


def _tuned(value: float, adapters: tuple[str, ...] = ("code", "math")) -> TunedWeights:
    phi = TaraPhi(adapters, {"m.q_proj": torch.full((len(adapters), 3), value)})
    summary = TunedSummary(
        digest=phi.digest,
        adapters=adapters,
        adapter_fingerprints=tuple(f"fp-{name}" for name in adapters),
        preference={name: 1 / len(adapters) for name in adapters},
        pool_fingerprint="pool-1",
        source="file",
    )
    return TunedWeights(summary, phi)


def test_tuned_weights_are_stored_with_a_version_and_read_back_exactly(store: SqlStore) -> None:
    tuned = _tuned(0.123456789)
    first = store.set_tenant("acme", {"code": 1.0, "math": 1.0}, MergeChoice("tara"), None, tuned)
    plain = store.set_tenant("acme", {"code": 1.0, "math": 1.0}, MergeChoice("tara"))

    assert first.tuned == tuned.summary
    assert store.get_tenant("acme", version=1) == first
    assert plain.tuned is None and store.get_tenant("acme").tuned is None
    phi = store.get_phi(tuned.phi.digest)
    assert phi == tuned.phi and phi.adapters == ("code", "math")
    assert torch.equal(phi.modules["m.q_proj"], tuned.phi.modules["m.q_proj"])
    with pytest.raises(NotFoundError) as absent:
        store.get_phi("0" * 64)
    assert absent.value.field == "phi_digest"


def test_tuned_weights_are_shared_by_content_and_go_with_the_last_tenant(store: SqlStore) -> None:
    tuned = _tuned(0.5)
    for tenant_id in ("acme", "globex"):
        store.set_tenant(tenant_id, {"code": 1.0, "math": 1.0}, MergeChoice("tara"), None, tuned)
    store.delete_tenant("acme")
    assert store.get_phi(tuned.phi.digest) == tuned.phi  # globex still uses it
    store.delete_tenant("globex")
    with pytest.raises(NotFoundError):
        store.get_phi(tuned.phi.digest)


def test_nothing_is_stored_when_a_tuned_set_fails_its_precondition(store: SqlStore) -> None:
    store.set_tenant("acme", {"code": 1.0}, MergeChoice())
    tuned = _tuned(0.25)
    with pytest.raises(ConflictError):
        store.set_tenant("acme", {"code": 1.0, "math": 1.0}, MergeChoice("tara"), 0, tuned)
    with pytest.raises(NotFoundError):
        store.get_phi(tuned.phi.digest)
    assert store.get_tenant("acme").version == 1


def test_a_store_from_before_tuned_weights_is_migrated_keeping_its_tenants(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loramerge.server.store as store_module

    with monkeypatch.context() as old:
        old.setattr(store_module, "_MIGRATIONS", store_module._MIGRATIONS[:2])
        old.setattr(store_module, "SCHEMA_VERSION", 2)
        backend.open().close()
    # a tenant as schema 2 stored it (its columns only)
    backend.run("INSERT INTO tenants (tenant_id, latest_version) VALUES ('acme', 1)")
    backend.run(
        "INSERT INTO tenant_versions (tenant_id, version, preference, merge, updated_at) VALUES"
        """ ('acme', 1, '{"code": 1.0}', '{"method": "ties"}', '2026-01-02T03:04:05+00:00')"""
    )

    after = backend.open()
    try:
        stored = after.get_tenant("acme")
        assert stored.preference == {"code": 1.0} and stored.merge == MergeChoice("ties")
        assert stored.tuned is None
        tuned = _tuned(0.75)
        again = after.set_tenant("acme", {"code": 1.0, "math": 1.0}, MergeChoice("tara"), 1, tuned)
        assert again.version == 2 and after.get_tenant("acme").tuned == tuned.summary
    finally:
        after.close()
