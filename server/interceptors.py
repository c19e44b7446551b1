"""The one place errors become gRPC statuses, plus per-RPC metrics and the request log line.

`STATUS_CODES` is the table: the first entry whose type matches the raised error wins. A client
gets the error's own message (which names the field) and structured details — google.rpc
ErrorInfo, and BadRequest field violations for INVALID_ARGUMENT — never a traceback or repr.
Anything unexpected is INTERNAL with an incident id that is logged with the traceback.
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
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from loramerge import merge_engine as me

from . import errors
from .logs import begin_request
from .metrics import Metrics

logger = logging.getLogger("loramerge.request")
MAX_MESSAGE = 2000

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
    """Maps errors to statuses, counts and times RPCs, writes one log line per RPC."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        rpc = _short_name(details.method)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(rpc, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(rpc, handler.unary_stream))
        return handler

    def _finish(
        self, rpc: str, code: grpc.StatusCode, start: float, fields: dict[str, Any]
    ) -> None:
        seconds = time.perf_counter() - start
        self._metrics.requests.labels(rpc=rpc, code=code.name).inc()
        self._metrics.request_duration.labels(rpc=rpc).observe(seconds)
        if not rpc.startswith("Health."):
            logger.info(
                "rpc", extra={"rpc": rpc, "code": code.name, "seconds": round(seconds, 4), **fields}
            )

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

    def _unary(self, rpc: str, behavior: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._scope(rpc, context):
                return await behavior(request, context)

        return wrapper

    def _stream(self, rpc: str, behavior: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._scope(rpc, context):
                async for response in behavior(request, context):
                    yield response

        return wrapper


def _failure(error: Exception, fields: dict[str, Any]) -> tuple[grpc.StatusCode, Any]:
    code, message, field = status_for(error)
    if len(message) > MAX_MESSAGE:  # status travels in HTTP/2 headers (16 KiB for all of them)
        message = f"{message[:MAX_MESSAGE]}… ({len(message) - MAX_MESSAGE} more characters)"
    fields["error"] = message
    return code, _rich_status(code, message, error, field)
