"""The residency manager's invariants (server/residency.py docstring), each under real
concurrency: many tasks on a real event loop, real merges and files, a test double engine (the
real engine is exercised in tests/integration)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from serving import EngineDouble, make_residency, select

from loramerge.merge_engine import AdapterPool, load_adapter
from loramerge.server.errors import EngineUnavailableError
from loramerge.server.residency import Residency


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=120))


async def settle(residency: Residency) -> None:
    """Let the reaper finish what it was woken for."""
    for _ in range(50):
        await asyncio.sleep(0)
    async with residency._reap_lock:  # a pass in progress ends
        pass
    await asyncio.sleep(0)


def on_disk(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()


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


def test_bounded_and_leased_means_loaded_under_churn(pool3: AdapterPool, tmp_path: Path) -> None:
    """Invariants 1 and 2: 60 requests over 12 preferences, capacity 3, random hold times and
    pool changes meanwhile; every lease sees its version loaded and its files present for its
    whole life, and never more than 3 versions are in the engine."""

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
                    assert lease.version.lora_id in engine.loaded
                    assert lease.version.path.is_dir()
                    checks += 1
                    await asyncio.sleep(chooser.random() * 0.01)

        async def change_pools() -> None:
            for i in range(10):
                await residency.pool_changed(pools[i % 2])
                await asyncio.sleep(0.01)

        await asyncio.gather(change_pools(), *[request(i) for i in range(60)])
        assert checks == 180
        assert engine.peak <= 3
        await settle(residency)
        assert len(engine.loaded) == residency.resident <= 3
        assert on_disk(tmp_path / "run") == {v.adapter_id for v in residency.versions()}
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
                assert lease.version.lora_id in engine.loaded
                assert lease.version.path.is_dir()

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
                assert lease.version.lora_id in engine.loaded
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
        assert engine.peak <= 2
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
        assert engine.removed == [version.lora_id]
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
        async with residency.lease(select(pool3, 1, 0, 0)):
            pass
        engine.remove_gate = asyncio.Event()  # remove_lora hangs like a dead engine's
        engine.fail_remove = RuntimeError("engine gone")
        done = asyncio.Event()

        async def request() -> None:
            async with residency.lease(select(pool3, 0, 1, 0)):
                pass
            done.set()

        task = asyncio.create_task(request())
        await asyncio.sleep(0.2)
        assert not done.is_set()  # waits for the slot while removal hangs
        engine.remove_gate.set()
        await task  # the failed removal is not this request's error
        await settle(residency)
        assert residency._metrics.eviction_errors._value.get() == 1
        assert on_disk(tmp_path / "run") == {v.adapter_id for v in residency.versions()}

        engine.remove_gate, engine.fail_remove = asyncio.Event(), None
        (resident,) = residency.versions()
        async with residency.lease(select(pool3, 0, 1, 0)) as lease:
            assert lease.cached
            await residency.pool_changed(pool3.without("code"))  # now stale
        await asyncio.sleep(0.05)  # the lease ended; its version's removal hangs meanwhile
        assert engine.removed == [] and resident.lora_id in engine.loaded
        engine.remove_gate.set()
        await settle(residency)
        assert engine.removed == [resident.lora_id]
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
        assert engine.removed == [version.lora_id]
        await residency.close()

    run(scenario)
