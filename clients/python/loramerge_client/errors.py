"""Typed errors: one exception class per gRPC status code, carrying the code, the server's
message, and the request field at fault (from the `BadRequest` / `ErrorInfo` details)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class LoramergeError(Exception):
    """A call failed. `code` is the gRPC status code, `message` the server's message, `field`
    the request field it names (or None) and `reason` the server's error type (or "")."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field: str | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(LoramergeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LoramergeError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LoramergeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LoramergeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(LoramergeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LoramergeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(LoramergeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LoramergeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LoramergeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LoramergeError):
    code = grpc.StatusCode.CANCELLED


class Internal(LoramergeError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LoramergeError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> LoramergeError:
    """The typed exception for a failed call (sync or asyncio)."""
    code = error.code()
    message = error.details() or code.name
    field, reason = None, ""
    status = _rich_status(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                field = field or info.metadata.get("field") or None
    cls = _BY_CODE.get(code, LoramergeError)
    return cls(message, code=code, field=field, reason=reason)


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the trailers (grpcio-status's format), if the server sent one."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None
