"""Python client for loramerge (gRPC API `loramerge.v1`): `Client` (blocking) and `AsyncClient`
(asyncio) with the same methods; typed errors in `loramerge_client.errors`; the generated
stubs in `loramerge_client.v1`."""

from ._common import DEFAULT_TARGET, TLS, VERSION, Retry
from .aio import AsyncClient
from .client import Client
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoramergeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .types import (
    Adapter,
    Generation,
    GenerationChunk,
    MergeOptions,
    MergeReport,
    RegisteredAdapter,
    RouteOptions,
    Tenant,
    Tuning,
)

__version__ = VERSION
API = "loramerge.v1"  # the proto package this version speaks

__all__ = [
    "API",
    "DEFAULT_TARGET",
    "TLS",
    "Adapter",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Generation",
    "GenerationChunk",
    "Internal",
    "InvalidArgument",
    "LoramergeError",
    "MergeOptions",
    "MergeReport",
    "NotFound",
    "PermissionDenied",
    "RegisteredAdapter",
    "ResourceExhausted",
    "Retry",
    "RouteOptions",
    "Tenant",
    "Tuning",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]
