"""API keys: hashing, storage (SQLite), authentication, authorization rules, the keys CLI and
the refusal to serve a non-loopback address without auth."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from loramerge.server import auth
from loramerge.server.cli import main
from loramerge.server.config import load_settings
from loramerge.server.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from loramerge.server.store import SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    opened = SqliteStore(tmp_path / "keys.db")
    yield opened
    opened.close()


def authenticate(store: SqliteStore, header: str | None, enabled: bool = True) -> auth.Principal:
    return asyncio.run(auth.Authenticator(store, enabled).authenticate(header))


def test_only_a_salted_slow_hash_is_stored_and_it_verifies(
    store: SqliteStore, tmp_path: Path
) -> None:
    key, record = auth.new_key("tenant", "acme", allow_inline=True)
    store.add_api_key(record)
    secret = key.split(".", 1)[1]
    assert record.secret_hash.startswith("scrypt$16384$8$1$")
    assert auth.verify_secret(secret, record.secret_hash)
    assert not auth.verify_secret(
        secret[:-1] + ("A" if secret[-1] != "A" else "B"), record.secret_hash
    )
    assert auth.hash_secret(secret) != record.secret_hash  # a fresh salt each time
    raw = (tmp_path / "keys.db").read_bytes() + (tmp_path / "keys.db-wal").read_bytes()
    assert secret.encode() not in raw
    assert store.get_api_key(record.key_id) == record


def test_a_valid_key_yields_its_principal(store: SqliteStore) -> None:
    key, record = auth.new_key("tenant", "acme")
    store.add_api_key(record)
    principal = authenticate(store, f"Bearer {key}")
    assert principal == auth.Principal("tenant", "acme", False, record.key_id)
    assert authenticate(store, f"bearer  {key} ").tenant_id == "acme"  # scheme is case-free


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Basic abc", "Bearer lm_nothex", "Bearer lm_0123456789abcdef.short",
     "Bearer lm_0123456789abcdef." + "a" * 43, "Bearer \x00"],
)  # fmt: skip
def test_missing_malformed_or_unknown_keys_are_unauthenticated(
    store: SqliteStore, header: str | None
) -> None:
    with pytest.raises(UnauthenticatedError):
        authenticate(store, header)


def test_a_wrong_secret_and_a_revoked_key_are_refused(store: SqliteStore) -> None:
    key, record = auth.new_key("admin")
    store.add_api_key(record)
    wrong = key[:-1] + ("x" if key[-1] != "x" else "y")
    authenticator = auth.Authenticator(store, True)
    assert asyncio.run(authenticator.authenticate(f"Bearer {key}")).is_admin
    with pytest.raises(UnauthenticatedError):  # the remembered key does not excuse another
        asyncio.run(authenticator.authenticate(f"Bearer {wrong}"))
    store.revoke_api_key(record.key_id)
    with pytest.raises(UnauthenticatedError, match="revoked"):  # seen at once, even remembered
        asyncio.run(authenticator.authenticate(f"Bearer {key}"))


def test_with_auth_off_everyone_is_unrestricted(store: SqliteStore) -> None:
    assert authenticate(store, None, enabled=False) is auth.UNRESTRICTED


def test_authorization_rules() -> None:
    admin = auth.Principal("admin")
    acme = auth.Principal("tenant", "acme", allow_inline=False, key_id="k")
    inline = auth.Principal("tenant", "acme", allow_inline=True, key_id="k")
    auth.authorize_admin(admin, "DeleteTenant")
    auth.authorize_tenant(acme, "acme")
    auth.authorize_generate(acme, "acme", inline=False)
    auth.authorize_generate(inline, "acme", inline=True)
    auth.authorize_generate(admin, "", inline=True)
    with pytest.raises(PermissionDeniedError, match="admin"):
        auth.authorize_admin(acme, "DeleteTenant")
    with pytest.raises(PermissionDeniedError) as denied:
        auth.authorize_tenant(acme, "globex")
    assert denied.value.field == "tenant_id"
    for tenant in ("globex", ""):
        with pytest.raises(PermissionDeniedError):
            auth.authorize_generate(inline, tenant, inline=False)
    with pytest.raises(PermissionDeniedError, match="allow-inline") as denied:
        auth.authorize_generate(acme, "acme", inline=True)
    assert denied.value.field == "preference"
    assert auth.subject(acme, "ignored") == "acme" and auth.subject(admin, "t") == "t"


@pytest.mark.parametrize(
    ("host", "enabled", "override", "refused"),
    [("127.0.0.1", False, False, False), ("localhost", False, False, False),
     ("::1", False, False, False), ("0.0.0.0", False, False, True),
     ("10.0.0.5", False, False, True),
     ("0.0.0.0", True, False, False), ("0.0.0.0", False, True, False)],
)  # fmt: skip
def test_a_non_loopback_address_without_auth_is_refused_unless_overridden(
    host: str, enabled: bool, override: bool, refused: bool
) -> None:
    settings = load_settings(
        environ={},
        overrides={
            "grpc": {"host": host},
            "auth": {"enabled": enabled, "allow_unauthenticated_remote": override},
        },
    )
    if refused:
        with pytest.raises(ConfigError, match="allow_unauthenticated_remote") as error:
            auth.check_exposure(settings)
        assert error.value.field == "grpc.host"
    else:
        auth.check_exposure(settings)


def test_the_auth_switch_comes_from_the_environment() -> None:
    assert load_settings(environ={"LORAMERGE_AUTH__ENABLED": "true"}).auth.enabled
    assert not load_settings(environ={}).auth.enabled


def test_a_version_1_store_gains_the_keys_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loramerge.server.store as store_module

    path = tmp_path / "old.db"
    with monkeypatch.context() as old:  # a store from before API keys: schema 1
        old.setattr(store_module, "_MIGRATIONS", store_module._MIGRATIONS[:1])
        old.setattr(store_module, "SCHEMA_VERSION", 1)
        SqliteStore(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (1,)
    reopened = SqliteStore(path)
    try:
        _, record = auth.new_key("admin")
        reopened.add_api_key(record)
        assert [k.key_id for k in reopened.list_api_keys()] == [record.key_id]
    finally:
        reopened.close()


def test_keys_cli_creates_lists_and_revokes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORAMERGE_STORE__URL", f"sqlite:///{tmp_path / 'cli.db'}")
    assert main(["keys", "create", "--tenant", "acme", "--allow-inline"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[-1]
    assert key.startswith("lm_") and " " not in key  # alone on the last line
    key_id = key[3:19]
    assert main(["keys", "create", "--admin"]) == 0
    capsys.readouterr()
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert f"key {key_id} tenant acme allow-inline" in listing and "admin" in listing
    assert key.split(".")[1] not in listing
    store = SqliteStore(tmp_path / "cli.db")
    try:
        assert authenticate(store, f"Bearer {key}").tenant_id == "acme"
        assert main(["keys", "revoke", key_id]) == 0
        assert "revoked" in capsys.readouterr().out
        with pytest.raises(UnauthenticatedError):
            authenticate(store, f"Bearer {key}")
    finally:
        store.close()
    assert main(["keys", "revoke", "0" * 16]) == 2
    assert main(["keys", "create", "--tenant", "bad id"]) == 2
    assert "not a valid tenant id" in capsys.readouterr().err
