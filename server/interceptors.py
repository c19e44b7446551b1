"""The one place errors become gRPC statuses, plus request decoding, authentication,
authorization, per-tenant limits, per-RPC metrics and the request log line.

`STATUS_CODES` is the table: the first entry whose type matches the raised error wins. A client
gets the error's own message (which names the field) and structured details — google.rpc
ErrorInfo, BadRequest field violations for INVALID_ARGUMENT, RetryInfo for RESOURCE_EXHAUSTED —
never a traceback or repr, and never more than `MAX_MESSAGE` characters whatever it sent.
Anything unexpected is INTERNAL with an incident id that is logged with the traceback.

Handlers receive raw bytes (their deserializer is taken over here), so a truncated message or a
string that is not UTF-8 is INVALID_ARGUMENT, not an UNKNOWN from inside gRPC. The rules of
`ACCESS` say which `server/auth.py` check each RPC needs; auth and limits themselves know
nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from loramerge import merge_engine as me
from loramerge.v1 import merges_pb2

from . import auth, errors
from .accounting import record_request
from .limits import Admission, TenantLimiter
from .logs import annotate, begin_request
from .metrics import Metrics

logger = logging.getLogger("loramerge.request")
MAX_MESSAGE = 512  # characters; gRPC sends the status in headers (16 KiB for all of them)
MAX_FIELD = 128
PUBLIC = ("Health.",)  # services that need no API key

# What each RPC needs: returns the tenant whose limits the request spends, or None (no limits).
_Rule = Callable[[auth.Principal, Any], str | None]


def _admin(action: str) -> _Rule:
    def rule(principal: auth.Principal, request: Any) -> None:
        auth.authorize_admin(principal, action)

    return rule


def _any(principal: auth.Principal, request: Any) -> None:
    return None


def _own_tenant(field: str) -> _Rule:
    def rule(principal: auth.Principal, request: Any) -> None:
        tenant_id = request.tenant.tenant_id if field == "tenant.tenant_id" else request.tenant_id
        auth.authorize_tenant(principal, tenant_id, field)

    return rule


def _set_tenant(principal: auth.Principal, request: Any) -> None:
    """A tenant key stores its own tenant; TARA weights from a file come from an admin."""
    _own_tenant("tenant.tenant_id")(principal, request)
    if request.HasField("tuned"):
        auth.authorize_admin(principal, "SetTenant with tuned weights")


def _generation(principal: auth.Principal, request: Any) -> str:
    """Generate, GenerateStream, Merge and (through `.merge`) Export."""
    inner = request.merge if isinstance(request, merges_pb2.ExportRequest) else request
    inline = bool(inner.preference) or inner.HasField("merge")
    auth.authorize_generate(principal, inner.tenant_id, inline)
    return auth.subject(principal, inner.tenant_id)


ACCESS: dict[str, _Rule] = {
    "Inference.Generate": _generation,
    "Inference.GenerateStream": _generation,
    "Merges.Merge": _generation,
    "Merges.Export": _generation,
    "Tenants.SetTenant": _set_tenant,
    "Tenants.GetTenant": _own_tenant("tenant_id"),
    "Tenants.ListTenants": _admin("ListTenants"),
    "Tenants.DeleteTenant": _admin("DeleteTenant"),
    "Tenants.TuneTenant": _own_tenant("tenant_id"),
    "Adapters.ListAdapters": _any,
    "Adapters.RegisterAdapter": _admin("RegisterAdapter"),
    "Adapters.RemoveAdapter": _admin("RemoveAdapter"),
    "Adapters.GetDiagnostics": _admin("GetDiagnostics"),
    "ServerReflection.ServerReflectionInfo": _any,
}

STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (me.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (me.AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (me.AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (me.IncompatiblePoolError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """(code, message, field) for an error raised by a servicer."""
    for error_type, code in STATUS_CODES:
        if isinstance(error, error_type):
            field = getattr(error, "field", None)
            if isinstance(error, me.AdapterError):
                field = "path"
            return code, str(error), field
    incident = uuid.uuid4().hex[:12]
    logger.error("internal error (incident %s)", incident, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident})", None


def _rich_status(
    code: grpc.StatusCode, message: str, error: BaseException, field: str | None
) -> Any:
    details = []
    info = error_details_pb2.ErrorInfo(
        reason=type(error).__name__ if code != grpc.StatusCode.INTERNAL else "INTERNAL",
        domain="loramerge.v1",
        metadata={"field": field} if field else {},
    )
    details.append(info)
    if code == grpc.StatusCode.INVALID_ARGUMENT and field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    retry_after = getattr(error, "retry_after", None)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(int(retry_after * 1e9), 1_000_000))  # ≥ 1 ms
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    return rpc_status.to_status(proto)


def _short_name(method: str) -> str:
    """'/loramerge.v1.Inference/Generate' → 'Inference.Generate'."""
    service, _, name = method.rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}.{name}"


class ServiceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Decodes requests, authenticates and authorizes them, applies tenant limits, maps errors
    to statuses, counts and times RPCs, writes one log line per RPC."""

    def __init__(
        self,
        metrics: Metrics,
        authenticator: auth.Authenticator | None = None,
        limiter: TenantLimiter | None = None,
    ) -> None:
        self._metrics = metrics
        self._auth = authenticator
        self._limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        rpc = _short_name(details.method)
        decode = handler.request_deserializer
        if handler.unary_unary is not None:
            behavior = self._unary(rpc, decode, handler.unary_unary)
            return handler._replace(unary_unary=behavior, request_deserializer=None)
        if handler.unary_stream is not None:
            behavior = self._stream(rpc, decode, handler.unary_stream)
            return handler._replace(unary_stream=behavior, request_deserializer=None)
        if handler.stream_stream is not None:  # server reflection
            return handler._replace(stream_stream=self._bidi(rpc, handler.stream_stream))
        return handler

    def _finish(
        self, rpc: str, code: grpc.StatusCode, start: float, fields: dict[str, Any]
    ) -> None:
        seconds = time.perf_counter() - start
        record_request(self._metrics, "grpc", rpc, code.name, seconds, fields)

    @asynccontextmanager
    async def _scope(self, rpc: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Around one RPC: map an error to its status, then count, time and log the RPC."""
        fields, start = begin_request(), time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as error:
            code, status = _failure(error, fields)
            await context.abort_with_status(status)
        finally:
            self._finish(rpc, code, start, fields)

    async def _admit(self, rpc: str, request: Any, context: grpc.aio.ServicerContext) -> str | None:
        """Authenticate and authorize the call; the tenant whose limits it spends, if any."""
        if rpc.startswith(PUBLIC) or self._auth is None:
            return None
        metadata = dict(context.invocation_metadata() or ())
        principal = await self._auth.authenticate(metadata.get("authorization"))
        annotate(key_id=principal.key_id)
        rule = ACCESS.get(rpc, _admin(rpc))  # an RPC missing from the table is admin-only
        return rule(principal, request)

    @asynccontextmanager
    async def _limited(self, subject: str | None) -> AsyncIterator[Admission | None]:
        if subject is None or self._limiter is None or not self._limiter.enabled:
            yield None
            return
        with self._limiter.admit(subject) as admission:
            yield admission

    def _unary(self, rpc: str, decode: Any, behavior: Any) -> Any:
        async def wrapper(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            async with self._scope(rpc, context):
                request = _decode(decode, data)
                async with self._limited(await self._admit(rpc, request, context)) as admission:
                    response = await behavior(request, context)
                    if admission is not None:
                        admission.charge_tokens(getattr(response, "completion_tokens", 0))
                    return response

        return wrapper

    def _stream(self, rpc: str, decode: Any, behavior: Any) -> Any:
        async def wrapper(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._scope(rpc, context):
                request = _decode(decode, data)
                async with self._limited(await self._admit(rpc, request, context)) as admission:
                    async for response in behavior(request, context):
                        if admission is not None:  # streamed counts are cumulative
                            produced = getattr(response, "completion_tokens", 0)
                            admission.charge_tokens(produced - admission.charged)
                        yield response

        return wrapper

    def _bidi(self, rpc: str, behavior: Any) -> Any:
        async def wrapper(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._scope(rpc, context):
                await self._admit(rpc, None, context)
                async for response in behavior(requests, context):
                    yield response

        return wrapper


def _decode(decode: Callable[[bytes], Message] | None, data: bytes) -> Any:
    if decode is None:
        return data
    try:
        return decode(data)
    except DecodeError:
        raise errors.InvalidRequestError(
            "request",
            "not a valid protobuf message for this RPC (truncated, wrong type, or a string "
            "that is not UTF-8)",
        ) from None


def _failure(error: Exception, fields: dict[str, Any]) -> tuple[grpc.StatusCode, Any]:
    code, message, field = status_for(error)
    message, field = _cut(message, MAX_MESSAGE), _cut(field, MAX_FIELD) if field else field
    fields["error"] = message
    return code, _rich_status(code, message, error, field)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"
