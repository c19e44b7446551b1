"""Building one merged version: merge on a merge worker, export to tmpfs, load into the engine
(`add_lora` for the first version of each pool and spec; vLLM loads later ones in a step).

Each version gets a name, an integer id and a directory never used before (vLLM caches by name
and reloads from the path), written atomically. Whatever fails, nothing is left behind: a
failed export or load deletes the directory. A version removed from the engine may be loaded
again later from the same directory, under the same name and id (its files never change).
Which versions stay resident, and for how long, is `residency.py`'s business.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from loramerge.merge_engine import (
    AdapterPool,
    ExportError,
    MergeReport,
    MergeSpec,
    merge,
    resolve_device,
    resolve_dtype,
    save_adapter,
)

from .errors import EngineUnavailableError, OverloadedError
from .merge_worker import MergeWorker
from .metrics import Metrics
from .version_key import VersionKey

logger = logging.getLogger(__name__)

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class LoraEngine(Protocol):
    """The part of vLLM's AsyncLLM this module needs."""

    async def add_lora(self, lora_request: object) -> bool: ...

    async def remove_lora(self, lora_id: int) -> bool: ...


LoraRequestFactory = Callable[[str, int, str], object]  # (name, int id, path) → LoRARequest


class ExportSpaceError(OverloadedError):
    """The export directory (tmpfs) is full (RESOURCE_EXHAUSTED)."""


@dataclass
class Version:
    """One merged adapter, loaded in the engine or loadable from its directory."""

    adapter_id: str
    key: VersionKey
    lora_id: int
    lora_request: object
    path: Path
    report: MergeReport
    phase_seconds: dict[str, float]
    nbytes: int  # on disk, in the export directory
    leases: int = 0
    pinned_by: str | None = None


@dataclass(frozen=True)
class Exported:
    """A merged version written to disk, not loaded yet."""

    adapter_id: str
    key: VersionKey
    lora_id: int
    path: Path
    report: MergeReport
    phase_seconds: dict[str, float]
    nbytes: int


class VersionBuilder:
    def __init__(
        self,
        engine: LoraEngine,
        make_request: LoraRequestFactory,
        worker: MergeWorker,
        metrics: Metrics,
        *,
        run_dir: Path,
        export_dtype: torch.dtype,
        device: str,
        dtype: str,
    ) -> None:
        self.worker = worker
        self._engine = engine
        self._make_request = make_request
        self._metrics = metrics
        self._dir = run_dir
        self._export_dtype = export_dtype
        self._device = device
        self._dtype = dtype
        self._next_id = 0
        self._accepted: set[tuple[str, str]] = set()  # (pool, spec) vLLM's add_lora accepted

    async def export(self, key: VersionKey, pool: AdapterPool, spec: MergeSpec) -> Exported:
        """Merge (pool, spec, the key's preference) on a merge worker and write it to disk."""
        self._next_id += 1
        lora_id = self._next_id
        adapter_id = f"m{lora_id}-{key.digest()[:12]}"
        path = self._dir / adapter_id
        preference = dict(zip(pool.names, key.simplex(), strict=True))
        self.worker.memory.track(pool)

        def merge_and_export() -> tuple[MergeReport, float]:
            result = merge(
                pool,
                preference,
                spec,
                device=self._device,
                dtype=self._dtype,
                cache=self.worker.memory.calibrations,
            )
            start = time.perf_counter()
            try:
                save_adapter(result, path, dtype=self._export_dtype)
            except ExportError as err:
                if err.errno in NO_SPACE:
                    raise ExportSpaceError(
                        f"no space left in merge.export_dir ({self._dir.parent}) to write a "
                        "merged version; give it more room or lower merge.cache_size"
                    ) from None
                raise
            return result.report, time.perf_counter() - start

        report, export_seconds = await self.worker.run(merge_and_export, "a merge")
        phases = dict(report.timings)
        phases.update(export=export_seconds)
        size = sum(f.stat().st_size for f in path.iterdir())
        return Exported(adapter_id, key, lora_id, path, report, phases, size)

    async def load(self, exported: Exported, method: str) -> Version:
        """`add_lora` the first exported version of its pool and spec, so that vLLM checks
        its modules and rank and an error reaches only its requests; on any failure its
        directory is deleted. A later version of the same pool and spec differs only in its
        weights' values (the spec caps the rank at `max_lora_rank`): it is not `add_lora`ed,
        and vLLM loads it in the step that first runs a request naming it, as it loads a
        parked version or a plain adapter, without the request waiting for a step boundary."""
        if self.accepted(exported.key):
            return self.unloaded(exported, method)
        version = self._version(exported)
        seconds = await self._add(version.lora_request, version.adapter_id, version.path)
        version.phase_seconds["load"] = seconds
        version.phase_seconds["total"] += seconds
        self._accepted.add(_pool_and_spec(exported.key))
        self._record(method, version)
        return version

    def accepted(self, key: VersionKey) -> bool:
        """Whether vLLM's `add_lora` accepted a version of `key`'s pool and spec."""
        return _pool_and_spec(key) in self._accepted

    def unloaded(self, exported: Exported, method: str) -> Version:
        """The exported version, not loaded: a merge ahead of its first request, kept on disk
        until a lease takes it, or a later version of an `accepted` pool and spec (vLLM loads
        it in the request's step)."""
        version = self._version(exported)
        self._record(method, version)
        return version

    def _version(self, exported: Exported) -> Version:
        request = self._make_request(exported.adapter_id, exported.lora_id, str(exported.path))
        phases = dict(exported.phase_seconds)
        phases["total"] = phases["total"] + phases["export"]
        return Version(
            exported.adapter_id,
            exported.key,
            exported.lora_id,
            request,
            exported.path,
            exported.report,
            phases,
            exported.nbytes,
        )

    async def _add(self, request: object, adapter_id: str, path: Path) -> float:
        """`add_lora`; returns its seconds. On any failure the directory is deleted."""
        start = time.perf_counter()
        try:
            loaded = await self._engine.add_lora(request)
        except EngineUnavailableError:
            await self.discard(path)
            raise
        except BaseException as err:
            await self.discard(path)
            if isinstance(err, Exception):
                raise EngineUnavailableError(
                    f"the engine could not load merged version {adapter_id}: {err}"
                ) from None
            raise
        if not loaded:
            await self.discard(path)
            raise EngineUnavailableError(f"the engine refused to load merged version {adapter_id}")
        seconds = time.perf_counter() - start
        self._metrics.adapter_load_duration.observe(seconds)
        return seconds

    async def discard(self, path: Path) -> None:
        await asyncio.to_thread(shutil.rmtree, path, True)

    async def warm(self, pool: AdapterPool) -> None:
        """Stack the pool on the merge device and calibrate all of it (Pico), so the first
        request does not pay for it. Errors are logged: a cold cache is not a failure."""
        self.worker.memory.track(pool)

        def warm() -> None:
            device = resolve_device(self._device)
            dtype = resolve_dtype(self._dtype)
            pool.groups(device, dtype)
            self.worker.memory.calibrations.get(pool, tuple(range(len(pool))), device, dtype)

        try:
            await self.worker.run(warm, "the pool warm-up")
        except Exception as err:
            logger.warning("pool warm-up skipped: %s", err)

    def _record(self, method: str, version: Version) -> None:
        phases, report = version.phase_seconds, version.report
        for phase, seconds in phases.items():
            self._metrics.merge_duration.labels(method=method, phase=phase).observe(seconds)
        if report.calibration_cache_hit is True:
            self._metrics.calibration_hits.inc()
        elif report.calibration_cache_hit is False:
            self._metrics.calibration_misses.inc()
        logger.info(
            "merged version ready",
            extra={"adapter_id": version.adapter_id, "method": method, "rank": report.rank,
                   "loaded": "load" in phases,
                   "phase_seconds": {k: round(v, 4) for k, v in phases.items()}},
        )  # fmt: skip


def _pool_and_spec(key: VersionKey) -> tuple[str, str]:
    return key.pool_fingerprint, key.spec
