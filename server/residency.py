"""Which merged versions are loaded in the engine: leases, pins, LRU, stale pools, eviction.

Every transport holds a version for the whole life of a request with one context manager::

    async with residency.lease(selection) as lease:   # lease.version, lease.cached
        ...generate with lease.version.lora_request...

The first lease of a key builds the version (`versions.VersionBuilder`: merge on a merge worker,
export, and `add_lora` for the first version of its pool and spec, which vLLM checks; a later
one is loaded by vLLM in the step that first runs its request, as a parked version is);
concurrent leases of the same key wait for that one build. Eviction runs
only in a background reaper task, woken when a lease ends, the pool changes or a build needs
room. Our LRU keeps at most `capacity` versions "resident" (leased or recently used; as many as
vLLM keeps loaded, `max_cpu_loras`). A version it evicts is "parked": handed to vLLM's own LRU
with no engine call (vLLM keeps it loaded until it needs the room, as it keeps a plain adapter)
and its files kept while at most `keep` versions are on disk in all, so its next lease takes it
back at once, with no merge, no export and no `add_lora`: vLLM uses it if it still holds it, or
loads it from its directory in the step that first runs a request naming it, as plain vLLM
loads any adapter a request names. Only the versions of a stale pool are removed from the
engine (`remove_lora`), in the reaper. A build asks for its slot when it starts, and the reaper
keeps `spare` slots free ahead of the next miss; a parked version is taken back without
waiting for a slot (the reaper evicts back to the bound after it).

Invariants (each has a test in tests/unit/test_residency.py):
1. Bounded: builds keep at most `capacity` versions resident or being loaded or removed (a slot
   is taken before the version is loaded and given back when it is evicted; a build that finds no
   free slot waits for the reaper to free one). A parked version taken back counts at once,
   over the bound if no slot is free; the reaper then evicts back to it. vLLM bounds what it
   holds itself (`max_cpu_loras`, at least the capacity): an adapter it dropped is loaded again
   from its files, which a version keeps while it is ours. At most `keep` versions are on disk
   besides the builds in progress.
2. Leased means loadable: a version with a lease is never evicted, and its files exist, so
   every step that runs one of its requests finds it in vLLM or loads it. The reaper picks a
   victim with no lease and takes it out of the table in one step, with no await in between
   (and leases are only taken on versions in the table, also without an await), so a lease
   taken at any time before is seen, and none can be taken after. Passes are serialised by a
   lock.
3. Waiters first: a new version is published holding one lease for every request waiting for
   it, so it cannot be evicted before they run; a waiter cancelled before it resumes gives its
   lease back.
4. Single flight: one build per key at a time; a cancelled requester does not cancel it for
   the others; a failed build is not cached (the next lease retries) and leaves no directory;
   a build that fails gives back the slot it took.
5. Stale: a version of a pool that is no longer current is removed from the engine as soon as
   it has no lease (pins do not keep it), and its files deleted (parked ones at once, with no
   engine call: vLLM's LRU drops them if it still holds them); new requests select the current
   pool, so they never lease it.
6. Pins: a hot tenant has at most one pinned version, which our LRU never parks (vLLM's keeps
   it while the tenant is served: it is among the most recently used); at most capacity − 1
   versions are pinned, so a build can always get a slot eventually.
7. Off the request path: leaving a lease only counts down and wakes the reaper; an eviction
   error is logged and counted, never raised to a request.
8. Files: a version's directory exists from before its first `add_lora` (or its first lease,
   for one taken back) until after it is removed from the engine (stale) or deleted from the
   parked tier; a parked version has no lease and vLLM never loads it again under its name
   once deleted (a new build gets a new name and id), so deleting it needs no engine call.
   Parked versions give way to new ones: a version is parked only while the export directory
   keeps room for the merges that may run at once (and one more), and a build that finds it
   full deletes them all and exports again. `close` deletes the directories without calling
   into the engine (which may be dead and is shutting down anyway).
9. Ahead: `merge_ahead` builds a version before any request asks for it (a tenant was stored)
   and parks it, so its first lease takes it back with no merge (the first version of a pool
   and spec is loaded instead, as a build is, so that vLLM checks it before a request runs).
   One such merge at a time, and only while no request's build runs; a request for its key
   joins it (single flight) and it is then loaded as a build is; it never deletes parked
   versions to make room, and its failure only logs.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from loramerge.merge_engine import AdapterPool
from loramerge.merge_engine.adapter import CONFIG_FILE, WEIGHTS_FILE

from .engine_cpus import cpus_for_merges
from .metrics import Metrics
from .selection import Selection
from .version_key import VersionKey, version_key
from .versions import Exported, ExportSpaceError, LoraEngine, Version, VersionBuilder

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
    ahead: bool = False  # a merge ahead of any request (`merge_ahead`)


class Residency:
    def __init__(
        self,
        engine: LoraEngine,
        builder: VersionBuilder,
        metrics: Metrics,
        *,
        capacity: int,
        preference_step: float,
        keep: int | None = None,
        spare: int = 0,
    ) -> None:
        self.builder = builder
        self.capacity = capacity
        self.keep = max(keep or capacity, capacity)  # versions on disk: loaded + parked
        self.spare = spare if 0 <= spare < capacity else 0  # slots the reaper keeps free
        self._engine = engine
        self._metrics = metrics
        self._step = preference_step
        self._versions: OrderedDict[VersionKey, Version] = OrderedDict()  # loaded, LRU order
        self._parked: OrderedDict[VersionKey, Version] = OrderedDict()  # files only, LRU order
        self._flights: dict[VersionKey, _Flight] = {}
        self._occupied = 0  # engine slots: loading, loaded or being removed
        self._slot_waiters = 0
        self._room = asyncio.Condition()
        self._reap_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._current: str | None = None  # fingerprint of the current pool; None: keep all
        self._warm = False
        self._ahead: OrderedDict[VersionKey, Selection] = OrderedDict()  # to merge ahead
        self._ahead_wakeup = asyncio.Event()
        self._ahead_task: asyncio.Task[None] | None = None
        self._no_builds = asyncio.Event()  # no build for a request is running
        self._no_builds.set()
        metrics.resident_capacity.set(capacity)

    @property
    def resident(self) -> int:
        return len(self._versions)

    def versions(self) -> list[Version]:
        """The resident versions (leased or recently used)."""
        return list(self._versions.values())

    def parked(self) -> list[Version]:
        """The evicted versions kept on disk for a reload (vLLM may still hold them)."""
        return list(self._parked.values())

    def start(self) -> None:
        """Start the reaper (on the running event loop)."""
        self._reaper = asyncio.create_task(self._reap_forever(), name="residency-reaper")

    @asynccontextmanager
    async def lease(self, selection: Selection) -> AsyncIterator[Lease]:
        """Hold the merged version for `selection` while the block runs (building it first
        if needed); a hot tenant's selection also pins it."""
        key = self._key(selection)
        version = self._versions.get(key)
        if version is not None:
            self._versions.move_to_end(key)
            version.leases += 1  # no await between the lookup and this (invariant 2)
        elif key in self._parked:
            version = self._take_back(key)  # holding our lease; None if its files are gone
        cached = version is not None  # loaded, or taken back: no merge
        (self._metrics.merged_hits if cached else self._metrics.merged_misses).inc()
        if version is None:
            version = await self._join(key, selection)  # returns holding our lease
        try:
            if selection.pin_for is not None:
                self._pin(version, selection.pin_for)
            yield Lease(version, cached)
        finally:
            version.leases -= 1
            self._wake()

    def merge_ahead(self, selection: Selection) -> None:
        """Merge `selection`'s version in the background and keep it on disk, not loaded, so
        that its first lease only loads it (as a parked version). Builds for requests go first;
        nothing is done for a version loaded, parked or being built; at most `keep` wait (the
        oldest are dropped). A failure is logged, never raised."""
        key = self._key(selection)
        if self._known(key):
            return
        self._ahead[key] = selection
        self._ahead.move_to_end(key)
        while len(self._ahead) > self.keep:
            self._ahead.popitem(last=False)
        self._report_ahead()
        self._ahead_wakeup.set()

    @property
    def ahead_backlog(self) -> int:
        """Versions waiting to be merged ahead, or merging."""
        return len(self._ahead) + sum(f.ahead for f in self._flights.values())

    async def merged_ahead(self) -> None:
        """Wait until every merge ahead asked for so far has finished (or failed)."""
        while self.ahead_backlog:
            await asyncio.sleep(0.05)

    async def pool_changed(self, pool: AdapterPool | None) -> None:
        """Retire the versions of older pools (once unleased) and warm the new pool."""
        self._current = pool.fingerprint if pool is not None else ""
        self.builder.worker.memory.calibrations.retain(self._current)
        self._wake()
        if pool is not None and self._warm:
            await self.builder.warm(pool)

    async def engine_started(self, pool: AdapterPool | None) -> None:
        """From now on pools are warmed up (not while vLLM is still sizing its memory), and
        merges keep off the CPUs the engine pinned to itself."""
        self.builder.worker.confine(await asyncio.to_thread(cpus_for_merges))  # reads /proc
        self._warm = True
        if self._ahead_task is None:
            self._ahead_task = asyncio.create_task(self._merge_ahead_forever(), name="merge-ahead")
        await self.pool_changed(pool)

    async def close(self) -> None:
        """Stop the reaper and the builds, and forget every version (its files go with the
        run directory). The engine is not called: it is shutting down, or dead."""
        tasks = [self._reaper, self._ahead_task, *(f.task for f in self._flights.values())]
        for task in tasks:
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task
        self.builder.worker.shutdown()
        self._versions.clear()
        self._parked.clear()
        self._ahead.clear()
        self._report_ahead()
        self._metrics.resident_adapters.set(0)
        self._metrics.parked_adapters.set(0)
        self._metrics.export_dir_bytes.set(0)

    # --- building -----------------------------------------------------------------------

    async def _join(self, key: VersionKey, selection: Selection) -> Version:
        """Wait for the build of `key`, starting it if nobody has; returns holding a lease."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            self._start(key, flight, self._build(key, selection, flight))
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

    def _start(self, key: VersionKey, flight: _Flight, work: Coroutine[Any, Any, Version]) -> None:
        self._flights[key] = flight
        flight.task = asyncio.create_task(work, name=f"merge-{key.digest()[:8]}")
        flight.task.add_done_callback(_log_failure)
        self._flights_changed()

    def _finish(self, key: VersionKey) -> None:
        """The flight of `key` ends (in the same step as publishing or parking: invariant 3)."""
        self._flights.pop(key, None)
        self._flights_changed()

    def _flights_changed(self) -> None:
        if any(not f.ahead for f in self._flights.values()):
            self._no_builds.clear()
        else:
            self._no_builds.set()

    async def _build(self, key: VersionKey, selection: Selection, flight: _Flight) -> Version:
        # the slot is asked for first: an eviction it needs runs while the merge does
        slot = asyncio.create_task(self._take_slot())
        try:
            exported = await self._export(key, selection, flight)
        except BaseException:
            self._finish(key)
            await self._drop_slot(slot)
            raise
        return await self._load(exported, selection, flight, slot)

    async def _export(self, key: VersionKey, selection: Selection, flight: _Flight) -> Exported:
        """Merge and export; a full export directory is made room for by deleting the parked
        versions, except for a merge ahead that no request waits for (it fails instead)."""
        try:
            return await self.builder.export(key, selection.pool, selection.spec)
        except ExportSpaceError:
            if (flight.ahead and not flight.waiters) or not await self._unpark_all():
                raise
            return await self.builder.export(key, selection.pool, selection.spec)

    async def _load(
        self, exported: Exported, selection: Selection, flight: _Flight, slot: asyncio.Task[None]
    ) -> Version:
        """Take the slot, load an exported version (`VersionBuilder.load`) and publish it to
        its waiters."""
        try:
            try:
                await slot
            except BaseException:
                await self._drop_slot(slot)
                await self.builder.discard(exported.path)
                raise
            try:
                version = await self.builder.load(exported, selection.spec.method)
            except BaseException:
                await self._give_slot()
                raise
        finally:
            self._finish(exported.key)
        return self._publish(version, flight)

    async def _merge_ahead_forever(self) -> None:
        """Merge ahead, one version at a time, whenever no build for a request is running."""
        while True:
            await self._ahead_wakeup.wait()
            self._ahead_wakeup.clear()
            while self._ahead:
                await self._no_builds.wait()
                if not self._ahead:
                    break
                key, selection = self._ahead.popitem(last=False)
                if not self._known(key) and not self._stale(key):
                    flight = _Flight(ahead=True)
                    self._start(key, flight, self._build_ahead(key, selection, flight))
                    assert flight.task is not None
                    await asyncio.wait([flight.task])
                self._report_ahead()  # on the event loop, once the version is parked

    async def _build_ahead(self, key: VersionKey, selection: Selection, flight: _Flight) -> Version:
        """Merge and export; park the version, or load it if requests joined meanwhile or
        vLLM has not checked a version of its pool and spec yet (an error reaches no request)."""
        try:
            exported = await self._export(key, selection, flight)
        except BaseException:
            self._finish(key)
            raise
        alone = not flight.waiters
        if alone and self.builder.accepted(key):
            self._finish(key)  # with parking, no await between (a lease finds it parked)
            version = self.builder.unloaded(exported, selection.spec.method)
            self._metrics.merged_ahead.inc()  # before an await: `merged_ahead()` may return
            await self._park(version)
            await self._trim_parked()  # the least recently used beyond `keep` go
            return version
        slot = asyncio.create_task(self._take_slot())
        version = await self._load(exported, selection, flight, slot)
        if alone:
            self._metrics.merged_ahead.inc()
        return version

    def _take_back(self, key: VersionKey) -> Version | None:
        """A parked version, leased again at once: no `add_lora` (vLLM still holds it, or loads
        it from its files in the step that first runs a request naming it) and no wait for a
        slot (it counts at once; the reaper evicts back to the bound). Holds one lease. None if
        its files are gone (deleted from outside): if vLLM dropped it meanwhile, it would fail
        loading it inside a step, so it is built anew."""
        version = self._parked.pop(key)
        if not all((version.path / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE)):
            logger.warning("parked version %s lost its files: merging again", version.adapter_id)
            shutil.rmtree(version.path, ignore_errors=True)  # rare, and what is left is small
            self._report()
            return None
        version.leases = 1
        self._occupied += 1
        self._versions[key] = version
        self._report()
        self._wake()
        return version

    def _publish(self, version: Version, flight: _Flight) -> Version:
        version.leases = flight.waiters
        self._versions[version.key] = version
        self._report()
        return version

    async def _drop_slot(self, slot: asyncio.Task[None]) -> None:
        """Cancel a slot request; give the slot back if it was taken meanwhile."""
        slot.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await slot
        if not slot.cancelled() and slot.exception() is None:
            await self._give_slot()

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
                if self._stale(victim.key):
                    await self._remove(victim)  # out of the engine's memory now
                    await self.builder.discard(victim.path)
                else:  # handed to vLLM's LRU: no engine call
                    await self._park(victim)  # no await before parking: a lease finds it
                self._metrics.merged_evictions.inc()
                self._report()
                await self._give_slot()
                logger.info("evicted merged version", extra={"adapter_id": victim.adapter_id})
            await self._trim_parked()

    async def _unpark_all(self) -> bool:
        """Delete every parked version (the export directory is full); False if none was."""
        doomed = list(self._parked.values())
        self._parked.clear()
        self._report()
        for version in doomed:
            await self.builder.discard(version.path)
        return bool(doomed)

    async def _park(self, version: Version) -> None:
        """Keep the files of `version` (unleased; vLLM may hold it until its LRU drops it) for
        a reload, unless its pool is stale or the export directory lacks room: then they are
        deleted. Parking has no await before it (a lease looking for the key finds it parked)."""
        if not self._stale(version.key) and self._room_to_park(version):
            self._parked[version.key] = version
        else:
            await self.builder.discard(version.path)

    def _room_to_park(self, version: Version) -> bool:
        """Parking keeps room for the merges that may run at once (and one more) to export."""
        try:
            free = shutil.disk_usage(version.path.parent).free
        except OSError:
            return False
        return free >= (self.builder.worker.threads + 1) * version.nbytes

    async def _trim_parked(self) -> None:
        """Delete the parked versions of stale pools, and the least recently used ones beyond
        `keep` versions on disk. Parked versions have no lease and are not in the engine."""
        doomed = [v for v in self._parked.values() if self._stale(v.key)]
        excess = len(self._versions) + len(self._parked) - len(doomed) - self.keep
        fresh = [v for v in self._parked.values() if not self._stale(v.key)]
        doomed += fresh[: max(excess, 0)]
        for version in doomed:
            del self._parked[version.key]
        self._report()
        for version in doomed:
            await self.builder.discard(version.path)

    def _key(self, selection: Selection) -> VersionKey:
        return version_key(selection.pool, selection.spec, selection.rho, self._step)

    def _known(self, key: VersionKey) -> bool:
        """Loaded, parked or being built."""
        return key in self._versions or key in self._parked or key in self._flights

    def _stale(self, key: VersionKey) -> bool:
        return self._current is not None and key.pool_fingerprint != self._current

    def _victim(self) -> Version | None:
        """An unleased version to evict now: a stale one, else the least recently used
        unpinned one while builds are waiting for a slot or fewer than `spare` are free."""
        unleased = [v for v in self._versions.values() if v.leases == 0]
        for version in unleased:
            if self._stale(version.key):
                return version
        if self._occupied + self._slot_waiters <= self.capacity - self.spare:
            return None
        return next((v for v in unleased if v.pinned_by is None), None)

    async def _remove(self, version: Version) -> None:
        """`remove_lora` a version of a stale pool. Not holding it is no error (vLLM's LRU may
        have dropped it, or no request ran with it since it was taken back); a failure is
        logged and counted, never raised to a request (invariant 7)."""
        try:
            await self._engine.remove_lora(version.lora_id)
        except Exception as err:
            logger.error("could not remove %s from the engine: %s", version.adapter_id, err)
            self._metrics.eviction_errors.inc()

    def _report_ahead(self) -> None:
        self._metrics.ahead_backlog.set(self.ahead_backlog)

    def _report(self) -> None:
        self._metrics.resident_adapters.set(len(self._versions))
        self._metrics.parked_adapters.set(len(self._parked))
        on_disk = [*self._versions.values(), *self._parked.values()]
        self._metrics.export_dir_bytes.set(sum(v.nbytes for v in on_disk))


def _log_failure(task: asyncio.Task[Version]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("merge failed: %s", task.exception())  # also marks it retrieved
