"""Building the serving core for unit tests: real merges, real files, real merge workers, and a
test double of vLLM's engine that checks what a real one would rely on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from loramerge.merge_engine import AdapterPool, CalibrationCache, MergeSpec
from loramerge.server.config import MetricsSettings
from loramerge.server.merge_memory import MergeMemory
from loramerge.server.merge_worker import MergeWorker
from loramerge.server.metrics import Metrics
from loramerge.server.residency import Residency
from loramerge.server.selection import Selection
from loramerge.server.versions import VersionBuilder


class EngineDouble:
    """Records add_lora/remove_lora; `loaded` is what a real engine would hold. A version is
    loaded only from a complete directory, and removing an unknown id is an error here."""

    def __init__(self, load_seconds: float = 0.0) -> None:
        self.loaded: dict[int, str] = {}  # lora_id → path
        self.added: list[tuple[str, int, str]] = []
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
        assert (Path(path) / "adapter_model.safetensors").is_file()
        self.added.append((name, lora_id, path))
        self.loaded[lora_id] = path
        self.peak = max(self.peak, len(self.loaded))
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        if self.remove_gate is not None:
            await self.remove_gate.wait()
        if self.fail_remove is not None:
            raise self.fail_remove
        self.removed.append(lora_id)
        return self.loaded.pop(lora_id, None) is not None


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
