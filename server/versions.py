"""Merged adapter versions: merge once per key, hot-swap into the engine, evict when unused.

A version is identified by (pool fingerprint, method, parameters, quantised preference). The
first request for a key merges (off the event loop, on the merge device), writes the adapter to
tmpfs under a name and path never used before, and `add_lora`s it; concurrent requests for the
same key wait for that one merge (single flight). Requests hold a lease while they run; versions
nobody holds are evicted least-recently-used first (`remove_lora` + delete) when more than the
capacity are resident, and at once when their pool is no longer current. Hot tenants' versions
are pinned (never evicted). The capacity never exceeds vLLM's max_cpu_loras, so vLLM's own LRU
never drops a version we hold, and a directory is deleted only after its last request ended
(vLLM reloads an adapter from its path when it needs it again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from loramerge.merge_engine import (
    AdapterPool,
    CalibrationCache,
    MergeReport,
    MergeSpec,
    merge,
    resolve_device,
    resolve_dtype,
    save_adapter,
)

from .metrics import Metrics

logger = logging.getLogger(__name__)


class LoraEngine(Protocol):
    """The part of vLLM's AsyncLLM this module needs."""

    async def add_lora(self, lora_request: object) -> bool: ...

    async def remove_lora(self, lora_id: int) -> bool: ...


LoraRequestFactory = Callable[[str, int, str], object]  # (name, int id, path) → LoRARequest


@dataclass(frozen=True)
class VersionKey:
    """What makes two merged adapters the same."""

    pool_fingerprint: str
    spec: str  # canonical JSON of the method, resolved parameters and stages
    preference: tuple[int, ...]  # ρ in units of the preference step, pool order

    def digest(self) -> str:
        text = f"{self.pool_fingerprint}|{self.spec}|{self.preference}"
        return hashlib.sha256(text.encode()).hexdigest()


def quantize_preference(rho: tuple[float, ...], step: float) -> tuple[int, ...]:
    """Round ρ (on the simplex) to multiples of `step`; at least one unit stays non-zero."""
    units = tuple(round(weight / step) for weight in rho)
    if not any(units):
        largest = max(range(len(rho)), key=lambda i: rho[i])
        units = tuple(int(i == largest) for i in range(len(rho)))
    return units


def version_key(
    pool: AdapterPool, spec: MergeSpec, rho: tuple[float, ...], step: float
) -> VersionKey:
    params = dataclasses.asdict(spec.resolved_params())
    canonical = {
        "method": spec.method,
        "params": params,
        "pico": spec.pico,
        "energy_compensation": spec.energy_compensation,
        "svc": spec.svc,
        "svc_alpha": spec.svc_alpha,
        "rank": spec.rank,
    }
    return VersionKey(
        pool.fingerprint, json.dumps(canonical, sort_keys=True), quantize_preference(rho, step)
    )


@dataclass
class Version:
    """One merged adapter loaded in the engine."""

    adapter_id: str
    key: VersionKey
    lora_id: int
    lora_request: object
    path: Path
    report: MergeReport
    phase_seconds: dict[str, float]
    leases: int = 0
    pinned_by: str | None = None


@dataclass(frozen=True)
class Lease:
    version: Version
    cached: bool  # True: no merge was needed for this request


class MergedVersions:
    """Cache of merged adapter versions resident in the engine."""

    def __init__(
        self,
        engine: LoraEngine,
        make_request: LoraRequestFactory,
        metrics: Metrics,
        *,
        capacity: int,
        export_dir: Path,
        export_dtype: torch.dtype,
        preference_step: float,
        device: str,
        dtype: str,
        max_concurrent_merges: int,
        calibration_cache_size: int,
    ) -> None:
        self._engine = engine
        self._make_request = make_request
        self._metrics = metrics
        self._capacity = capacity
        self._dir = export_dir / f"run-{uuid.uuid4().hex[:12]}"
        self._export_dtype = export_dtype
        self._step = preference_step
        self._device = device
        self._dtype = dtype
        self._executor = ThreadPoolExecutor(max_concurrent_merges, thread_name_prefix="merge")
        self.calibrations = CalibrationCache(calibration_cache_size)
        self._versions: OrderedDict[VersionKey, Version] = OrderedDict()  # LRU order
        self._inflight: dict[VersionKey, asyncio.Task[Version]] = {}
        self._next_id = 0
        self._current_fingerprint: str | None = None  # None: not told yet, keep everything

    @property
    def resident(self) -> int:
        return len(self._versions)

    def versions(self) -> list[Version]:
        return list(self._versions.values())

    @asynccontextmanager
    async def lease(
        self,
        pool: AdapterPool,
        spec: MergeSpec,
        rho: tuple[float, ...],
        *,
        pin_for: str | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold the merged version for (pool, spec, ρ) while the block runs.

        `pin_for`: a hot tenant's id; its version is pinned (and its previous one unpinned).
        """
        key = version_key(pool, spec, rho, self._step)
        cached = key in self._versions
        (self._metrics.merged_hits if cached else self._metrics.merged_misses).inc()
        while True:
            version = self._versions.get(key)
            if version is not None:
                self._versions.move_to_end(key)
                break
            built = await self._join_or_merge(key, pool, spec)
            if self._versions.get(key) is built:  # not evicted while we were waiting
                version = built
                break
        version.leases += 1  # no await between the residency check and this
        try:
            if pin_for is not None:
                self._pin(version, pin_for)
            yield Lease(version, cached)
        finally:
            version.leases -= 1
            await self._evict()

    async def pool_changed(self, pool: AdapterPool | None) -> None:
        """Evict the unused versions of older pools now; the rest go when their leases end.

        Also warms the new pool in the background (stacked factors on the merge device, Pico's
        calibration of the whole pool), so the first request does not pay for it.
        """
        self._current_fingerprint = pool.fingerprint if pool is not None else ""
        await self._evict()
        if pool is not None:
            self._executor.submit(self._warm, pool)

    def _warm(self, pool: AdapterPool) -> None:
        device = resolve_device(self._device)
        dtype = resolve_dtype(self._dtype)
        pool.groups(device, dtype)
        self.calibrations.get(pool, tuple(range(len(pool))), device, dtype)

    async def close(self) -> None:
        """Remove every version (engine and disk) and stop the merge workers."""
        for version in list(self._versions.values()):
            await self._remove(version)
        self._executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _join_or_merge(self, key: VersionKey, pool: AdapterPool, spec: MergeSpec) -> Version:
        """Wait for the merge of `key`, starting it if nobody has. The merge runs as its own
        task: a requester that is cancelled does not cancel it for the others."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(
                self._build(key, pool, spec), name=f"merge-{key.digest()[:8]}"
            )
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(task)

    def _settle(self, key: VersionKey, task: asyncio.Task[Version]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("merge failed: %s", task.exception())  # also marks it retrieved

    async def _build(self, key: VersionKey, pool: AdapterPool, spec: MergeSpec) -> Version:
        self._next_id += 1
        lora_id = self._next_id
        adapter_id = f"m{lora_id}-{key.digest()[:12]}"
        path = self._dir / adapter_id
        preference = dict(zip(pool.names, _simplex(key.preference), strict=True))

        def merge_and_export() -> tuple[MergeReport, float]:
            result = merge(
                pool,
                preference,
                spec,
                device=self._device,
                dtype=self._dtype,
                cache=self.calibrations,
            )
            start = time.perf_counter()
            save_adapter(result, path, dtype=self._export_dtype)
            return result.report, time.perf_counter() - start

        loop = asyncio.get_running_loop()
        report, export_seconds = await loop.run_in_executor(self._executor, merge_and_export)
        request = self._make_request(adapter_id, lora_id, str(path))
        start = time.perf_counter()
        try:
            await self._engine.add_lora(request)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        load_seconds = time.perf_counter() - start

        phases = dict(report.timings)
        phases.update(export=export_seconds, load=load_seconds)
        phases["total"] = report.timings["total"] + export_seconds + load_seconds
        self._record(spec.method, phases, report)
        version = Version(adapter_id, key, lora_id, request, path, report, phases)
        self._versions[key] = version
        self._metrics.resident_adapters.set(len(self._versions))
        logger.info(
            "merged version ready",
            extra={"adapter_id": adapter_id, "method": spec.method, "rank": report.rank,
                   "phase_seconds": {k: round(v, 4) for k, v in phases.items()}},
        )  # fmt: skip
        return version

    def _record(self, method: str, phases: Mapping[str, float], report: MergeReport) -> None:
        for phase, seconds in phases.items():
            self._metrics.merge_duration.labels(method=method, phase=phase).observe(seconds)
        self._metrics.adapter_load_duration.observe(phases["load"])
        if report.calibration_cache_hit is True:
            self._metrics.calibration_hits.inc()
        elif report.calibration_cache_hit is False:
            self._metrics.calibration_misses.inc()

    def _pin(self, version: Version, tenant_id: str) -> None:
        for other in self._versions.values():
            if other.pinned_by == tenant_id and other is not version:
                other.pinned_by = None
        version.pinned_by = tenant_id  # ours only: vLLM's pin_lora would also take a GPU slot

    async def _evict(self) -> None:
        stale = [
            v
            for v in self._versions.values()
            if v.leases == 0
            and self._current_fingerprint is not None
            and v.key.pool_fingerprint != self._current_fingerprint
        ]
        for version in stale:
            await self._remove(version)
        for version in list(self._versions.values()):  # least recently used first
            if len(self._versions) <= self._capacity:
                break
            if version.leases == 0 and version.pinned_by is None:
                await self._remove(version)

    async def _remove(self, version: Version) -> None:
        if self._versions.pop(version.key, None) is None:
            return
        await self._engine.remove_lora(version.lora_id)
        await asyncio.to_thread(shutil.rmtree, version.path, True)
        self._metrics.merged_evictions.inc()
        self._metrics.resident_adapters.set(len(self._versions))
        logger.info("evicted merged version", extra={"adapter_id": version.adapter_id})


def _simplex(units: tuple[int, ...]) -> tuple[float, ...]:
    total = sum(units)
    return tuple(u / total for u in units)
