"""Building the serving core for unit tests: real merges, real files, real merge workers, and a
test double of vLLM's engine that checks what a real one would rely on."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from loramerge.merge_engine import AdapterPool, CalibrationCache, MergeSpec
from loramerge.server import versions
from loramerge.server.config import MetricsSettings
from loramerge.server.merge_memory import MergeMemory
from loramerge.server.merge_worker import MergeWorker
from loramerge.server.metrics import Metrics
from loramerge.server.residency import Residency
from loramerge.server.selection import Selection
from loramerge.server.versions import VersionBuilder


class EngineDouble:
    """Records add_lora/remove_lora; `loaded` is what a real engine would hold: at most
    `capacity` adapters (vLLM's `max_cpu_loras`; `make_residency` sets the residency's), the
    least recently used dropped for a new one, as vLLM's LRU does. A version is loaded only
    from a complete directory."""

    def __init__(self, load_seconds: float = 0.0, capacity: int | None = None) -> None:
        self.loaded: OrderedDict[int, str] = OrderedDict()  # lora_id → path, LRU first
        self.capacity = capacity
        self.added: list[tuple[str, int, str]] = []
        self.loads: list[int] = []  # lora ids, each time one is loaded (add_lora or a step)
        self.removed: list[int] = []
        self.peak = 0
        self.load_seconds = load_seconds
        self.remove_gate: asyncio.Event | None = None  # set: remove_lora blocks until it is
        self.fail_add: BaseException | None = None
        self.refuse_add = False
        self.fail_remove: BaseException | None = None

    async def add_lora(self, request: object) -> bool:
        name, lora_id, path = request  # type: ignore[misc]
        await asyncio.sleep(self.load_seconds)
        if self.fail_add is not None:
            raise self.fail_add
        if self.refuse_add:
            return False
        self._load(lora_id, path)
        self.added.append((name, lora_id, path))
        return True

    async def run(self, request: object) -> None:
        """A request naming the adapter runs a step: as vLLM, load it from its files if it is
        not loaded (a version taken back from the parked tier is loaded so)."""
        _name, lora_id, path = request  # type: ignore[misc]
        await asyncio.sleep(0)
        self._load(lora_id, path)

    def _load(self, lora_id: int, path: str) -> None:
        if lora_id in self.loaded:
            self.loaded.move_to_end(lora_id)  # used: the most recent
            return
        assert (Path(path) / "adapter_model.safetensors").is_file()
        if self.capacity is not None and len(self.loaded) >= self.capacity:
            self.loaded.popitem(last=False)
        self.loaded[lora_id] = path
        self.loads.append(lora_id)
        self.peak = max(self.peak, len(self.loaded))

    async def remove_lora(self, lora_id: int) -> bool:
        if self.remove_gate is not None:
            await self.remove_gate.wait()
        if self.fail_remove is not None:
            raise self.fail_remove
        self.removed.append(lora_id)
        return self.loaded.pop(lora_id, None) is not None


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run an async test scenario; it fails after 120 s."""
    asyncio.run(asyncio.wait_for(scenario(), timeout=120))


def metrics() -> Metrics:
    return Metrics(MetricsSettings(), CollectorRegistry())


def make_residency(
    engine: EngineDouble,
    run_dir: Path,
    *,
    capacity: int = 2,
    threads: int = 2,
    queue: int = 64,
    budget: int = 1 << 30,
    registry_metrics: Metrics | None = None,
) -> Residency:
    m = registry_metrics or metrics()
    engine.capacity = engine.capacity or capacity  # max_cpu_loras, as the server sets it
    memory = MergeMemory(
        CalibrationCache(8), m, device=torch.device("cpu"), dtype=torch.float32, budget=budget
    )
    worker = MergeWorker(memory, m, threads=threads, queue=queue)
    builder = VersionBuilder(
        engine,
        lambda name, lora_id, path: (name, lora_id, path),
        worker,
        m,
        run_dir=run_dir,
        export_dtype=torch.float32,
        device="cpu",
        dtype="float32",
    )
    return Residency(engine, builder, m, capacity=capacity, preference_step=0.01)


def select(pool: AdapterPool, *weights: float, pin_for: str | None = None) -> Selection:
    total = sum(weights)
    rho = tuple(w / total for w in weights)
    return Selection(pool, MergeSpec(), rho, pin_for)


def tiered(
    engine: EngineDouble, run_dir: Path, *, capacity: int, keep: int, spare: int = 0, **kw: Any
) -> Residency:
    """A residency that keeps up to `keep` versions on disk, `spare` slots free."""
    base = make_residency(engine, run_dir, capacity=capacity, **kw)
    residency = Residency(
        engine,
        base.builder,
        base._metrics,
        capacity=capacity,
        preference_step=0.01,
        keep=keep,
        spare=spare,
    )
    residency.start()
    return residency


async def settle(residency: Residency) -> None:
    """Let the reaper finish what it was woken for."""
    for _ in range(50):
        await asyncio.sleep(0)
    async with residency._reap_lock:  # a pass in progress ends
        pass
    await asyncio.sleep(0)


def on_disk(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()


def fail_first_merge(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The next merge raises (a numerical failure); the ones after it run for real. Returns
    the calls so far, each as whether it failed."""
    real = versions.merge
    calls: list[bool] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(not calls)
        if calls == [True]:
            raise RuntimeError("numerical failure in the merge")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(versions, "merge", flaky)
    return calls
