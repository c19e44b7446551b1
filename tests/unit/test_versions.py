"""The merged-version cache's logic in isolation: a recording stand-in for the engine (the real
engine is exercised in tests/integration), real merges and real files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from loramerge.merge_engine import AdapterPool, MergeSpec, load_adapter
from loramerge.server.config import MetricsSettings
from loramerge.server.metrics import Metrics
from loramerge.server.versions import MergedVersions, quantize_preference


class RecordingEngine:
    def __init__(self, load_seconds: float = 0.0) -> None:
        self.added: list[tuple[str, int, str]] = []
        self.removed: list[int] = []
        self.load_seconds = load_seconds

    async def add_lora(self, request: object) -> bool:
        await asyncio.sleep(self.load_seconds)
        self.added.append(request)  # type: ignore[arg-type]
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


def make_versions(engine: RecordingEngine, export_dir: Path, capacity: int = 2) -> MergedVersions:
    return MergedVersions(
        engine,
        lambda name, lora_id, path: (name, lora_id, path),
        Metrics(MetricsSettings(), CollectorRegistry()),
        capacity=capacity,
        export_dir=export_dir,
        export_dtype=torch.float32,
        preference_step=0.01,
        device="cpu",
        dtype="float32",
        max_concurrent_merges=2,
        calibration_cache_size=4,
    )


def rho(*weights: float) -> tuple[float, ...]:
    total = sum(weights)
    return tuple(w / total for w in weights)


def test_quantize_preference() -> None:
    assert quantize_preference((0.333, 0.667), 0.01) == (33, 67)
    assert quantize_preference((0.004, 0.996), 0.01) == (0, 100)
    assert quantize_preference((0.002, 0.003, 0.995), 0.5) == (0, 0, 2)


def test_concurrent_requests_share_one_merge(pool3: AdapterPool, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = RecordingEngine(load_seconds=0.05)
        versions = make_versions(engine, tmp_path / "export")
        await versions.pool_changed(pool3)

        async def request() -> tuple[str, bool]:
            async with versions.lease(pool3, MergeSpec(), rho(1, 1, 0)) as lease:
                await asyncio.sleep(0.01)
                return lease.version.adapter_id, lease.cached

        results = await asyncio.gather(*[request() for _ in range(5)])
        assert len({adapter_id for adapter_id, _ in results}) == 1
        assert len(engine.added) == 1
        async with versions.lease(pool3, MergeSpec(), rho(1.0001, 1, 0)) as lease:
            assert lease.cached  # rounds to the same preference
        *_, path = engine.added[0]
        assert load_adapter(Path(path)).modules  # a real PEFT adapter on disk
        await versions.close()
        assert not Path(path).exists()

    asyncio.run(scenario())


def test_lru_eviction_spares_leased_and_pinned_versions(pool3: AdapterPool, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = RecordingEngine()
        versions = make_versions(engine, tmp_path / "export", capacity=2)
        await versions.pool_changed(pool3)
        async with versions.lease(pool3, MergeSpec(), rho(1, 0, 0), pin_for="hot") as hot:
            pass
        async with versions.lease(pool3, MergeSpec(), rho(0, 1, 0)) as held:
            async with versions.lease(pool3, MergeSpec(), rho(0, 0, 1)):
                pass  # over capacity: the only unleased, unpinned one is this one
            assert versions.resident == 2
            ids = {v.adapter_id for v in versions.versions()}
            assert ids == {hot.version.adapter_id, held.version.adapter_id}
        assert hot.version.pinned_by == "hot"
        assert len(engine.removed) == 1
        lora_ids = [lora_id for _, lora_id, _ in engine.added]
        paths = [path for *_, path in engine.added]
        assert len(set(lora_ids)) == len(lora_ids) == 3  # never reused
        assert len(set(paths)) == 3
        await versions.close()

    asyncio.run(scenario())


def test_pool_change_retires_old_versions_after_their_leases(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = RecordingEngine()
        versions = make_versions(engine, tmp_path / "export", capacity=8)
        await versions.pool_changed(pool3)
        smaller = pool3.without("math")
        async with versions.lease(pool3, MergeSpec(), rho(1, 1, 0)) as old:
            await versions.pool_changed(smaller)
            assert versions.resident == 1  # still leased: not evicted under the request
            async with versions.lease(smaller, MergeSpec(), rho(1, 1)) as new:
                assert new.version.adapter_id != old.version.adapter_id
        assert [v.adapter_id for v in versions.versions()] == [new.version.adapter_id]
        assert engine.removed == [old.version.lora_id]
        await versions.close()

    asyncio.run(scenario())


def test_a_cancelled_requester_does_not_cancel_the_merge(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine = RecordingEngine(load_seconds=0.2)
        versions = make_versions(engine, tmp_path / "export")
        await versions.pool_changed(pool3)

        async def request() -> str:
            async with versions.lease(pool3, MergeSpec(), rho(1, 2, 3)) as lease:
                return lease.version.adapter_id

        first = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        second = asyncio.create_task(request())
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second
        assert len(engine.added) == 1
        await versions.close()

    asyncio.run(scenario())


def test_a_failed_merge_reaches_every_waiter_and_is_retried(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario() -> None:
        class FailingOnce(RecordingEngine):
            async def add_lora(self, request: object) -> bool:
                if not self.added:
                    self.added.append(request)  # type: ignore[arg-type]
                    raise RuntimeError("engine refused the adapter")
                return await super().add_lora(request)

        engine = FailingOnce()
        versions = make_versions(engine, tmp_path / "export")
        await versions.pool_changed(pool3)

        async def request() -> str:
            async with versions.lease(pool3, MergeSpec(), rho(1, 1, 1)) as lease:
                return lease.version.adapter_id

        results = await asyncio.gather(request(), request(), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert versions.resident == 0
        assert not any(p.is_dir() for p in (tmp_path / "export").rglob("m*"))  # nothing on disk
        assert await request()  # a later request merges again
        await versions.close()

    asyncio.run(scenario())
