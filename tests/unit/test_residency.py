"""The residency manager's invariants (server/residency.py docstring), each under real
concurrency: many tasks on a real event loop, real merges and files, a test double engine (the
real engine is exercised in tests/integration)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from serving import EngineDouble, make_residency, on_disk, run, select, settle, tiered

from loramerge.merge_engine import AdapterPool, MergeSpec, load_adapter
from loramerge.server.errors import EngineUnavailableError
from loramerge.server.residency import Residency
from loramerge.server.selection import Selection
from loramerge.server.versions import Version


def test_concurrent_leases_share_one_build(pool3: AdapterPool, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = EngineDouble(load_seconds=0.05)
        residency = make_residency(engine, tmp_path / "run")
        residency.start()

        async def request() -> tuple[str, bool]:
            async with residency.lease(select(pool3, 1, 1, 0)) as lease:
                await asyncio.sleep(0.01)
                return lease.version.adapter_id, lease.cached

        results = await asyncio.gather(*[request() for _ in range(20)])
        assert len({adapter_id for adapter_id, _ in results}) == 1
        assert len(engine.added) == 1
        async with residency.lease(select(pool3, 1.0001, 1, 0)) as lease:
            assert lease.cached  # rounds to the same preference
        assert load_adapter(Path(engine.added[0][2])).modules  # a real PEFT adapter on disk
        await residency.close()
        assert engine.removed == []  # close does not call into the engine

    run(scenario)


def test_only_the_first_version_of_a_pool_and_spec_waits_for_add_lora(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    """vLLM checks the first version of each pool and spec (`add_lora`: an error reaches only
    its requests); a later one differs only in its weights, so its request goes to the engine
    at once and vLLM loads it from its files in the step. A refused first version is not
    taken as checked: the next build of that pool and spec is `add_lora`ed again."""

    async def scenario() -> None:
        engine = EngineDouble()
        residency = make_residency(engine, tmp_path / "run", capacity=4)
        residency.start()
        smaller = pool3.without("math")
        capped = dataclasses.replace(select(pool3, 1, 1, 0), spec=MergeSpec(rank=2))
        firsts = [select(pool3, 1, 0, 0), select(smaller, 1, 0), capped]
        for selection in firsts:
            async with residency.lease(selection) as lease:
                assert lease.version.lora_id in engine.loaded  # before the request ran
                assert "load" in lease.version.phase_seconds
        async with residency.lease(select(pool3, 0, 1, 0)) as later:
            assert later.version.lora_id not in engine.loaded  # no add_lora
            assert "load" not in later.version.phase_seconds
            await engine.run(later.version.lora_request)  # its step loads it from its files
            assert engine.loaded[later.version.lora_id] == str(later.version.path)
        assert len(engine.added) == 3
        engine.refuse_add = True
        other = dataclasses.replace(capped, spec=MergeSpec(rank=3))
        with pytest.raises(EngineUnavailableError):
            async with residency.lease(other):
                pass
        engine.refuse_add = False
        async with residency.lease(dataclasses.replace(other, rho=(0.0, 1.0, 0.0))) as lease:
            assert lease.version.lora_id in engine.loaded and len(engine.added) == 4
        await residency.close()

    run(scenario)


def test_bounded_and_leased_means_loadable_under_churn(pool3: AdapterPool, tmp_path: Path) -> None:
    """Invariants 1 and 2: 60 requests over 12 preferences, capacity 3, random hold times and
    pool changes meanwhile; every lease keeps its version resident with its files present for
    its whole life (each of its steps finds it loaded), and at most 3 stay resident."""

    async def scenario() -> None:
        engine = EngineDouble(load_seconds=0.001)
        residency = make_residency(engine, tmp_path / "run", capacity=3)
        residency.start()
        smaller = pool3.without("math")
        pools = [pool3, smaller]
        chooser = random.Random(7)
        checks = 0

        async def request(i: int) -> None:
            nonlocal checks
            pool = pools[i % 2]
            weights = [1 + (i % 6), 1 + (i % 4), 1][: len(pool)]
            async with residency.lease(select(pool, *weights)) as lease:
                for _ in range(3):
                    await engine.run(lease.version.lora_request)  # a step: loads it if dropped
                    assert lease.version in residency.versions()  # never evicted while leased
                    await engine.run(lease.version.lora_request)  # found, or loaded from its files
                    assert lease.version.path.is_dir()
                    checks += 1
                    await asyncio.sleep(chooser.random() * 0.01)

        async def change_pools() -> None:
            for i in range(10):
                await residency.pool_changed(pools[i % 2])
                await asyncio.sleep(0.01)

        await asyncio.gather(change_pools(), *[request(i) for i in range(60)])
        assert checks == 180
        await settle(residency)
        assert residency.resident <= 3
        assert residency.resident + len(residency.parked()) <= 3  # keep: the capacity
        assert on_disk(tmp_path / "run") == kept(residency)  # loaded or parked, no orphan
        await residency.close()

    run(scenario)


def test_stale_eviction_takes_a_fresh_look_at_leases(pool3: AdapterPool, tmp_path: Path) -> None:
    """The race of issue 10: a request leases an old-pool version just as the pool changes."""

    async def scenario() -> None:
        engine = EngineDouble()
        residency = make_residency(engine, tmp_path / "run", capacity=4)
        residency.start()
        old = select(pool3, 1, 1, 1)
        async with residency.lease(old):
            pass
        leased = asyncio.Event()
        release = asyncio.Event()

        async def late_request() -> None:
            async with residency.lease(old) as lease:
                leased.set()
                await release.wait()
                await engine.run(lease.version.lora_request)  # found, or loaded from its files
                assert lease.version.lora_id not in engine.removed

        task = asyncio.create_task(late_request())
        await residency.pool_changed(pool3.without("math"))  # wakes the reaper
        await leased.wait()
        await settle(residency)
        assert residency.resident == 1  # leased: kept although stale
        release.set()
        await task
        await settle(residency)
        assert residency.resident == 0 and engine.loaded == {}  # now retired
        assert on_disk(tmp_path / "run") == set()
        await residency.close()

    run(scenario)


def test_a_new_version_outlives_eviction_until_its_waiters_ran(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    """Invariant 3: capacity 2, one version held; B is built for 3 waiters while C waits for a
    slot; the reaper may not evict B before B's waiters have used it."""

    async def scenario() -> None:
        engine = EngineDouble(load_seconds=0.02)
        residency = make_residency(engine, tmp_path / "run", capacity=2)
        residency.start()
        hold = asyncio.Event()
        held = asyncio.Event()

        async def holder() -> None:
            async with residency.lease(select(pool3, 1, 0, 0)):
                held.set()
                await hold.wait()

        async def waiter_b() -> str:
            async with residency.lease(select(pool3, 0, 1, 0)) as lease:
                await asyncio.sleep(0)
                assert lease.version in residency.versions()  # not evicted before it ran
                await engine.run(lease.version.lora_request)  # found, or loaded from its files
                return lease.version.adapter_id

        async def request_c() -> str:
            async with residency.lease(select(pool3, 0, 0, 1)) as lease:
                return lease.version.adapter_id

        holding = asyncio.create_task(holder())
        await held.wait()
        b = [asyncio.create_task(waiter_b()) for _ in range(3)]
        c = asyncio.create_task(request_c())
        assert len(set(await asyncio.gather(*b))) == 1
        assert await c
        hold.set()
        await holding
        assert residency.resident <= 2
        await residency.close()

    run(scenario)


def test_a_cancelled_waiter_gives_back_its_lease(pool3: AdapterPool, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = EngineDouble(load_seconds=0.1)
        residency = make_residency(engine, tmp_path / "run", capacity=1)
        residency.start()

        async def request() -> str:
            async with residency.lease(select(pool3, 1, 2, 3)) as lease:
                return lease.version.adapter_id

        first = asyncio.create_task(request())
        second = asyncio.create_task(request())
        await asyncio.sleep(0.05)  # both wait for the build
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second  # the build went on for the other waiter
        assert len(engine.added) == 1
        (version,) = residency.versions()
        assert version.leases == 0
        async with residency.lease(select(pool3, 3, 2, 1)):  # needs the only slot: evicts it
            pass
        assert version not in residency.versions()
        await residency.close()

    run(scenario)


def test_a_failed_build_reaches_every_waiter_leaves_nothing_and_is_retried(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = EngineDouble(load_seconds=0.01)
        residency = make_residency(engine, tmp_path / "run")
        residency.start()

        async def request() -> str:
            async with residency.lease(select(pool3, 1, 1, 1)) as lease:
                return lease.version.adapter_id

        for failure in ("raise", "refuse"):
            engine.fail_add = RuntimeError("bad adapter") if failure == "raise" else None
            engine.refuse_add = failure == "refuse"
            results = await asyncio.gather(*[request() for _ in range(4)], return_exceptions=True)
            assert all(isinstance(r, EngineUnavailableError) for r in results), results
            assert residency.resident == 0
            assert on_disk(tmp_path / "run") == set()  # nothing half-written or left loaded
        engine.fail_add, engine.refuse_add = None, False
        assert await request()  # a later request builds again
        await settle(residency)
        assert engine.peak == 1  # the failed loads gave their slots back
        await residency.close()

    run(scenario)


def test_pins_survive_lru_and_move_with_their_tenant(pool3: AdapterPool, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = EngineDouble()
        residency = make_residency(engine, tmp_path / "run", capacity=3)
        residency.start()
        async with residency.lease(select(pool3, 1, 0, 0, pin_for="hot")) as first_pin:
            pass
        for weights in [(0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)]:
            async with residency.lease(select(pool3, *weights)):
                pass
        await settle(residency)
        assert first_pin.version in residency.versions()  # LRU passed it by
        async with residency.lease(select(pool3, 1, 0, 1, pin_for="hot")) as second_pin:
            pass
        assert first_pin.version.pinned_by is None  # one pin per tenant
        assert second_pin.version.pinned_by == "hot"
        async with residency.lease(select(pool3, 2, 1, 1, pin_for="other")) as other:
            pass
        async with residency.lease(select(pool3, 1, 2, 1, pin_for="third")) as refused:
            pass  # a third pin of capacity 3 would leave no slot for builds
        assert other.version.pinned_by == "other"
        assert refused.version.pinned_by is None
        await residency.pool_changed(pool3.without("code"))
        await settle(residency)
        assert residency.resident == 0  # stale beats pinned
        await residency.close()

    run(scenario)


def test_eviction_is_off_the_request_path_and_its_errors_stay_there(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = EngineDouble()
        residency = make_residency(engine, tmp_path / "run", capacity=1)
        residency.start()
        await use(engine, residency, select(pool3, 1, 0, 0))
        engine.remove_gate = asyncio.Event()  # remove_lora hangs like a dead engine's
        engine.fail_remove = RuntimeError("engine gone")
        # LRU eviction hands the version to vLLM's LRU: no engine call for the next build
        second = await asyncio.wait_for(use(engine, residency, select(pool3, 0, 1, 0)), 10)
        assert [v.adapter_id for v in residency.versions()] == [second]
        async with residency.lease(select(pool3, 0, 1, 0)) as lease:
            assert lease.cached
            await residency.pool_changed(pool3.without("code"))  # now stale
        await asyncio.sleep(0.05)  # the lease ended; its version's removal hangs meanwhile
        assert lease.version.path.is_dir()
        engine.remove_gate.set()  # ...and fails
        await settle(residency)
        assert residency._metrics.eviction_errors._value.get() == 1  # counted, not raised
        assert residency.versions() == [] and on_disk(tmp_path / "run") == set()  # deleted
        await residency.close()

    run(scenario)


def test_a_cancelled_request_releases_its_lease(pool3: AdapterPool, tmp_path: Path) -> None:
    """What a client cancelling or passing its deadline does to the request's task."""

    async def scenario() -> None:
        engine = EngineDouble()
        residency = make_residency(engine, tmp_path / "run", capacity=1)
        residency.start()
        generating = asyncio.Event()

        async def request() -> None:
            async with residency.lease(select(pool3, 1, 0, 0)):
                generating.set()
                await asyncio.sleep(60)  # generating when the client goes away

        tasks = [asyncio.create_task(request()) for _ in range(5)]
        await generating.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        (version,) = residency.versions()
        assert version.leases == 0
        async with residency.lease(select(pool3, 0, 1, 0)):  # so the only slot can be reused
            pass
        assert version not in residency.versions()
        await residency.close()

    run(scenario)


# --- two tiers (parked versions), spare slots, eviction overlapped with the merge -------------


def kept(residency: Residency) -> set[str]:
    return {v.adapter_id for v in residency.versions() + residency.parked()}


async def parked_one(engine: EngineDouble, residency: Residency, pool: AdapterPool) -> Version:
    """With capacity 1: use (1, 0, 0), then (0, 1, 0), which evicts and parks the first."""
    first = await use(engine, residency, select(pool, 1, 0, 0))
    await use(engine, residency, select(pool, 0, 1, 0))
    await settle(residency)
    [parked] = residency.parked()
    assert parked.adapter_id == first  # evicted, files kept
    return parked


def test_an_evicted_version_is_parked_and_loaded_again_without_a_merge(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tmp_path / "run"
        residency = tiered(engine, run_dir, capacity=1, keep=3)
        first = await parked_one(engine, residency, pool3)
        assert first.lora_id not in engine.loaded and first.path.is_dir()
        async with residency.lease(select(pool3, 1, 0, 0)) as again:
            assert again.cached  # no merge: the same files, name and id
            assert again.version.adapter_id == first.adapter_id
            assert again.version.lora_id not in engine.loaded  # no add_lora before the request
            await engine.run(again.version.lora_request)  # its step loads it from its files
            assert engine.loaded[again.version.lora_id] == str(first.path)
        assert [name for name, _, _ in engine.added].count(first.adapter_id) == 1
        for weights in [(0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1)]:
            async with residency.lease(select(pool3, *weights)):
                pass
        await settle(residency)
        assert residency.resident == 1 and len(residency.parked()) == 2  # keep 3 on disk
        assert on_disk(run_dir) == kept(residency)
        await residency.pool_changed(pool3.without("code"))
        await settle(residency)
        assert residency.parked() == [] and residency.resident == 0
        assert on_disk(run_dir) == set()  # stale: parked files deleted with no engine call
        await residency.close()

    run(scenario)


def test_an_evicted_version_is_left_to_vllms_lru_and_taken_back_for_free(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    """Our LRU evicts without `remove_lora`: vLLM keeps the adapter until its own LRU needs the
    room (here it holds 4, we keep 2 resident), so a returning tenant's version is used as it
    is, with no merge, no add_lora and no load from disk."""

    async def scenario() -> None:
        engine = EngineDouble(capacity=4)
        residency = tiered(engine, tmp_path / "run", capacity=2, keep=4)
        first = await use(engine, residency, select(pool3, 1, 0, 0))
        for weights in [(0, 1, 0), (0, 0, 1)]:
            await use(engine, residency, select(pool3, *weights))
        await settle(residency)
        (parked,) = residency.parked()
        assert parked.adapter_id == first and parked.lora_id in engine.loaded
        async with residency.lease(select(pool3, 1, 0, 0)) as again:
            assert again.cached and again.version is parked
            await engine.run(again.version.lora_request)
        assert engine.removed == [] and engine.loads == [1, 2, 3]  # each version loaded once
        assert [name for name, _, _ in engine.added] == [first]  # the first of its pool and spec
        await residency.close()

    run(scenario)


def test_a_parked_version_is_taken_back_at_once_over_the_bound(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    """Every slot leased: a parked version's lease neither waits for a slot nor calls into the
    engine; the reaper evicts back to the bound once leases end, and parks again, with its
    files, a version vLLM's own LRU dropped meanwhile."""

    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tmp_path / "run"
        residency = tiered(engine, run_dir, capacity=1, keep=3)
        async with residency.lease(select(pool3, 1, 0, 0)) as first:
            pass
        async with residency.lease(select(pool3, 0, 1, 0)) as held:
            await settle(residency)
            assert residency.parked() == [first.version]
            added = list(engine.added)
            lease = residency.lease(select(pool3, 1, 0, 0))
            again = await asyncio.wait_for(lease.__aenter__(), 1)  # the only slot is leased
            assert again.cached and again.version is first.version
            assert residency.resident == 2 and engine.added == added  # no add_lora
            await engine.run(again.version.lora_request)  # vLLM's LRU (1) drops `held`'s
            await lease.__aexit__(None, None, None)
            await settle(residency)
            assert residency.versions() == [held.version]  # back to the bound
            assert residency.parked() == [first.version] and first.version.path.is_dir()
        await residency.close()

    run(scenario)


def test_a_parked_version_whose_files_were_deleted_is_merged_again(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    """Someone cleans /dev/shm: the lease does not hand vLLM a directory it would fail to load
    inside a step; it merges the version again into a new directory."""

    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tmp_path / "run"
        residency = tiered(engine, run_dir, capacity=1, keep=3)
        first = await parked_one(engine, residency, pool3)
        (first.path / "adapter_model.safetensors").unlink()
        async with residency.lease(select(pool3, 1, 0, 0)) as again:
            assert not again.cached and again.version.path != first.path
            await engine.run(again.version.lora_request)
            assert engine.loaded[again.version.lora_id] == str(again.version.path)
        assert not first.path.exists()
        await residency.close()

    run(scenario)


def test_parked_tier_invariants_under_churn(pool3: AdapterPool, tmp_path: Path) -> None:
    """Invariants 1, 2 and 8 with two tiers and a spare slot: 80 requests over 12 preferences,
    capacity 3, 6 kept on disk, random hold times, pool changes meanwhile; each request runs
    in the engine, which loads a version taken back from disk as vLLM does."""

    async def scenario() -> None:
        engine = EngineDouble(load_seconds=0.001)
        run_dir = tmp_path / "run"
        residency = tiered(engine, run_dir, capacity=3, keep=6, spare=1)
        smaller = pool3.without("math")
        pools = [pool3, smaller]
        chooser = random.Random(11)
        checks = 0

        async def request(i: int) -> None:
            nonlocal checks
            pool = pools[(i // 20) % 2]
            weights = [1 + (i % 6), 1 + (i % 4), 1][: len(pool)]
            async with residency.lease(select(pool, *weights)) as lease:
                for _ in range(3):
                    await engine.run(lease.version.lora_request)  # loads one taken back
                    assert lease.version in residency.versions()
                    await engine.run(lease.version.lora_request)  # found, or loaded from its files
                    assert lease.version.path.is_dir()
                    checks += 1
                    await asyncio.sleep(chooser.random() * 0.01)

        async def change_pools() -> None:
            for i in range(6):
                await asyncio.sleep(0.03)
                await residency.pool_changed(pools[i % 2])

        await asyncio.gather(change_pools(), *[request(i) for i in range(80)])
        assert checks == 240
        await settle(residency)
        assert residency.resident <= 3
        assert residency.resident + len(residency.parked()) <= 6
        assert on_disk(run_dir) == kept(residency)
        current = residency._current
        assert all(v.key.pool_fingerprint == current for v in residency.parked())
        await residency.close()

    run(scenario)


def test_a_build_asks_for_its_slot_before_it_merges(pool3: AdapterPool, tmp_path: Path) -> None:
    """The eviction a build needs runs while the build waits for (and runs) its merge."""

    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tmp_path / "run"
        residency = tiered(engine, run_dir, capacity=1, keep=1, threads=1)
        async with residency.lease(select(pool3, 1, 0, 0)) as old:
            pass
        busy = threading.Event()
        blocker = asyncio.create_task(residency.builder.worker.run(busy.wait, "a blocker"))
        task = asyncio.create_task(use(engine, residency, select(pool3, 0, 1, 0)))
        try:
            await settle(residency)
            assert residency.parked() == [old.version]  # evicted already: the merge has not run
            assert on_disk(run_dir) == {old.version.adapter_id}  # nothing new yet
        finally:
            busy.set()
        await blocker
        assert await task != old.version.adapter_id
        await residency.close()

    run(scenario)


def test_a_failed_build_gives_back_the_slot_it_took_early(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tmp_path / "run"
        residency = tiered(engine, run_dir, capacity=1, keep=2)
        await use(engine, residency, select(pool3, 1, 0, 0))
        export = residency.builder.export

        async def failing(*args: object) -> None:
            await asyncio.sleep(0.05)  # the slot is taken meanwhile
            raise RuntimeError("merge failed")

        residency.builder.export = failing  # type: ignore[method-assign, assignment]
        with pytest.raises(RuntimeError, match="merge failed"):
            await use(engine, residency, select(pool3, 0, 1, 0))
        residency.builder.export = export  # type: ignore[method-assign]
        # with the only slot leaked, these would wait forever
        await asyncio.wait_for(use(engine, residency, select(pool3, 0, 0, 1)), 10)
        await asyncio.wait_for(use(engine, residency, select(pool3, 1, 0, 0)), 10)  # parked: reload
        await settle(residency)
        assert residency.resident == 1 and on_disk(run_dir) == kept(residency)
        await residency.close()

    run(scenario)


def test_a_spare_slot_keeps_eviction_off_the_miss(pool3: AdapterPool, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = EngineDouble()
        residency = tiered(engine, tmp_path / "run", capacity=3, keep=6, spare=1)
        for weights in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
            await use(engine, residency, select(pool3, *weights))
        await settle(residency)
        assert residency.resident == 2 and len(residency.parked()) == 1  # one slot kept free
        assert len(engine.loaded) == 3  # vLLM still holds the parked one
        engine.remove_gate = asyncio.Event()  # an engine call would hang from now on
        await asyncio.wait_for(use(engine, residency, select(pool3, 1, 1, 0)), 10)
        await settle(residency)
        assert residency.resident == 2 and len(residency.parked()) == 2
        await residency.close()

    run(scenario)


def test_a_lease_during_the_removal_of_its_key_builds_anew_and_leaves_no_orphan(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    """A request that selected a pool just before it changed leases while the old version is
    being removed: it gets a copy of its own, and both go once unleased."""

    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tmp_path / "run"
        residency = tiered(engine, run_dir, capacity=2, keep=3)
        old = select(pool3, 1, 0, 0)
        first = await use(engine, residency, old)
        engine.remove_gate = asyncio.Event()
        await residency.pool_changed(pool3.without("code"))  # removing `first` hangs
        await settle_soon()
        again = asyncio.create_task(use(engine, residency, old))  # mid-removal
        await settle_soon()
        engine.remove_gate.set()
        assert await again != first  # built anew: the copy being removed was in neither tier
        await settle(residency)
        assert residency.resident == 0 and on_disk(run_dir) == set()  # both stale: removed
        assert len(engine.removed) == 2
        await residency.close()

    run(scenario)


async def use(engine: EngineDouble, residency: Residency, selection: Selection) -> str:
    """A request: lease the version and run a step with it (vLLM loads it if it must)."""
    async with residency.lease(selection) as lease:
        await engine.run(lease.version.lora_request)
        return lease.version.adapter_id


async def settle_soon() -> None:
    for _ in range(50):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


def test_parked_versions_give_way_when_the_export_dir_fills(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    """On a real 64 KiB tmpfs (a handful of versions), parking up to 16 versions must never
    make a build fail for lack of space: parking stops while room runs short, and a build that
    finds the directory full deletes the parked versions and exports again."""
    mount = tmp_path / "shm"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = mount / "run"
        residency = tiered(engine, run_dir, capacity=1, keep=16, threads=1)
        parked_at_most = 0
        for i in range(12):
            await use(engine, residency, select(pool3, 1 + i % 4, 1 + i // 4, 1))
            await settle(residency)
            parked_at_most = max(parked_at_most, len(residency.parked()))
            assert on_disk(run_dir) == kept(residency)
        assert 0 < parked_at_most < 11  # parked while there was room, not beyond
        parked = residency.parked()
        assert parked
        busy = threading.Event()  # the merge waits until the eviction it needs has run
        blocker = asyncio.create_task(residency.builder.worker.run(busy.wait, "a blocker"))
        task = asyncio.create_task(use(engine, residency, select(pool3, 9, 1, 1)))
        await settle(residency)
        ballast = mount / "ballast"
        ballast.write_bytes(b"\0" * (shutil.disk_usage(mount).free - 2048))  # no version fits
        busy.set()
        await blocker
        await asyncio.wait_for(task, 10)  # exported all the same
        assert not any(v.path.exists() for v in parked)  # the parked versions made room
        await settle(residency)
        assert on_disk(run_dir) == kept(residency)
        await residency.close()

    try:
        run(scenario)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
