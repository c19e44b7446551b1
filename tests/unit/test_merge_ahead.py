"""Merging ahead (server/residency.py, invariant 9): a stored tenant's version is merged and
parked before its first request, which then only loads it. Real merges and files, real merge
workers, a test double engine (tests/integration/test_tenants.py runs it on the real one)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from serving import EngineDouble, fail_first_merge, on_disk, run, select, settle, tiered

from loramerge.merge_engine import AdapterPool
from loramerge.server import versions
from loramerge.server.config import MetricsSettings
from loramerge.server.metrics import Metrics
from loramerge.server.residency import Residency

GATES: dict[tuple[float, ...], threading.Event] = {}  # a merge of this preference waits


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[float, ...]]]:
    """The preferences merged, in order (every call of the merge engine)."""
    calls: list[tuple[float, ...]] = []
    real = versions.merge

    def counted(pool: AdapterPool, preference: dict[str, float], *a: object, **k: object) -> object:
        weights = tuple(round(preference[n], 2) for n in pool.names)
        calls.append(weights)
        if weights in GATES:
            assert GATES[weights].wait(30)
        return real(pool, preference, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(versions, "merge", counted)
    yield calls
    GATES.clear()


async def started(engine: EngineDouble, run_dir: Path, pool: AdapterPool, **kw: Any) -> Residency:
    residency = tiered(engine, run_dir, **kw)
    await residency.engine_started(pool)
    return residency


def test_a_version_merged_ahead_is_parked_and_its_first_request_only_loads_it(
    pool3: AdapterPool, tmp_path: Path, merges: list[tuple[float, ...]]
) -> None:
    async def scenario() -> None:
        engine = EngineDouble()
        registry = CollectorRegistry()
        metrics = Metrics(MetricsSettings(), registry)
        residency = await started(
            engine, tmp_path / "run", pool3, capacity=1, keep=4, registry_metrics=metrics
        )
        residency.merge_ahead(select(pool3, 0, 1, 0))  # the first of its pool and spec
        await residency.merged_ahead()
        [checked] = residency.versions()  # add_lora'd (vLLM checks it) and resident, not parked
        assert [name for name, _, _ in engine.added] == [checked.adapter_id]
        residency.merge_ahead(select(pool3, 1, 0, 0))
        await residency.merged_ahead()
        assert len(engine.added) == 1 and residency.resident == 1  # not loaded
        [parked] = residency.parked()
        assert on_disk(tmp_path / "run") == {checked.adapter_id, parked.adapter_id}
        assert merges == [(0, 1, 0), (1, 0, 0)]
        assert registry.get_sample_value("loramerge_merged_ahead_total") == 2
        residency.merge_ahead(select(pool3, 1, 0, 0))  # known already: nothing to do
        await residency.merged_ahead()
        async with residency.lease(select(pool3, 1, 0, 0)) as lease:
            assert lease.cached and lease.version.adapter_id == parked.adapter_id
            await engine.run(lease.version.lora_request)  # its step loads it from its files
            assert engine.loaded == {parked.lora_id: str(parked.path)}
        assert len(engine.added) == 1  # never add_lora'd: no wait for the engine before it
        assert merges == [(0, 1, 0), (1, 0, 0)]  # no second merge
        assert registry.get_sample_value("loramerge_merged_adapter_cache_hits_total") == 1
        await residency.close()

    run(scenario)


def test_requests_merge_first_and_a_request_joins_a_merge_ahead(
    pool3: AdapterPool, tmp_path: Path, merges: list[tuple[float, ...]]
) -> None:
    async def scenario() -> None:
        engine = EngineDouble(load_seconds=0.3)  # a request's build lasts past its merge
        run_dir = tmp_path / "run"
        residency = await started(engine, run_dir, pool3, capacity=2, keep=4)
        GATES[(0, 0, 1)] = threading.Event()

        async def request(*weights: float) -> bool:
            async with residency.lease(select(pool3, *weights)) as lease:
                await engine.run(lease.version.lora_request)
                assert engine.loaded[lease.version.lora_id] == str(lease.version.path)
                return lease.cached

        first = asyncio.create_task(request(0, 1, 0))
        while not merges:
            await asyncio.sleep(0.005)
        residency.merge_ahead(select(pool3, 0, 0, 1))
        while not first.done():  # while the request's version merges and loads, nothing else
            assert merges == [(0, 1, 0)]
            await asyncio.sleep(0.01)
        assert await first is False
        while len(merges) < 2:
            await asyncio.sleep(0.005)
        assert merges == [(0, 1, 0), (0, 0, 1)]  # then the merge ahead (held at its gate)
        # a request for the key being merged ahead joins that merge, and it is loaded for it
        joined = asyncio.create_task(request(0, 0, 1))
        await asyncio.sleep(0.05)
        GATES[(0, 0, 1)].set()
        assert await joined is False  # it waited for a merge
        await residency.merged_ahead()
        assert merges == [(0, 1, 0), (0, 0, 1)]  # one merge each
        await settle(residency)
        assert residency.parked() == [] and residency.resident == 2
        await residency.close()

    run(scenario)


def test_merges_ahead_stay_within_keep_and_never_park_a_stale_pool(
    pool3: AdapterPool, tmp_path: Path, merges: list[tuple[float, ...]]
) -> None:
    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tmp_path / "run"
        residency = await started(engine, run_dir, pool3, capacity=1, keep=3)
        weights = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)]
        for w in weights:
            residency.merge_ahead(select(pool3, *w))
        await residency.merged_ahead()
        await settle(residency)
        kept = residency.versions() + residency.parked()  # the first was add_lora'd: resident
        assert len(kept) == 3  # the three newest: the oldest waiting ones were dropped
        assert on_disk(run_dir) == {v.adapter_id for v in kept}
        assert len(merges) == 3 and set(merges) == {(0, 0, 1), (0.5, 0.5, 0), (0, 0.5, 0.5)}
        GATES[(0.2, 0.4, 0.4)] = threading.Event()
        for w in [(1, 2, 2), (2, 1, 2), (2, 2, 1)]:
            residency.merge_ahead(select(pool3, *w))
        while len(merges) < 4:
            await asyncio.sleep(0.005)
        await residency.pool_changed(pool3.without("code"))  # one merging, two waiting
        GATES[(0.2, 0.4, 0.4)].set()
        await residency.merged_ahead()
        assert len(merges) == 4  # the waiting ones of the old pool were not merged
        await settle(residency)
        assert residency.parked() == [] and residency.resident == 0
        assert on_disk(run_dir) == set()
        await residency.close()

    run(scenario)


def test_a_failed_merge_ahead_leaves_nothing_and_the_request_merges_again(
    pool3: AdapterPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fail_first_merge(monkeypatch)

    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tmp_path / "run"
        residency = await started(engine, run_dir, pool3, capacity=1, keep=3)
        residency.merge_ahead(select(pool3, 2, 1, 0))
        await residency.merged_ahead()
        assert residency.parked() == [] and on_disk(run_dir) == set()
        async with residency.lease(select(pool3, 2, 1, 0)) as lease:
            assert not lease.cached and lease.version.path.is_dir()
        assert calls == [True, False]
        await residency.close()

    run(scenario)
