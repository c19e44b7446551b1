"""Hostile input handled below the gRPC layer: adapter files (nesting, size caps, names), the
registry's path checks (symlinked files), and the server's own misconfiguration failing at
start instead of as clients' errors."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from factories import random_factors, write_adapter
from loramerge.merge_engine import (
    AdapterFormatError,
    InvalidArgumentError,
    load_adapter,
    validate_adapter_name,
)
from loramerge.merge_engine import adapter as adapter_module
from loramerge.server.config import load_settings
from loramerge.server.errors import ConfigError, InvalidRequestError, PermissionDeniedError
from loramerge.server.registry import AdapterRegistry
from loramerge.server.selection import Selector
from loramerge.server.store import SqliteStore


@pytest.mark.parametrize("name", ["ok\n", "a b", "", "-x", "n" * 65, "é"])
def test_adapter_names_must_match_whole(name: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        validate_adapter_name(name)
    assert len(str(error.value)) < 200  # a long name is cut in the message


def test_deeply_nested_config_is_a_format_error(tmp_path: Path) -> None:
    directory = write_adapter(tmp_path / "a", random_factors(seed=1))
    (directory / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFormatError, match="nested too deeply"):
        load_adapter(directory)


def test_files_over_the_size_caps_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = write_adapter(tmp_path / "a", random_factors(seed=1))
    size = (directory / "adapter_model.safetensors").stat().st_size
    monkeypatch.setattr(adapter_module, "MAX_WEIGHTS_BYTES", size - 1)
    with pytest.raises(AdapterFormatError, match="limit") as error:
        load_adapter(directory)
    assert error.value.path.name == "adapter_model.safetensors"
    monkeypatch.setattr(adapter_module, "MAX_WEIGHTS_BYTES", size)
    load_adapter(directory)  # exactly at the cap is fine


def test_registry_refuses_files_that_resolve_outside_the_roots(tmp_path: Path) -> None:
    outside = write_adapter(tmp_path / "outside", random_factors(seed=1))
    root = tmp_path / "root"
    linked = root / "linked"
    linked.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(outside / name, linked / name)
    store = SqliteStore(tmp_path / "s.db")
    registry = AdapterRegistry(store, [root])
    try:
        with pytest.raises(PermissionDeniedError, match="not under an allowed root"):
            asyncio.run(registry.register("linked", str(linked)))
        for path in ("relative/dir", f"{root}/\x00", "~nosuchuser/x", "/" + "x" * 5000):
            with pytest.raises(InvalidRequestError) as error:
                asyncio.run(registry.register("x", path))
            assert error.value.field == "path"
        inside = write_adapter(root / "inside", random_factors(seed=2))
        adapter, pool = asyncio.run(registry.register("inside", str(inside)))
        assert pool.names == ("inside",) and adapter.name == "inside"
    finally:
        store.close()


@pytest.mark.parametrize(
    ("merge", "field"),
    [
        ({"method": "magic"}, "merge.method"),
        ({"method": "ties", "params": {"density": 2}}, "merge.params.density"),
        ({"hot_tenants": ["ok", "bad\n"]}, "merge.hot_tenants[1]"),
        ({"fallback_method": "magic"}, "merge.fallback_method"),
    ],
)
def test_the_servers_own_merge_settings_fail_at_start(
    tmp_path: Path, merge: dict[str, object], field: str
) -> None:
    settings = load_settings(environ={}, overrides={"merge": merge})
    store = SqliteStore(tmp_path / "s.db")
    try:
        with pytest.raises(ConfigError) as error:
            Selector(settings, store, AdapterRegistry(store, []))
        assert error.value.field == field
    finally:
        store.close()
