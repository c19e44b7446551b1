"""The server process: wiring, start-up order, health, graceful shutdown.

Start-up: metrics endpoint → store → default model and adapters (prepared once, cached) →
adapter pool → gRPC server (Tenants and Adapters SERVING, Inference and Merges NOT_SERVING) →
vLLM engine → everything SERVING. SIGTERM/SIGINT: NOT_SERVING, drain for `grace_seconds`,
stop the engine, remove merged versions.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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

from .auth import Authenticator, check_exposure
from .config import Settings
from .engine import EngineSlot, adapter_dtype, lora_request, open_engine
from .errors import ConfigError
from .inference import InferenceServicer
from .interceptors import ServiceInterceptor
from .limits import TenantLimiter
from .logs import configure_logging
from .metrics import Metrics, serve_metrics
from .registry import AdapterRegistry
from .selection import Selector
from .servicers import AdaptersServicer, MergesServicer, TenantsServicer
from .store import Store, open_store
from .tls import server_credentials
from .versions import MergedVersions

logger = logging.getLogger("loramerge.server")

SERVICES = {
    "inference": inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    "merges": merges_pb2.DESCRIPTOR.services_by_name["Merges"].full_name,
    "tenants": tenants_pb2.DESCRIPTOR.services_by_name["Tenants"].full_name,
    "adapters": adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
}
NEED_ENGINE = ("", SERVICES["inference"], SERVICES["merges"])


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


async def _run(
    settings: Settings, metrics: Metrics, store: Store, registry: AdapterRegistry, model: Path
) -> None:
    slot = EngineSlot()
    selector = Selector(settings, store, registry)
    merge = settings.merge
    versions = MergedVersions(
        slot,
        lora_request,
        metrics,
        capacity=min(merge.cache_size, settings.engine.resident_adapters),
        export_dir=merge.export_dir,
        export_dtype=adapter_dtype(settings.engine),
        preference_step=merge.preference_step,
        device=merge.device,
        dtype=merge.dtype,
        max_concurrent_merges=merge.max_concurrent_merges,
        calibration_cache_size=merge.calibration_cache_size,
    )
    await versions.pool_changed(registry.pool)

    authenticator = Authenticator(store, settings.auth.enabled)
    limiter = TenantLimiter(settings.limits)
    server = grpc.aio.server(interceptors=[ServiceInterceptor(metrics, authenticator, limiter)])
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(
            slot,
            selector,
            versions,
            metrics,
            max_model_len=settings.engine.max_model_len,
            max_concurrent=settings.grpc.max_concurrent_requests,
        ),
        server,
    )
    merges_pb2_grpc.add_MergesServicer_to_server(MergesServicer(selector, versions), server)
    tenants_pb2_grpc.add_TenantsServicer_to_server(TenantsServicer(store, selector), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(
        AdaptersServicer(registry, versions, selector, merge.device, store), server
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

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with open_engine(settings.engine, model) as engine:
            slot.set(engine)
            await _report(health_servicer, NEED_ENGINE, True)
            logger.info("serving", extra={"model": str(model), "adapters": _names(registry)})
            await _watch(stop, slot, health_servicer)
            await _report(health_servicer, ("", *SERVICES.values()), False)
            await server.stop(settings.grpc.grace_seconds)
            await versions.close()
            slot.clear()
    finally:
        await server.stop(0)


async def _watch(
    stop: asyncio.Event, slot: EngineSlot, health_servicer: health.aio.HealthServicer
) -> None:
    """Wait for a stop signal; report NOT_SERVING (once) if the engine dies meanwhile."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=5)
        except TimeoutError:
            if not slot.ready:
                logger.error("the vLLM engine has stopped; reporting NOT_SERVING")
                await _report(health_servicer, NEED_ENGINE, False)
                await stop.wait()


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
