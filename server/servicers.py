"""The gRPC servicers: thin, with their collaborators injected. Errors propagate as exceptions;
the interceptor turns them into statuses."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator

import grpc

from loramerge.merge_engine import (
    MergeEngineError,
    MergeSpec,
    merged_diagnostics,
    pool_diagnostics,
    validate_adapter_name,
)
from loramerge.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    merges_pb2,
    merges_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)

from . import translate
from .domain import MergeChoice, TenantRecord, validate_tenant_id
from .errors import ConflictError, InvalidRequestError, OverloadedError, ServerError
from .logs import annotate
from .registry import AdapterRegistry
from .residency import Residency
from .selection import Selection, Selector
from .store import Store
from .tuning import PromptItem, Tuner, check_tuned, tuned_choice

MAX_TUNING_PROMPTS = 4096
MAX_TUNING_PROMPT = 4096  # characters
MAX_TUNING_STEPS = 2000
DEFAULT_TUNING_STEPS = 200

MAX_PAGE = 1000
EXPORT_CHUNK = 1 << 20
MAX_VERSION = 2**63 - 1  # the store's integers are signed 64-bit
TENANTS_LISTED = 20

logger = logging.getLogger(__name__)


def _version(value: int, field: str, lowest: int = 1) -> int:
    if not lowest <= value <= MAX_VERSION:
        raise InvalidRequestError(field, f"must be in [{lowest}, 2^63 - 1], got {value}")
    return value


def _tenants_using(store: Store, adapter: str) -> list[str]:
    """Ids of the tenants whose latest preference gives `adapter` a positive weight."""
    users, after = [], None
    while page := store.list_tenants(MAX_PAGE, after):
        users += [r.tenant_id for r in page if r.preference.get(adapter, 0.0) > 0]
        after = page[-1].tenant_id
    return users


class TenantsServicer(tenants_pb2_grpc.TenantsServicer):  # type: ignore[misc]
    def __init__(
        self, store: Store, selector: Selector, tuner: Tuner, ahead: Residency | None = None
    ) -> None:
        self._store = store
        self._selector = selector
        self._tuner = tuner
        self._ahead = ahead  # merges a stored tenant's version ahead of its first request

    def _to_proto(self, record: TenantRecord) -> tenants_pb2.Tenant:
        return translate.tenant_to_proto(record, self._tuner.status(record, self._tuner.pool))

    async def SetTenant(
        self, request: tenants_pb2.SetTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenants_pb2.SetTenantResponse:
        tenant = request.tenant
        validate_tenant_id(tenant.tenant_id, "tenant.tenant_id")
        preference = translate.preference_from_proto(tenant.preference, "tenant.preference")
        choice = translate.merge_choice_from_proto(tenant.merge)
        tuned = None
        if request.HasField("tuned"):
            tuned = translate.tuned_from_proto(request.tuned, "tuned")
            preference = preference or dict(tuned.summary.preference)
            choice = tuned_choice(choice, "tenant.merge")
            check_tuned(tuned, self._selector.require_pool(), preference)
        self._selector.validate(preference, choice)
        expected = (
            _version(request.expected_version, "expected_version", lowest=0)
            if request.HasField("expected_version")
            else None
        )
        record = await asyncio.to_thread(
            self._store.set_tenant, tenant.tenant_id, preference, choice, expected, tuned
        )
        if tuned is not None:
            self._selector.phis.put(tuned.phi)
        annotate(tenant=record.tenant_id, tenant_version=record.version)
        if self._ahead is not None:
            await self._merge_ahead(self._ahead, record.tenant_id)
        return tenants_pb2.SetTenantResponse(tenant=self._to_proto(record))

    async def _merge_ahead(self, residency: Residency, tenant_id: str) -> None:
        """Queue the tenant's merged version (its static preference) to be built ahead. The
        tenant is stored already: nothing here fails the call."""
        try:
            selection = await self._selector.select(tenant_id, {}, MergeChoice())
        except (ServerError, MergeEngineError) as err:
            logger.warning("not merging ahead for tenant %s: %s", tenant_id, err)
            return
        if selection is not None:
            residency.merge_ahead(selection)

    async def GetTenant(
        self, request: tenants_pb2.GetTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenants_pb2.GetTenantResponse:
        validate_tenant_id(request.tenant_id)
        version = _version(request.version, "version") if request.HasField("version") else None
        record = await asyncio.to_thread(self._store.get_tenant, request.tenant_id, version)
        return tenants_pb2.GetTenantResponse(tenant=self._to_proto(record))

    async def TuneTenant(
        self, request: tenants_pb2.TuneTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenants_pb2.TuneTenantResponse:
        validate_tenant_id(request.tenant_id)
        if not 1 <= len(request.prompts) <= MAX_TUNING_PROMPTS:
            raise InvalidRequestError(
                "prompts", f"needs 1–{MAX_TUNING_PROMPTS} prompts, got {len(request.prompts)}"
            )
        prompts = []
        for index, item in enumerate(request.prompts):
            if not item.prompt.strip() or len(item.prompt) > MAX_TUNING_PROMPT:
                raise InvalidRequestError(
                    f"prompts[{index}].prompt", f"must be 1–{MAX_TUNING_PROMPT} characters"
                )
            if item.task:
                validate_adapter_name(item.task, f"prompts[{index}].task")
            prompts.append(PromptItem(item.prompt, item.task or None))
        steps = request.steps if request.HasField("steps") else DEFAULT_TUNING_STEPS
        if not 1 <= steps <= MAX_TUNING_STEPS:
            raise InvalidRequestError("steps", f"must be in [1, {MAX_TUNING_STEPS}], got {steps}")
        rate = request.learning_rate if request.HasField("learning_rate") else 1e-3
        if not 0 < rate <= 1:  # NaN fails too
            raise InvalidRequestError("learning_rate", f"must be in (0, 1], got {rate}")
        pool = self._selector.require_pool()
        for index, item in enumerate(prompts):
            if item.task is not None and item.task not in pool.names:
                raise InvalidRequestError(
                    f"prompts[{index}].task",
                    f"no adapter {item.task!r} in the pool ({', '.join(pool.names)})",
                )
        record = await asyncio.to_thread(self._store.get_tenant, request.tenant_id)
        self._tuner.start(record, pool, prompts, steps, rate)
        annotate(tenant=record.tenant_id, tenant_version=record.version)
        status = self._tuner.status(record, pool)
        assert status is not None
        return tenants_pb2.TuneTenantResponse(tuning=translate.tuning_to_proto(status))

    async def ListTenants(
        self, request: tenants_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> tenants_pb2.ListTenantsResponse:
        if request.page_size > MAX_PAGE:
            raise InvalidRequestError("page_size", f"must be ≤ {MAX_PAGE}, got {request.page_size}")
        size = request.page_size or 100
        after = request.page_token or None
        if after is not None:
            validate_tenant_id(after, "page_token")
        records = await asyncio.to_thread(self._store.list_tenants, size + 1, after)
        page, more = records[:size], len(records) > size
        return tenants_pb2.ListTenantsResponse(
            tenants=[self._to_proto(r) for r in page],
            next_page_token=page[-1].tenant_id if more else "",
        )

    async def DeleteTenant(
        self, request: tenants_pb2.DeleteTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenants_pb2.DeleteTenantResponse:
        validate_tenant_id(request.tenant_id)
        await asyncio.to_thread(self._store.delete_tenant, request.tenant_id)
        self._tuner.forget(request.tenant_id)
        return tenants_pb2.DeleteTenantResponse()


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):  # type: ignore[misc]
    def __init__(
        self,
        registry: AdapterRegistry,
        versions: Residency,
        selector: Selector,
        device: str,
        store: Store,
    ) -> None:
        self._store = store
        self._registry = registry
        self._versions = versions
        self._selector = selector
        self._device = device
        self._diagnostics = asyncio.Semaphore(1)  # fp64 SVDs of the whole pool: one at a time

    async def RegisterAdapter(
        self, request: adapters_pb2.RegisterAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.RegisterAdapterResponse:
        if not request.path:
            raise InvalidRequestError("path", "is required")
        adapter, pool = await self._registry.register(request.name, request.path)
        await self._versions.pool_changed(pool)
        return adapters_pb2.RegisterAdapterResponse(
            adapter=translate.adapter_to_proto(adapter),
            pool_fingerprint=pool.fingerprint,
            warnings=list(pool.warnings),
        )

    async def RemoveAdapter(
        self, request: adapters_pb2.RemoveAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.RemoveAdapterResponse:
        validate_adapter_name(request.name, "name")
        if not request.force:
            users = await asyncio.to_thread(_tenants_using, self._store, request.name)
            if users:
                listed = ", ".join(users[:TENANTS_LISTED])
                more = (
                    f" and {len(users) - TENANTS_LISTED} more"
                    if len(users) > TENANTS_LISTED
                    else ""
                )
                raise ConflictError(
                    f"adapter {request.name!r} has a weight in the preference of tenants "
                    f"{listed}{more}; update them first or set force",
                    "name",
                )
        pool = await self._registry.remove(request.name)
        await self._versions.pool_changed(pool)
        return adapters_pb2.RemoveAdapterResponse(
            pool_fingerprint=pool.fingerprint if pool is not None else ""
        )

    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        pool = self._registry.pool
        if pool is None:
            return adapters_pb2.ListAdaptersResponse()
        return adapters_pb2.ListAdaptersResponse(
            adapters=[translate.adapter_to_proto(a) for a in pool.adapters],
            pool_fingerprint=pool.fingerprint,
        )

    async def GetDiagnostics(
        self, request: adapters_pb2.GetDiagnosticsRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.GetDiagnosticsResponse:
        if self._diagnostics.locked():
            raise OverloadedError("a diagnostics computation is running; retry", retry_after=1.0)
        async with self._diagnostics:
            return await self._diagnose(request)

    async def _diagnose(
        self, request: adapters_pb2.GetDiagnosticsRequest
    ) -> adapters_pb2.GetDiagnosticsResponse:
        pool = self._selector.require_pool()
        preference = translate.preference_from_proto(request.preference, "preference")
        spec: MergeSpec | None = None
        if preference:
            selection = await self._selector.select(
                "", preference, translate.merge_choice_from_proto(request.merge)
            )
            assert selection is not None
            spec = selection.spec

        def compute() -> adapters_pb2.GetDiagnosticsResponse:
            merged = (
                merged_diagnostics(pool, preference, spec, device=self._device)
                if spec is not None
                else None
            )
            return translate.diagnostics_response(
                pool_diagnostics(pool), merged, request.per_module
            )

        return await self._versions.builder.worker.run(compute, "diagnostics")


class MergesServicer(merges_pb2_grpc.MergesServicer):  # type: ignore[misc]
    def __init__(self, selector: Selector, versions: Residency) -> None:
        self._selector = selector
        self._versions = versions

    async def _selection(self, request: merges_pb2.MergeRequest) -> Selection:
        preference = translate.preference_from_proto(request.preference, "preference")
        choice = translate.merge_choice_from_proto(request.merge)
        selection = await self._selector.select(request.tenant_id, preference, choice)
        if selection is None:
            raise InvalidRequestError(
                "preference", "nothing to merge: give a preference or a tenant that has one"
            )
        return selection

    async def Merge(
        self, request: merges_pb2.MergeRequest, context: grpc.aio.ServicerContext
    ) -> merges_pb2.MergeResponse:
        selection = await self._selection(request)
        async with self._versions.lease(selection) as lease:
            version = lease.version
            annotate(tenant=request.tenant_id, adapter_id=version.adapter_id, cached=lease.cached)
            return translate.merge_response(version, lease.cached)

    async def Export(
        self, request: merges_pb2.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[merges_pb2.ExportResponse]:
        selection = await self._selection(request.merge)
        async with self._versions.lease(dataclasses.replace(selection, pin_for=None)) as lease:
            version = lease.version
            annotate(tenant=request.merge.tenant_id, adapter_id=version.adapter_id)
            for path in sorted(version.path.iterdir()):
                data = await asyncio.to_thread(path.read_bytes)
                yield merges_pb2.ExportResponse(
                    file=merges_pb2.FileHeader(
                        name=path.name,
                        size=len(data),
                        sha256=hashlib.sha256(data).hexdigest(),
                        adapter_id=version.adapter_id,
                    )
                )
                for start in range(0, len(data), EXPORT_CHUNK):
                    yield merges_pb2.ExportResponse(chunk=data[start : start + EXPORT_CHUNK])
