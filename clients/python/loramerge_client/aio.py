"""The asyncio client: the same methods as `Client`, awaitable."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from . import _convert as convert
from ._common import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    TLS,
    ExportWriter,
    Retry,
    channel_options,
    metadata,
)
from .errors import from_rpc_error
from .types import (
    Adapter,
    Generation,
    GenerationChunk,
    MergeOptionsLike,
    MergeReport,
    Messages,
    RegisteredAdapter,
    Tenant,
    Tuning,
)
from .v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2_grpc,
    merges_pb2,
    merges_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)

R = TypeVar("R")


class AsyncClient:
    """A connection to a loramerge server for asyncio code (`async with AsyncClient(...) as
    client:`); see `Client` for deadlines, retries and metadata.

    Every call has a deadline (`timeout` seconds, per call or the client's default) and raises
    a `LoramergeError` subclass on failure. Calls that are safe to repeat are retried on
    UNAVAILABLE as `retry` says (`Retry(attempts=1)` disables that). `token` is sent as
    `authorization: Bearer <token>`; the tenant of a call as `x-tenant-id`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: TLS | bool = False,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
    ) -> None:
        tls_config = TLS() if tls is True else tls or None
        options = channel_options(tls_config)
        self._channel = (
            grpc.aio.secure_channel(target, tls_config.credentials(), options)
            if tls_config is not None
            else grpc.aio.insecure_channel(target, options)
        )
        self.target = target
        self._token = token
        self._timeout = timeout
        self._retry = retry or Retry()
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._tenants = tenants_pb2_grpc.TenantsStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._merges = merges_pb2_grpc.MergesStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    # --- plumbing -----------------------------------------------------------------------

    async def _unary(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        tenant_id: str | None = None,
        timeout: float | None = None,
        retry: bool,
    ) -> R:
        deadline = time.monotonic() + (timeout or self._timeout)
        attempt = 1
        while True:
            try:
                return await method(
                    request,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=metadata(self._token, tenant_id),
                )
            except grpc.RpcError as error:
                delay = self._retry.delay(attempt, error.code(), deadline) if retry else None
                if delay is None:
                    raise from_rpc_error(error) from None
            await asyncio.sleep(delay)
            attempt += 1

    async def _stream(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Responses of a server stream; retried only while nothing has arrived yet."""
        deadline = time.monotonic() + (timeout or self._timeout)
        attempt, received = 1, False
        while True:
            call = method(
                request,
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=metadata(self._token, tenant_id),
            )
            try:
                async for response in call:
                    received = True
                    yield response
                return
            except grpc.RpcError as error:
                delay = None if received else self._retry.delay(attempt, error.code(), deadline)
                if delay is None:
                    raise from_rpc_error(error) from None
            finally:
                call.cancel()  # the caller stopped early (no-op once the stream ended)
            await asyncio.sleep(delay)
            attempt += 1

    # --- inference ----------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        tenant_id: str | None = None,
        preference: Mapping[str, float] | None = None,
        merge: MergeOptionsLike | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Generate a completion of `prompt` or of chat `messages` (dicts with role and
        content, or (role, content) pairs), on the tenant's merged adapter, an inline
        `preference` (adapter name → weight), or the base model when neither is given."""
        request = convert.generate_request(
            prompt, messages, tenant_id, preference, merge, max_tokens, temperature, top_p,
            top_k, stop, seed,
        )  # fmt: skip
        response = await self._unary(
            self._inference.Generate, request, tenant_id=tenant_id, timeout=timeout, retry=True
        )
        return convert.generation(response)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        tenant_id: str | None = None,
        preference: Mapping[str, float] | None = None,
        merge: MergeOptionsLike | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Like `generate`, as text deltas while they are produced. Stopping the iteration
        early cancels the request on the server."""
        request = convert.generate_request(
            prompt, messages, tenant_id, preference, merge, max_tokens, temperature, top_p,
            top_k, stop, seed,
        )  # fmt: skip
        async for response in self._stream(
            self._inference.GenerateStream, request, tenant_id=tenant_id, timeout=timeout
        ):
            yield convert.chunk(response)

    # --- tenants ------------------------------------------------------------------------

    async def set_tenant(
        self,
        tenant_id: str,
        preference: Mapping[str, float] | None,
        merge: MergeOptionsLike | None = None,
        *,
        expected_version: int | None = None,
        tuned: convert.TunedLike | None = None,
        timeout: float | None = None,
    ) -> Tenant:
        """Create or replace a tenant (a new version each call). With `expected_version`, only
        if the current version is that (0: must not exist), else `FailedPrecondition`.
        `tuned` gives TARA weights (a phi.json path or its content; admin keys only): the
        preference may then be None (φ's own), and the method becomes tara."""
        request = convert.set_tenant_request(tenant_id, preference, merge, expected_version, tuned)
        response = await self._unary(
            self._tenants.SetTenant, request, tenant_id=tenant_id, timeout=timeout, retry=False
        )
        return convert.tenant(response.tenant)

    async def get_tenant(
        self, tenant_id: str, *, version: int | None = None, timeout: float | None = None
    ) -> Tenant:
        request = tenants_pb2.GetTenantRequest(tenant_id=tenant_id, version=version)
        response = await self._unary(
            self._tenants.GetTenant, request, tenant_id=tenant_id, timeout=timeout, retry=True
        )
        return convert.tenant(response.tenant)

    async def list_tenants(
        self, *, page_size: int = 100, timeout: float | None = None
    ) -> AsyncIterator[Tenant]:
        """Every tenant (latest versions) by id, fetching page after page."""
        token = ""
        while True:
            request = tenants_pb2.ListTenantsRequest(page_size=page_size, page_token=token)
            page = await self._unary(
                self._tenants.ListTenants, request, timeout=timeout, retry=True
            )
            for tenant in page.tenants:
                yield convert.tenant(tenant)
            token = page.next_page_token
            if not token:
                return

    async def tune_tenant(
        self,
        tenant_id: str,
        prompts: Sequence[convert.PromptLike],
        *,
        steps: int | None = None,
        learning_rate: float | None = None,
        timeout: float | None = None,
    ) -> Tuning:
        """Start tuning the tenant's TARA weights on unlabeled `prompts` (text, (text, task)
        or {"prompt", "task"}: task is the adapter whose task it is) in the background on the
        server; `get_tenant(...).tuning` follows it. `FailedPrecondition` where the server
        cannot train, `ResourceExhausted` while another tuning runs."""
        request = convert.tune_tenant_request(tenant_id, prompts, steps, learning_rate)
        response = await self._unary(
            self._tenants.TuneTenant, request, tenant_id=tenant_id, timeout=timeout, retry=False
        )
        return convert.tuning(response.tuning)

    async def delete_tenant(self, tenant_id: str, *, timeout: float | None = None) -> None:
        request = tenants_pb2.DeleteTenantRequest(tenant_id=tenant_id)
        await self._unary(
            self._tenants.DeleteTenant, request, tenant_id=tenant_id, timeout=timeout, retry=False
        )

    # --- adapters -----------------------------------------------------------------------

    async def register_adapter(
        self, name: str, path: str | os.PathLike[str], *, timeout: float | None = None
    ) -> RegisteredAdapter:
        """Add the PEFT adapter in the server-side directory `path` (under an allowed root)."""
        request = adapters_pb2.RegisterAdapterRequest(name=name, path=str(path))
        response = await self._unary(
            self._adapters.RegisterAdapter, request, timeout=timeout, retry=False
        )
        return convert.registered(response)

    async def remove_adapter(
        self, name: str, *, force: bool = False, timeout: float | None = None
    ) -> str:
        """Remove an adapter from the pool; returns the new pool's fingerprint. Refused
        (`FailedPrecondition`) while stored tenants give it a weight, unless `force`."""
        request = adapters_pb2.RemoveAdapterRequest(name=name, force=force)
        response = await self._unary(
            self._adapters.RemoveAdapter, request, timeout=timeout, retry=False
        )
        return str(response.pool_fingerprint)

    async def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        request = adapters_pb2.ListAdaptersRequest()
        response = await self._unary(
            self._adapters.ListAdapters, request, timeout=timeout, retry=True
        )
        return [convert.adapter(a) for a in response.adapters]

    async def diagnostics(
        self,
        *,
        preference: Mapping[str, float] | None = None,
        merge: MergeOptionsLike | None = None,
        per_module: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Interference diagnostics of the pool (and of one merge, with a preference)."""
        request = convert.diagnostics_request(preference, merge, per_module)
        response = await self._unary(
            self._adapters.GetDiagnostics, request, timeout=timeout, retry=True
        )
        return convert.diagnostics(response)

    # --- merges -------------------------------------------------------------------------

    async def merge(
        self,
        *,
        tenant_id: str | None = None,
        preference: Mapping[str, float] | None = None,
        merge: MergeOptionsLike | None = None,
        timeout: float | None = None,
    ) -> MergeReport:
        """Merge (or reuse) the tenant's or the inline preference's adapter and load it."""
        request = convert.merge_request(tenant_id, preference, merge)
        response = await self._unary(
            self._merges.Merge, request, tenant_id=tenant_id, timeout=timeout, retry=True
        )
        return convert.merge_report(response)

    async def export(
        self,
        out_dir: str | os.PathLike[str],
        *,
        tenant_id: str | None = None,
        preference: Mapping[str, float] | None = None,
        merge: MergeOptionsLike | None = None,
        timeout: float | None = None,
    ) -> Path:
        """Download the merged adapter as a PEFT folder into `out_dir` (new or empty),
        checking every file's SHA-256; nothing is left behind if it fails."""
        request = merges_pb2.ExportRequest(
            merge=convert.merge_request(tenant_id, preference, merge)
        )
        writer = ExportWriter(out_dir)
        try:
            async for response in self._stream(
                self._merges.Export, request, tenant_id=tenant_id, timeout=timeout
            ):
                writer.feed(response)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise
