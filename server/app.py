"""The server process: wiring, start-up order, health, graceful shutdown.

Start-up: metrics endpoint → store → default model and adapters (prepared once, cached) →
adapter pool → run directory (the directories of dead runs swept) → gRPC server (Tenants and
Adapters SERVING, Inference and Merges NOT_SERVING) → vLLM engine → everything SERVING → pool
warm-up on the merge device (after vLLM has taken its memory).

SIGTERM/SIGINT: NOT_SERVING, stop accepting, drain in-flight requests for `grace_seconds`, stop
the engine, delete this run's directory, exit 0 — also when the signal went to the whole process
group and the engine core died with it (nothing then waits on the dead engine). The engine dying
on its own: NOT_SERVING, requests UNAVAILABLE, the run directory deleted and a non-zero exit
within seconds, so the supervisor (Kubernetes) restarts the process.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loramerge.merge_engine import CalibrationCache, resolve_device, resolve_dtype
from loramerge.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    merges_pb2,
    merges_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)

from .auth import Authenticator, check_exposure, check_listener
from .config import Settings
from .engine import EngineSlot, adapter_dtype, lora_request, open_engine
from .errors import ConfigError, EngineUnavailableError
from .generation import Generator
from .http_openai import HttpServer, OpenAIEndpoint, start_http
from .inference import InferenceServicer
from .interceptors import ServiceInterceptor
from .limits import TenantLimiter
from .logs import configure_logging
from .merge_memory import MergeMemory
from .merge_worker import MergeWorker
from .metrics import Metrics, serve_metrics
from .registry import AdapterRegistry
from .residency import Residency
from .router import build_router
from .run_dir import create_run_dir, sweep_dead_runs
from .selection import Selector
from .servicers import AdaptersServicer, MergesServicer, TenantsServicer
from .store import Store, open_store
from .tls import server_credentials
from .tuning import Tuner
from .versions import LoraEngine, VersionBuilder

logger = logging.getLogger("loramerge.server")

SERVICES = {
    "inference": inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    "merges": merges_pb2.DESCRIPTOR.services_by_name["Merges"].full_name,
    "tenants": tenants_pb2.DESCRIPTOR.services_by_name["Tenants"].full_name,
    "adapters": adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
}
NEED_ENGINE = ("", SERVICES["inference"], SERVICES["merges"])
ENGINE_POLL_SECONDS = 1.0


def resolve_assets(settings: Settings) -> tuple[Path, dict[str, Path]]:
    """The model directory and the configured adapters, preparing the defaults if needed."""
    adapters = dict(settings.adapters.paths)
    model = settings.engine.model
    if model is None or settings.adapters.use_default_pool:
        from .defaults import prepare_defaults

        assets = prepare_defaults(settings.cache_dir, progress=lambda line: logger.info(line))
        model = model or assets.model_dir
        if settings.adapters.use_default_pool:
            adapters = {**assets.adapters, **adapters}
    return model.expanduser(), adapters


async def serve(settings: Settings) -> None:
    """Run the server until SIGTERM or SIGINT."""
    configure_logging(settings.log_level, settings.log_format)
    check_exposure(settings)
    metrics = Metrics(settings.metrics)
    try:
        metrics_server, _ = serve_metrics(settings.metrics)
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {settings.metrics.host}:{settings.metrics.port}: {err.strerror}",
            "metrics.port",
        ) from None
    store = open_store(settings.store.url)
    try:
        model, configured = await asyncio.to_thread(resolve_assets, settings)
        registry = AdapterRegistry(store, settings.adapters.allowed_roots)
        await asyncio.to_thread(registry.load_initial, configured)
        await _run(settings, metrics, store, registry, model)
    finally:
        store.close()
        metrics_server.shutdown()


def build_residency(
    settings: Settings, engine: LoraEngine, metrics: Metrics, run_dir: Path
) -> Residency:
    """The serving core: merge memory → merge worker → version builder → residency."""
    merge = settings.merge
    device = resolve_device(merge.device)
    memory = MergeMemory(
        CalibrationCache(merge.calibration_cache_size),
        metrics,
        device=device,
        dtype=resolve_dtype(merge.dtype),
        budget=merge.memory_budget_bytes,
    )
    worker = MergeWorker(
        memory,
        metrics,
        threads=merge.max_concurrent_merges,
        queue=merge.max_queued_merges,
        cpu_threads=merge.cpu_threads,
    )
    builder = VersionBuilder(
        engine,
        lora_request,
        worker,
        metrics,
        run_dir=run_dir,
        export_dtype=adapter_dtype(settings.engine),
        device=merge.device,
        dtype=merge.dtype,
    )
    capacity = min(merge.cache_size, settings.engine.resident_adapters)
    return Residency(
        engine,
        builder,
        metrics,
        capacity=capacity,
        preference_step=merge.preference_step,
        keep=merge.cache_size,  # beyond the engine's slots, kept on disk for a reload
        spare=1 if capacity >= 4 else 0,  # a miss finds a free slot: evictions off its path
    )


async def _run(
    settings: Settings, metrics: Metrics, store: Store, registry: AdapterRegistry, model: Path
) -> None:
    slot = EngineSlot()
    # The router tokenises with the engine's own tokenizer (routing waits for the engine, as
    # generation does).
    router = build_router(settings.router, model, lambda: slot.engine.get_tokenizer())
    selector = Selector(settings, store, registry, router, metrics)
    merge = settings.merge
    await asyncio.to_thread(sweep_dead_runs, merge.export_dir)
    run_dir = await asyncio.to_thread(create_run_dir, merge.export_dir)
    try:
        residency = build_residency(settings, slot, metrics, run_dir)
        await residency.pool_changed(registry.pool)
        await _serve_grpc(settings, metrics, store, registry, model, slot, selector, residency)
    finally:
        await asyncio.to_thread(shutil.rmtree, run_dir, True)


async def _serve_grpc(
    settings: Settings,
    metrics: Metrics,
    store: Store,
    registry: AdapterRegistry,
    model: Path,
    slot: EngineSlot,
    selector: Selector,
    residency: Residency,
) -> None:
    authenticator = Authenticator(store, settings.auth.enabled)
    limiter = TenantLimiter(settings.limits)
    server = grpc.aio.server(interceptors=[ServiceInterceptor(metrics, authenticator, limiter)])
    generator = Generator(
        slot,
        selector,
        residency,
        metrics,
        max_model_len=settings.engine.max_model_len,
        max_concurrent=settings.grpc.max_concurrent_requests,
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(generator), server)
    merges_pb2_grpc.add_MergesServicer_to_server(MergesServicer(selector, residency), server)
    tuner = Tuner(store, registry, selector.phis, model)
    ahead = residency if settings.merge.merge_ahead else None
    tenants = TenantsServicer(store, selector, tuner, ahead)
    tenants_pb2_grpc.add_TenantsServicer_to_server(tenants, server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(
        AdaptersServicer(registry, residency, selector, settings.merge.device, store), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _report(health_servicer, [s for s in SERVICES.values() if s not in NEED_ENGINE], True)
    await _report(health_servicer, NEED_ENGINE, False)
    reflection.enable_server_reflection(
        (*SERVICES.values(), health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.grpc.host}:{settings.grpc.port}"
    try:
        if settings.tls.enabled:
            server.add_secure_port(address, server_credentials(settings.tls))
        else:
            server.add_insecure_port(address)
    except RuntimeError as err:
        raise ConfigError(f"cannot listen on {address}: {err}", "grpc.port") from None
    await server.start()
    logger.info("gRPC listening", extra={"address": address, "tls": settings.tls.enabled})
    http = await _start_http(
        settings, generator, store, slot, metrics, model, authenticator, limiter
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        slot.stop()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    died = False
    try:
        async with open_engine(settings.engine, model) as engine:
            slot.set(engine)
            residency.start()
            await _report(health_servicer, NEED_ENGINE, True)
            logger.info("serving", extra={"model": str(model), "adapters": _names(registry)})
            warm_up = asyncio.create_task(residency.engine_started(registry.pool))
            died = await _watch(stop, slot)
            grace = settings.grpc.grace_seconds
            await _report(health_servicer, ("", *SERVICES.values()), False)
            stopping = min(grace, 1.0) if died else grace
            await asyncio.gather(server.stop(stopping), http.stop() if http else asyncio.sleep(0))
            warm_up.cancel()
            await residency.close()
            slot.clear()
    finally:
        await server.stop(0)
        if http is not None:
            await http.stop()
    if died:
        raise EngineUnavailableError(
            "the vLLM engine died; exiting so that the supervisor restarts the server"
        )


async def _start_http(
    settings: Settings,
    generator: Generator,
    store: Store,
    slot: EngineSlot,
    metrics: Metrics,
    model: Path,
    authenticator: Authenticator,
    limiter: TenantLimiter,
) -> HttpServer | None:
    """The OpenAI-compatible endpoint, if enabled, with the same keys and limits as gRPC; the
    base model's id is its directory name unless configured."""
    if not settings.http.enabled:
        return None
    check_listener(settings, settings.http.host, "http.host")
    endpoint = OpenAIEndpoint(
        generator,
        store,
        slot,
        metrics,
        authenticator,
        limiter,
        model_id=settings.http.model_name or model.name,
        max_body_bytes=settings.http.max_body_bytes,
    )
    return await start_http(settings.http, endpoint, settings.grpc.grace_seconds)


async def _watch(stop: asyncio.Event, slot: EngineSlot) -> bool:
    """Wait for a stop signal or the engine's death; True if the engine died first."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=ENGINE_POLL_SECONDS)
        except TimeoutError:
            if not slot.ready:
                logger.error("the vLLM engine has stopped; shutting down")
                return True
    logger.info("stop signal received; draining")
    return False


async def _report(
    health_servicer: health.aio.HealthServicer, services: Sequence[str], serving: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in services:
        await health_servicer.set(service, status)


def _names(registry: AdapterRegistry) -> list[str]:
    return list(registry.pool.names) if registry.pool is not None else []
