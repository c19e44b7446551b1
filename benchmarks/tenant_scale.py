"""Tenant-scale benchmark: how serving cost grows from 8 to 512 tenants, against plain vLLM.

One process, one real vLLM engine (`max_loras` 4, `max_cpu_loras` 16 unless the config says
otherwise), the embedded model and the default adapter pool. T tenants, each with its own stored
preference (seeded Dirichlet(1) over the pool); a fixed trace of requests with Zipf popularity
over tenants (s = 1.1), short prompts, short answers (`ignore_eos`, so every system generates the
same tokens). The same trace is served, `--concurrency` requests at a time, by:

1. loramerge, on demand: the server's path — the tenant's stored preference is looked up
   (Selector, a real SQLite store), the merged version is leased (merged, exported to /dev/shm
   and loaded on a miss; evicted when unused beyond the capacity with no engine call, vLLM's own
   LRU unloading it when it needs the room, its files kept for a reload within
   `merge.cache_size`), then `engine.generate` with it;
2. loramerge, merged ahead: the same, after the trace's tenants' versions were merged ahead as
   the server does when a tenant is stored (`merge.merge_ahead`; not timed, as plain vLLM's
   adapters are not): a miss only loads the version again;
3. plain vLLM: one precomputed adapter per tenant on disk (the same merged weights, written
   beforehand, not timed), served through vLLM's own LRU (the same `max_loras`/`max_cpu_loras`);
4. the base model (the ceiling).

Every run starts cold (no adapter loaded); the order of the systems alternates between rounds,
and the ratios are medians of per-round ratios. In-process, a unary request and a streamed one are
the same engine stream (the server's unary Generate collects the deltas it streams), so TTFT, as
the server's `loramerge_time_to_first_token_seconds` defines it, is measured on every request.
Then, at the largest T, loramerge on demand alone with each `--steps` preference step. Results
go to a JSON file (one entry per T, so points can be run one at a time with `--tenants 64`),
from which the markdown tables and the plot are made.

    .venv/bin/python benchmarks/tenant_scale.py [--tenants 8 64 512] [--requests 128]
        [--tokens 8] [--concurrency 8] [--rounds 3] [--steps 0.01 0.05 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from tenant_scale_report import (
    OURS,
    SYSTEMS,
    Point,
    RunResult,
    SweepRow,
    load_results,
    report,
    save_results,
)

from loramerge.merge_engine import AdapterPool, CalibrationCache, merge, save_adapter
from loramerge.server.app import build_residency, resolve_assets
from loramerge.server.config import Settings, load_settings
from loramerge.server.domain import MergeChoice
from loramerge.server.engine import adapter_dtype, lora_request, open_engine, quiet_vllm
from loramerge.server.metrics import Metrics
from loramerge.server.registry import AdapterRegistry
from loramerge.server.residency import Residency
from loramerge.server.selection import Selection, Selector
from loramerge.server.store import Store, open_store
from loramerge.server.version_key import version_key

ZIPF_S = 1.1
PROMPTS = (
    "Add 17 and 25.",
    "Sort these words: pear, apple, fig.",
    "Reverse the word 'planet'.",
    "What is 9 times 7?",
    "Count the letters in 'banana'.",
    "Write 12 March 1987 as DD/MM/YY.",
)
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "tenant_scale.json"
PLOT = RESULTS.with_suffix(".png")
PLAIN_LORA_IDS = 1_000_000  # far above the ids the version builder hands out


@dataclass(frozen=True)
class Request:
    tenant: int
    prompt: int


def tenant_id(index: int) -> str:
    return f"tenant-{index:04d}"


def dirichlet_preferences(names: Sequence[str], count: int, seed: int) -> list[dict[str, float]]:
    """`count` preferences drawn from Dirichlet(1, …, 1) over `names` (seeded)."""
    rng = random.Random(seed)
    prefs = []
    for _ in range(count):
        draws = [rng.gammavariate(1.0, 1.0) for _ in names]
        total = sum(draws)
        prefs.append({name: draw / total for name, draw in zip(names, draws, strict=True)})
    return prefs


def zipf_trace(tenants: int, requests: int, seed: int) -> list[Request]:
    """`requests` requests; tenant k (0-based) is drawn with probability ∝ (k + 1)^-s."""
    rng = random.Random(seed * 1_000_003 + tenants)
    weights = [(k + 1) ** -ZIPF_S for k in range(tenants)]
    chosen = rng.choices(range(tenants), weights, k=requests)
    return [Request(t, rng.randrange(len(PROMPTS))) for t in chosen]


class Sampler:
    """Polls the export directory's size and the resident versions while a run goes on, and
    prints progress every `every` seconds."""

    def __init__(self, label: str, total: int, every: float = 15.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.done = 0
        self.tokens = 0
        self.shm_bytes = 0
        self.resident = 0
        self.probe: Callable[[], tuple[int, int]] = lambda: (0, 0)  # → (shm bytes, resident)

    async def run(self, start: float) -> None:
        last = start
        while True:
            await asyncio.sleep(0.25)
            shm, resident = self.probe()
            self.shm_bytes, self.resident = max(self.shm_bytes, shm), max(self.resident, resident)
            now = time.perf_counter()
            if now - last >= self.every:
                last = now
                rate = self.tokens / (now - start)
                print(
                    f"  {self.label}: {self.done}/{self.total} requests, {rate:.1f} tok/s, "
                    f"{now - start:.0f} s",
                    flush=True,
                )


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # deleted by an eviction meanwhile
                total += os.stat(os.path.join(root, name)).st_size
    return total


class TimedLoraCalls:
    """The engine as the residency sees it, counting and timing its add/remove_lora calls."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.calls = {"add_lora": 0, "remove_lora": 0}
        self.seconds = {"add_lora": 0.0, "remove_lora": 0.0}
        self.loads: list[float] = []  # every add_lora's seconds

    async def add_lora(self, lora_request: object) -> bool:
        return bool(await self._timed("add_lora", self._engine.add_lora(lora_request)))

    async def remove_lora(self, lora_id: int) -> bool:
        return bool(await self._timed("remove_lora", self._engine.remove_lora(lora_id)))

    async def _timed(self, name: str, call: Any) -> Any:
        start = time.perf_counter()
        try:
            return await call
        finally:
            seconds = time.perf_counter() - start
            self.calls[name] += 1
            self.seconds[name] += seconds
            if name == "add_lora":
                self.loads.append(seconds)


@dataclass
class Served:
    """loramerge's residency for one preference step, and what it reports."""

    residency: Residency
    pool: AdapterPool
    metrics: CollectorRegistry
    engine: TimedLoraCalls
    run_dir: Path

    def probe(self) -> tuple[int, int]:
        resident = self.metrics.get_sample_value("loramerge_resident_adapters") or 0
        return dir_bytes(self.run_dir), int(resident)

    def counters(self) -> dict[str, Any]:
        counters = loramerge_counters(self.metrics)
        counters["evict_seconds"] = self.engine.seconds["remove_lora"]
        return counters

    async def evict_all(self, engine: Any, timeout: float = 120.0) -> None:
        """Retire every merged version as a pool change does (the reaper removes the resident
        ones in the background), then unload what vLLM's own LRU still holds of the parked
        ones, as after a plain run: the next run starts cold."""
        await self.residency.pool_changed(None)
        deadline = time.perf_counter() + timeout
        while self.residency.resident:
            if time.perf_counter() > deadline:
                raise TimeoutError("merged versions still resident after the run")
            await asyncio.sleep(0.1)
        await unload_all(engine)
        await self.residency.pool_changed(self.pool)


async def unload_all(engine: Any) -> None:
    """Remove every adapter vLLM holds."""
    for lora_id in await engine.list_loras():
        await engine.remove_lora(lora_id)


# → (the LoRARequest or None; loramerge: whether the version was not loaded yet, else None)
LoraScope = Callable[[Request], AbstractAsyncContextManager[tuple[Any, bool | None]]]


class Bench:
    """The engine, the tenants and the three ways of serving them."""

    def __init__(
        self,
        engine: Any,
        settings: Settings,
        adapters: dict[str, Path],
        work: Path,
        plain_dir: Path,
    ) -> None:
        self.engine, self.settings, self.work, self.plain_dir = engine, settings, work, plain_dir
        self.store: Store = open_store(str(work / "tenants.db"))
        self.registry = AdapterRegistry(self.store, [])
        self.registry.load_initial(adapters)
        assert self.registry.pool is not None
        self.pool: AdapterPool = self.registry.pool
        self.selector = Selector(settings, self.store, self.registry)
        tokenizer = engine.get_tokenizer()
        self.prompts = [{"prompt_token_ids": tokenizer.encode(p)} for p in PROMPTS]
        self._served: dict[float, Served] = {}  # preference step → loramerge's versions
        self.keep: int | None = None  # overrides of the residency's settings
        self.spare: int | None = None

    def add_tenants(self, count: int, seed: int) -> None:
        """Store tenants 0…count-1 (tenant k has the same preference at every T)."""
        for index, preference in enumerate(dirichlet_preferences(self.pool.names, count, seed)):
            self.store.set_tenant(tenant_id(index), preference, MergeChoice())

    async def select(self, request: Request) -> Selection:
        selection = await self.selector.select(tenant_id(request.tenant), {}, MergeChoice())
        assert selection is not None
        return selection

    # --- the three systems -------------------------------------------------------------------

    async def loramerge(
        self, trace: Sequence[Request], args: Any, step: float, label: str, ahead: bool = False
    ) -> RunResult:
        """One run on the server's long-lived residency for `step`: its calibration cache stays
        warm between runs, as in a server; no merged version is resident at the start. `ahead`:
        the tenants' versions are merged ahead first (as SetTenant does; not timed, as plain
        vLLM's adapters are written beforehand), so the run only loads them."""
        served = await self.served(step)
        if ahead:
            await self.merge_ahead(served.residency, trace)
        before = served.counters()
        loads = len(served.engine.loads)

        @asynccontextmanager
        async def scope(request: Request) -> AsyncIterator[Any]:
            # what InferenceServicer does: select, lease, generate with the lease's adapter
            selection = await self.select(request)
            key = version_key(selection.pool, selection.spec, selection.rho, step)
            loaded = any(v.key == key for v in served.residency.versions())
            async with served.residency.lease(selection) as lease:
                yield lease.version.lora_request, not loaded  # waited: a build or a reload

        sampler = Sampler(label, len(trace))
        sampler.probe = served.probe
        try:
            result = await self.drive(trace, args, scope, sampler)
            after = served.counters()
        finally:
            await served.evict_all(self.engine)
        return dataclasses.replace(
            result,
            add_lora=served.engine.loads[loads:],
            **{k: after[k] - before[k] for k in after},
        )

    async def merge_ahead(self, residency: Residency, trace: Sequence[Request]) -> None:
        tenants = sorted({r.tenant for r in trace})
        start = time.perf_counter()
        for tenant in tenants:
            residency.merge_ahead(await self.select(Request(tenant, 0)))
        await residency.merged_ahead()
        parked = len(residency.parked())
        print(
            f"  merged ahead: {parked} versions for {len(tenants)} tenants parked in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )

    async def served(self, step: float) -> Served:
        if step not in self._served:
            merge_settings = self.settings.merge.model_copy(update={"preference_step": step})
            settings = self.settings.model_copy(update={"merge": merge_settings})
            metrics = CollectorRegistry()
            engine = TimedLoraCalls(self.engine)
            run_dir = self.work / f"run-{step:g}"
            run_dir.mkdir()
            residency = build_residency(  # the server's serving core
                settings, engine, Metrics(settings.metrics, metrics), run_dir
            )
            if self.keep is not None:  # ablations: what each part of the residency buys
                residency.keep = max(self.keep, residency.capacity)
            if self.spare is not None:
                residency.spare = self.spare
            residency.start()
            await residency.engine_started(self.pool)
            self._served[step] = Served(residency, self.pool, metrics, engine, run_dir)
        return self._served[step]

    async def close(self) -> None:
        for served in self._served.values():
            await served.residency.close()

    async def plain(self, trace: Sequence[Request], args: Any, label: str) -> RunResult:
        loras = {t: self.plain_lora(t) for t in {r.tenant for r in trace}}

        @asynccontextmanager
        async def scope(request: Request) -> AsyncIterator[Any]:
            yield loras[request.tenant], None

        sampler = Sampler(label, len(trace))
        sampler.probe = lambda: (0, 0)
        try:
            result = await self.drive(trace, args, scope, sampler)
        finally:
            await unload_all(self.engine)  # the next run starts cold too
        return result

    async def base(self, trace: Sequence[Request], args: Any, label: str) -> RunResult:
        def scope(request: Request) -> AbstractAsyncContextManager[Any]:
            return nullcontext((None, None))

        return await self.drive(trace, args, scope, Sampler(label, len(trace)))

    # --- plain vLLM's adapters, written beforehand --------------------------------------------

    async def write_plain_adapters(self, trace: Sequence[Request], step: float) -> None:
        """The merged adapter of every tenant in `trace`, as loramerge would merge it (the same
        quantised preference, spec and export precision), in a directory on disk."""
        cache = CalibrationCache()
        todo = sorted({r.tenant for r in trace if not self.plain_path(r.tenant).exists()})
        for done, tenant in enumerate(todo, 1):
            selection = await self.select(Request(tenant, 0))
            key = version_key(selection.pool, selection.spec, selection.rho, step)
            preference = dict(zip(self.pool.names, key.simplex(), strict=True))
            merge_settings = self.settings.merge
            result = merge(
                selection.pool,
                preference,
                selection.spec,
                device=merge_settings.device,
                dtype=merge_settings.dtype,
                cache=cache,
            )
            save_adapter(result, self.plain_path(tenant), dtype=adapter_dtype(self.settings.engine))
            if done % 20 == 0 or done == len(todo):
                print(f"  plain adapters written: {done}/{len(todo)}", flush=True)

    def plain_path(self, tenant: int) -> Path:
        return self.plain_dir / tenant_id(tenant)

    def plain_lora(self, tenant: int) -> Any:
        return lora_request(
            f"plain-{tenant_id(tenant)}", PLAIN_LORA_IDS + tenant, str(self.plain_path(tenant))
        )

    # --- the client side ------------------------------------------------------------------------

    async def drive(
        self, trace: Sequence[Request], args: Any, scope: LoraScope, sampler: Sampler
    ) -> RunResult:
        """Serve `trace` with `args.concurrency` requests in flight at a time (closed loop)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )  # fmt: skip
        queue = iter(trace)
        ttfts: list[float] = []
        latencies: list[float] = []
        waits: list[float] = []
        starts: list[float] = []
        missed: list[bool] = []

        async def one(request: Request) -> None:
            arrived = time.perf_counter()
            first = None
            produced = 0
            async with scope(request) as (lora, built):
                submitted = time.perf_counter()
                waits.append(submitted - arrived)  # selection + lease (merge, load)
                stream = self.engine.generate(
                    self.prompts[request.prompt], params, uuid.uuid4().hex, lora_request=lora
                )
                async for output in stream:
                    delta = len(output.outputs[0].token_ids)
                    if first is None and delta:
                        first = time.perf_counter() - arrived
                    produced += delta
                    sampler.tokens += delta
            assert first is not None and produced == args.tokens, (first, produced)
            ttfts.append(first)
            starts.append(first - (submitted - arrived))
            if built is not None:
                missed.append(built)
            latencies.append(time.perf_counter() - arrived)
            sampler.done += 1

        async def worker() -> None:
            for request in queue:
                await one(request)

        start = time.perf_counter()
        progress = asyncio.create_task(sampler.run(start))
        try:
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        finally:
            progress.cancel()
        seconds = time.perf_counter() - start
        return RunResult(
            seconds=seconds,
            tokens=sampler.tokens,
            ttfts=ttfts,
            latencies=latencies,
            waits=waits,
            starts=starts,
            missed=missed,
            shm_bytes_max=sampler.shm_bytes,
            resident_max=sampler.resident,
        )


def loramerge_counters(registry: CollectorRegistry) -> dict[str, Any]:
    """What the server's own metrics say about one run (merge times summed over methods)."""

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    def merge_sum(suffix: str, phase: str) -> float:
        name = f"loramerge_merge_duration_seconds_{suffix}"
        return sum(
            sample.value
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name == name and sample.labels.get("phase") == phase
        )

    phases = {phase: merge_sum("sum", phase) for phase in ("total", "export", "load")}
    return {
        "merges": merge_sum("count", "total"),
        "merged_hits": value("loramerge_merged_adapter_cache_hits_total"),
        "merged_misses": value("loramerge_merged_adapter_cache_misses_total"),
        "calibration_hits": value("loramerge_calibration_cache_hits_total"),
        "calibration_misses": value("loramerge_calibration_cache_misses_total"),
        "evictions": value("loramerge_merged_adapter_cache_evictions_total"),
        "merge_seconds": phases["total"] - phases["export"] - phases["load"],
        "export_seconds": phases["export"],
        "load_seconds": phases["load"],
    }


async def run_point(bench: Bench, tenants: int, args: Any) -> Point:
    trace = zipf_trace(tenants, args.requests, args.seed)
    await bench.write_plain_adapters(trace, bench.settings.merge.preference_step)
    step = bench.settings.merge.preference_step
    runs: dict[str, list[RunResult]] = {system: [] for system in SYSTEMS}
    for round_index in range(args.rounds):
        order = list(SYSTEMS)
        if round_index % 2:
            order.reverse()
        for system in order:
            label = f"T={tenants} {system} round {round_index + 1}/{args.rounds}"
            print(f"{label} ...", flush=True)
            if system in OURS:
                ahead = system == "ahead"
                result = await bench.loramerge(trace, args, step, label, ahead)
            elif system == "plain":
                result = await bench.plain(trace, args, label)
            else:
                result = await bench.base(trace, args, label)
            print(f"  {label}: {result.summary()}", flush=True)
            runs[system].append(result)
    return Point(tenants, len(trace), len({r.tenant for r in trace}), runs)


async def run_sweep(bench: Bench, tenants: int, args: Any) -> list[SweepRow]:
    trace = zipf_trace(tenants, args.requests, args.seed)
    rows = []
    for step in args.steps:
        keys = set()
        for request in trace:
            selection = await bench.select(request)
            keys.add(version_key(selection.pool, selection.spec, selection.rho, step))
        label = f"T={tenants} loramerge preference_step={step}"
        print(f"{label} ...", flush=True)
        result = await bench.loramerge(trace, args, step, label)
        print(f"  {label}: {result.summary()}", flush=True)
        rows.append(SweepRow(step, len({r.tenant for r in trace}), len(keys), result))
    return rows


async def warm_up(bench: Bench, args: Any) -> None:
    """A few requests of each kind, so no run pays for the engine's first steps."""
    trace = zipf_trace(2, 4, args.seed + 1)
    await bench.write_plain_adapters(trace, bench.settings.merge.preference_step)
    await bench.base(trace, args, "warm-up base")
    await bench.plain(trace, args, "warm-up plain")
    await bench.loramerge(trace, args, bench.settings.merge.preference_step, "warm-up loramerge")
    await bench.loramerge(trace, args, bench.settings.merge.preference_step, "warm-up ahead", True)


async def benchmark(args: argparse.Namespace) -> None:
    settings = load_settings(args.config)
    model, adapters = resolve_assets(settings)  # the server's model and configured pool
    work = Path(tempfile.mkdtemp(prefix="loramerge-bench-scale-", dir="/dev/shm"))
    plain_dir = Path(tempfile.mkdtemp(prefix="loramerge-bench-scale-plain-"))
    results = load_results(args.results)
    try:
        async with open_engine(settings.engine, model) as engine:
            bench = Bench(engine, settings, adapters, work, plain_dir)
            bench.keep, bench.spare = args.keep, args.spare
            bench.add_tenants(max(args.tenants), args.seed)
            try:
                await warm_up(bench, args)
                for tenants in args.tenants:
                    point = await run_point(bench, tenants, args)
                    results.points[tenants] = point.to_json(args)
                    save_results(args.results, results)
                if args.steps:
                    rows = await run_sweep(bench, max(args.tenants), args)
                    results.sweep = [row.to_json(args) for row in rows]
                    save_results(args.results, results)
            finally:
                await bench.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(plain_dir, ignore_errors=True)
    report(results, args.plot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", type=Path, help="server YAML config (engine, merge, adapters: as served)"
    )
    parser.add_argument("--tenants", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--requests", type=int, default=128, help="requests per run")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per answer")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=3, help="runs per system, order alternating")
    parser.add_argument(
        "--steps", type=float, nargs="*", default=[0.01, 0.05, 0.1],
        help="preference steps swept at the largest T (none: skip the sweep)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--keep", type=int,
        help="ablation: versions kept on disk (default merge.cache_size; 0: none parked)",
    )  # fmt: skip
    parser.add_argument(
        "--spare", type=int, help="ablation: engine slots kept free (default 1; 0: none)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON, one entry per T")
    parser.add_argument("--plot", type=Path, default=PLOT)
    quiet_vllm()
    asyncio.run(benchmark(parser.parse_args()))


if __name__ == "__main__":
    main()
