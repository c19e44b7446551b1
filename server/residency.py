"""Which merged versions are loaded in the engine: leases, pins, LRU, stale pools, eviction.

Every transport holds a version for the whole life of a request with one context manager::

    async with residency.lease(selection) as lease:   # lease.version, lease.cached
        ...generate with lease.version.lora_request...

The first lease of a key builds the version (`versions.VersionBuilder`: merge on a merge worker,
export, `add_lora`); concurrent leases of the same key wait for that one build. Eviction
(`remove_lora` + deleting the directory) runs only in a background reaper task, woken when a
lease ends, the pool changes or a build needs room.

Invariants (each has a test in tests/unit/test_residency.py):
1. Bounded: at most `capacity` versions are loaded in the engine or being loaded or removed
   (a slot is taken before `add_lora` and given back after `remove_lora`). The capacity is at
   most vLLM's `max_cpu_loras`, so vLLM's own LRU never drops a version we hold. A build that
   finds no free slot waits for the reaper to free one.
2. Leased means loaded: a version with a lease is never removed. The reaper picks a victim
   with no lease and takes it out of the table in one step, with no await in between (and
   leases are only taken on versions in the table, also without an await), so a lease taken
   at any time before is seen, and none can be taken after. Passes are serialised by a lock.
3. Waiters first: a new version is published holding one lease for every request waiting for
   it, so it cannot be evicted before they run; a waiter cancelled before it resumes gives its
   lease back.
4. Single flight: one build per key at a time; a cancelled requester does not cancel it for
   the others; a failed build is not cached (the next lease retries) and leaves no directory.
5. Stale: a version of a pool that is no longer current is removed as soon as it has no lease
   (pins do not keep it); new requests select the current pool, so they never lease it.
6. Pins: a hot tenant has at most one pinned version, which LRU never evicts; at most
   capacity − 1 versions are pinned, so a build can always get a slot eventually.
7. Off the request path: leaving a lease only counts down and wakes the reaper; an eviction
   error is logged and counted, never raised to a request.
8. Files: a version's directory exists from before its `add_lora` until after its
   `remove_lora`; `close` deletes the directories without calling into the engine (which may
   be dead and is shutting down anyway).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from loramerge.merge_engine import AdapterPool

from .metrics import Metrics
from .selection import Selection
from .version_key import VersionKey, version_key
from .versions import LoraEngine, Version, VersionBuilder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    version: Version
    cached: bool  # True: no merge was needed for this request


@dataclass
class _Flight:
    """A build in progress and the requests waiting for it."""

    task: asyncio.Task[Version] | None = None
    waiters: int = 0


class Residency:
    def __init__(
        self,
        engine: LoraEngine,
        builder: VersionBuilder,
        metrics: Metrics,
        *,
        capacity: int,
        preference_step: float,
    ) -> None:
        self.builder = builder
        self.capacity = capacity
        self._engine = engine
        self._metrics = metrics
        self._step = preference_step
        self._versions: OrderedDict[VersionKey, Version] = OrderedDict()  # LRU order
        self._flights: dict[VersionKey, _Flight] = {}
        self._occupied = 0  # engine slots: loading, loaded or being removed
        self._slot_waiters = 0
        self._room = asyncio.Condition()
        self._reap_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._current: str | None = None  # fingerprint of the current pool; None: keep all
        self._warm = False
        metrics.resident_capacity.set(capacity)

    @property
    def resident(self) -> int:
        return len(self._versions)

    def versions(self) -> list[Version]:
        return list(self._versions.values())

    def start(self) -> None:
        """Start the reaper (on the running event loop)."""
        self._reaper = asyncio.create_task(self._reap_forever(), name="residency-reaper")

    @asynccontextmanager
    async def lease(self, selection: Selection) -> AsyncIterator[Lease]:
        """Hold the merged version for `selection` while the block runs (building it first
        if needed); a hot tenant's selection also pins it."""
        key = version_key(selection.pool, selection.spec, selection.rho, self._step)
        version = self._versions.get(key)
        cached = version is not None
        (self._metrics.merged_hits if cached else self._metrics.merged_misses).inc()
        if version is not None:
            self._versions.move_to_end(key)
            version.leases += 1  # no await between the lookup and this (invariant 2)
        else:
            version = await self._join(key, selection)  # returns holding our lease
        try:
            if selection.pin_for is not None:
                self._pin(version, selection.pin_for)
            yield Lease(version, cached)
        finally:
            version.leases -= 1
            self._wake()

    async def pool_changed(self, pool: AdapterPool | None) -> None:
        """Retire the versions of older pools (once unleased) and warm the new pool."""
        self._current = pool.fingerprint if pool is not None else ""
        self.builder.worker.memory.calibrations.retain(self._current)
        self._wake()
        if pool is not None and self._warm:
            await self.builder.warm(pool)

    async def engine_started(self, pool: AdapterPool | None) -> None:
        """From now on pools are warmed up (not while vLLM is still sizing its memory)."""
        self._warm = True
        await self.pool_changed(pool)

    async def close(self) -> None:
        """Stop the reaper and the builds, and forget every version (its files go with the
        run directory). The engine is not called: it is shutting down, or dead."""
        for task in [self._reaper, *(f.task for f in self._flights.values())]:
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task
        self.builder.worker.shutdown()
        self._versions.clear()
        self._metrics.resident_adapters.set(0)
        self._metrics.export_dir_bytes.set(0)

    # --- building -----------------------------------------------------------------------

    async def _join(self, key: VersionKey, selection: Selection) -> Version:
        """Wait for the build of `key`, starting it if nobody has; returns holding a lease."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            self._flights[key] = flight
            flight.task = asyncio.create_task(
                self._build(key, selection, flight), name=f"merge-{key.digest()[:8]}"
            )
            flight.task.add_done_callback(_log_failure)
        task = flight.task
        assert task is not None
        flight.waiters += 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().leases -= 1  # published with our lease: give it back
                self._wake()
            else:
                flight.waiters -= 1
            raise

    async def _build(self, key: VersionKey, selection: Selection, flight: _Flight) -> Version:
        try:
            exported = await self.builder.export(key, selection.pool, selection.spec)
            try:
                await self._take_slot()
            except BaseException:
                await self.builder.discard(exported.path)
                raise
            try:
                version = await self.builder.load(exported, selection.spec.method)
            except BaseException:
                await self._give_slot()
                raise
        finally:
            self._flights.pop(key, None)  # in the same step as publishing (invariant 3)
        version.leases = flight.waiters
        self._versions[key] = version
        self._report()
        return version

    async def _take_slot(self) -> None:
        async with self._room:
            self._slot_waiters += 1
            self._wake()
            try:
                await self._room.wait_for(lambda: self._occupied < self.capacity)
            finally:
                self._slot_waiters -= 1
            self._occupied += 1

    async def _give_slot(self) -> None:
        async with self._room:
            self._occupied -= 1
            self._room.notify_all()

    def _pin(self, version: Version, tenant_id: str) -> None:
        if version.pinned_by == tenant_id:
            return
        others = [v for v in self._versions.values() if v.pinned_by not in (None, tenant_id)]
        if len(others) + 1 >= self.capacity:
            logger.warning(
                "not pinning tenant %s: %d versions pinned of capacity %d",
                tenant_id, len(others), self.capacity,
            )  # fmt: skip
            return
        for other in self._versions.values():
            if other.pinned_by == tenant_id:
                other.pinned_by = None
        version.pinned_by = tenant_id  # ours only: vLLM's pin_lora would also take a GPU slot

    # --- eviction (the reaper only) -----------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    async def _reap_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._reap()
            except Exception:  # never let the reaper die: log and wait for the next wake-up
                logger.exception("eviction pass failed")

    async def _reap(self) -> None:
        async with self._reap_lock:
            while (victim := self._victim()) is not None:
                del self._versions[victim.key]  # same step as the lease check (invariant 2)
                self._report()
                await self._remove(victim)

    def _victim(self) -> Version | None:
        """An unleased version to evict now: a stale one, else the least recently used
        unpinned one while a build is waiting for a slot."""
        unleased = [v for v in self._versions.values() if v.leases == 0]
        for version in unleased:
            if self._current is not None and version.key.pool_fingerprint != self._current:
                return version
        if self._occupied + self._slot_waiters <= self.capacity:
            return None
        return next((v for v in unleased if v.pinned_by is None), None)

    async def _remove(self, version: Version) -> None:
        try:
            removed = await self._engine.remove_lora(version.lora_id)
            if not removed:
                logger.warning("the engine did not hold %s", version.adapter_id)
        except Exception as err:  # invariant 7: never raised to a request
            logger.error("could not remove %s from the engine: %s", version.adapter_id, err)
            self._metrics.eviction_errors.inc()
        finally:
            await self.builder.discard(version.path)
            await self._give_slot()
        self._metrics.merged_evictions.inc()
        logger.info("evicted merged version", extra={"adapter_id": version.adapter_id})

    def _report(self) -> None:
        self._metrics.resident_adapters.set(len(self._versions))
        self._metrics.export_dir_bytes.set(sum(v.nbytes for v in self._versions.values()))


def _log_failure(task: asyncio.Task[Version]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("merge failed: %s", task.exception())  # also marks it retrieved
