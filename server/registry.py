"""The live adapter pool: registration and removal swap in a new immutable pool.

Adapters come from the configuration (the embedded defaults, `adapters.paths`) and from the
RegisterAdapter API; API registrations are persisted in the store and come back on restart.
Every change makes a new pool with a new fingerprint, so merged versions keyed by the old
fingerprint are never served for new requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from loramerge.merge_engine import (
    AdapterPool,
    LoraAdapter,
    load_adapter,
    validate_adapter_name,
)
from loramerge.merge_engine.adapter import CONFIG_FILE, WEIGHTS_FILE

from .errors import (
    AlreadyExistsError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    shown,
)
from .store import Store

logger = logging.getLogger(__name__)
MAX_PATH = 4096


class AdapterRegistry:
    """Owns the current `AdapterPool` (None while no adapter is registered)."""

    def __init__(self, store: Store, allowed_roots: Sequence[Path]) -> None:
        self._store = store
        self._roots = tuple(root.expanduser().resolve() for root in allowed_roots)
        self._pool: AdapterPool | None = None
        self._registered: set[str] = set()  # names that came through the API (persisted)
        self._lock = asyncio.Lock()

    @property
    def pool(self) -> AdapterPool | None:
        return self._pool

    def load_initial(self, configured: Mapping[str, Path]) -> None:
        """Load the configured adapters and the persisted API registrations (at start-up).

        A persisted registration whose directory is gone or broken is skipped with a warning;
        a broken configured adapter is an error.
        """
        adapters = {name: load_adapter(path, name) for name, path in configured.items()}
        for registration in self._store.list_adapters():
            self._registered.add(registration.name)
            if registration.name in adapters:
                continue
            try:
                adapters[registration.name] = load_adapter(registration.path, registration.name)
            except Exception as err:  # the file changed since it was registered
                logger.warning("skipped registered adapter %r: %s", registration.name, err)
        if adapters:
            self._pool = AdapterPool(adapters.values())  # logs its own warnings

    def _check_path(self, path: str) -> Path:
        """The resolved adapter directory, if it and the files read from it (symlinks
        followed) are under an allowed root."""
        if not self._roots:
            raise PermissionDeniedError(
                "registering adapters is disabled: configure adapters.allowed_roots", "path"
            )
        if not path:
            raise InvalidRequestError("path", "is required")
        if "\0" in path or len(path) > MAX_PATH:
            raise InvalidRequestError(
                "path", f"{shown(path)} is not a path (NUL byte or over {MAX_PATH} characters)"
            )
        if not path.startswith("/"):
            raise InvalidRequestError("path", f"{shown(path)} must be an absolute path")
        resolved = Path(path).resolve()  # follows symlinks out of the roots too
        for candidate in (resolved, resolved / CONFIG_FILE, resolved / WEIGHTS_FILE):
            target = candidate.resolve()
            if not any(target.is_relative_to(root) for root in self._roots):
                roots = ", ".join(str(root) for root in self._roots)
                raise PermissionDeniedError(
                    f"{shown(str(candidate))} is not under an allowed root ({roots})", "path"
                )
        return resolved

    async def register(self, name: str, path: str) -> tuple[LoraAdapter, AdapterPool]:
        """Load the adapter at `path`, add it to the pool and persist the registration."""
        validate_adapter_name(name, "name")
        directory = self._check_path(path)
        async with self._lock:
            if self._pool is not None and name in self._pool.names:
                raise AlreadyExistsError(f"adapter {name!r} is already registered", "name")
            adapter = await asyncio.to_thread(load_adapter, directory, name)
            current = self._pool
            pool = await asyncio.to_thread(
                lambda: (
                    current.with_adapter(adapter) if current is not None else AdapterPool([adapter])
                )
            )
            await asyncio.to_thread(self._store.add_adapter, name, directory)
            self._registered.add(name)
            self._pool = pool
        logger.info("registered adapter %s from %s; pool %s", name, directory, pool.fingerprint)
        return adapter, pool

    async def remove(self, name: str) -> AdapterPool | None:
        """Remove adapter `name` from the pool (and its persisted registration)."""
        async with self._lock:
            if self._pool is None or name not in self._pool.names:
                raise NotFoundError(f"adapter {name!r} is not registered", "name")
            pool = self._pool.without(name) if len(self._pool) > 1 else None
            if name in self._registered:
                await asyncio.to_thread(self._store.remove_adapter, name)
                self._registered.discard(name)
            self._pool = pool
        logger.info("removed adapter %s", name)
        return pool
