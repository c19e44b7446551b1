"""The merge device's memory: a byte budget for what the merge side keeps between merges.

What is kept: Pico calibrations (`CalibrationCache`) and the pools' stacked factors and input
statistics (`AdapterPool.groups` and `.statistics`, per device and dtype; diagnostics add a
float64 copy). After every job
the stacks of any other (device, dtype) than the merges' are dropped, and calibrations are
evicted least recently used first until the total fits the budget. The budget defaults to a
share of what is free once the engine has started (vLLM takes its share first).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import torch

from loramerge.merge_engine import AdapterPool, CalibrationCache

from .errors import OverloadedError
from .metrics import Metrics

logger = logging.getLogger(__name__)

GPU_FREE_SHARE = 0.8  # of the device memory free after vLLM allocated its own
CPU_AVAILABLE_SHARE = 0.25  # of the system memory available at start
CPU_BUDGET_CAP = 8 << 30


class MergeMemoryError(OverloadedError):
    """A merge ran out of memory on the merge device (RESOURCE_EXHAUSTED)."""


def default_budget(device: torch.device) -> int:
    """Bytes the merge side may keep on `device`: on CUDA a share of the free memory (call
    once vLLM has started), on the CPU a share of the available memory (at most 8 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_SHARE)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(int(available * CPU_AVAILABLE_SHARE), CPU_BUDGET_CAP)


class MergeMemory:
    """Accounts the bytes the merge side keeps and evicts to stay within `budget` bytes."""

    def __init__(
        self,
        calibrations: CalibrationCache,
        metrics: Metrics,
        *,
        device: torch.device,
        dtype: torch.dtype,
        budget: int | None = None,
    ) -> None:
        self.calibrations = calibrations
        self._metrics = metrics
        self._keep = (device, dtype)
        self._budget = budget
        self._pools: weakref.WeakSet[AdapterPool] = weakref.WeakSet()
        self._lock = threading.Lock()

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = default_budget(self._keep[0])
        return self._budget

    def describe(self) -> str:
        return f"{_gib(self.budget)} on {self._keep[0]}, {_gib(self.held())} held by caches"

    def track(self, pool: AdapterPool) -> None:
        """Account the stacks `pool` caches (until the pool object is gone)."""
        with self._lock:
            self._pools.add(pool)

    def held(self) -> int:
        """Bytes held by calibrations and the tracked pools' stacks."""
        with self._lock:
            pools = list(self._pools)
        return self.calibrations.nbytes + sum(pool.cached_bytes() for pool in pools)

    def enforce(self) -> int:
        """Drop other-precision stacks, then calibrations (LRU) until within the budget;
        returns the bytes held afterwards (also set as the gauge)."""
        with self._lock:
            pools = list(self._pools)
        for pool in pools:
            pool.drop_groups(keep=self._keep)
        stacks = sum(pool.cached_bytes() for pool in pools)
        self.calibrations.shrink_to(max(self.budget - stacks, 0))
        held = self.calibrations.nbytes + stacks
        self._metrics.merge_memory.set(held)
        return held

    def release_all(self) -> None:
        """After an out-of-memory error: forget every cache."""
        with self._lock:
            pools = list(self._pools)
        for pool in pools:
            pool.drop_groups()
        self.calibrations.shrink_to(0)
        if self._keep[0].type == "cuda":
            torch.cuda.empty_cache()
        self._metrics.merge_memory.set(0)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"
