"""Property test: random and malformed requests for every RPC against the real server never get
INTERNAL or UNKNOWN, keep the server healthy, keep error statuses small, and a rejected request
changes nothing (tenants, adapters, resident merged versions).

Requests are built field by field from the message descriptors, each field drawn from hostile
values (NaN, huge numbers, 2^63, control characters, long strings, unknown names) mixed with
valid ones, or sent as random bytes. Valid requests may change state, so they only touch
tenants named `h-*`, never remove or register real adapters, and generate at most one token;
GetDiagnostics requests always name an unknown adapter (a valid one computes for ~30 s here).
Derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile import MAX_STATUS_BYTES, RPCS, call, snapshot, status_bytes

from harness import ServerProcess
from loramerge.v1 import adapters_pb2, inference_pb2, merges_pb2, tenants_pb2

pytestmark = pytest.mark.slow

REQUESTS: dict[str, type[Message]] = {
    "/loramerge.v1.Tenants/SetTenant": tenants_pb2.SetTenantRequest,
    "/loramerge.v1.Tenants/GetTenant": tenants_pb2.GetTenantRequest,
    "/loramerge.v1.Tenants/ListTenants": tenants_pb2.ListTenantsRequest,
    "/loramerge.v1.Tenants/DeleteTenant": tenants_pb2.DeleteTenantRequest,
    "/loramerge.v1.Adapters/RegisterAdapter": adapters_pb2.RegisterAdapterRequest,
    "/loramerge.v1.Adapters/RemoveAdapter": adapters_pb2.RemoveAdapterRequest,
    "/loramerge.v1.Adapters/ListAdapters": adapters_pb2.ListAdaptersRequest,
    "/loramerge.v1.Adapters/GetDiagnostics": adapters_pb2.GetDiagnosticsRequest,
    "/loramerge.v1.Inference/Generate": inference_pb2.GenerateRequest,
    "/loramerge.v1.Inference/GenerateStream": inference_pb2.GenerateRequest,
    "/loramerge.v1.Merges/Merge": merges_pb2.MergeRequest,
    "/loramerge.v1.Merges/Export": merges_pb2.ExportRequest,
}
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}

HOSTILE_TEXT = [
    *("", " ", "\n", "a\n", "\x00", "é", "\u202e", "x" * 300, "../..", "~root/x", "/etc"),
    *("/dev/zero", "ta", "ties", "knots", "total", "magic", "%s%n", "\ud7ff"),
]
NUMBERS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 1e38, 1e308, -1e-300]
FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1000.0, 1001.0, 3e38, -1e-45]
UINTS = [0, 1, 2, 63, 64, 1000, 1001, 2**31, 2**32 - 1]
ULONGS = [*UINTS, 2**63 - 1, 2**63, 2**64 - 1]


def text() -> st.SearchStrategy[str]:
    return st.sampled_from(HOSTILE_TEXT) | st.text(max_size=24)


def tenant_ids() -> st.SearchStrategy[str]:
    """Invalid ids, or valid ones under `h-` (the only tenants a valid request may change)."""
    return st.sampled_from(["", "h-\n", "h x", "\x00", "é", "h" * 200]) | st.text(
        st.characters(codec="ascii"), max_size=12
    ).map(lambda s: f"h-{s}")


def adapter_names(pool: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from([*pool, "nope", "", "a\n", "n" * 100]) | text()


def value(field: FieldDescriptor, pool: list[str], rpc: str, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        names = adapter_names(pool)
        return st.dictionaries(names, st.sampled_from(NUMBERS), max_size=3) | st.just(
            {f"a{i}": 1.0 for i in range(70)}
        )
    if kind == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Timestamp" or depth > 3:
            return st.none()
        return message(field.message_type, pool, rpc, depth + 1)
    if kind == FieldDescriptor.TYPE_STRING:
        if field.name in ("tenant_id", "page_token"):
            return tenant_ids()
        if field.name == "name":  # never a real adapter: valid removals would break the pool
            return text().map(lambda s: s if s not in pool else f"h-{s}")
        if field.name == "role":
            return st.sampled_from(["user", "system", "assistant", "robot", ""])
        return text()
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.sampled_from(NUMBERS) | st.floats(allow_nan=True)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.sampled_from(FLOATS) | st.floats(width=32, allow_nan=True)
    if kind == FieldDescriptor.TYPE_ENUM:  # open enums: unknown numbers arrive too
        return st.sampled_from([*(v.number for v in field.enum_type.values), 99, -1])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_UINT32:
        if field.name == "max_tokens":  # at most one generated token when valid
            return st.sampled_from([0, 1, 2**32 - 1])
        return st.sampled_from(UINTS)
    if kind == FieldDescriptor.TYPE_UINT64:
        return st.sampled_from(ULONGS)
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def message_values(
    draw: Any, descriptor: Descriptor, pool: list[str], rpc: str, depth: int
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        strategy = value(field, pool, rpc, depth)
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.is_repeated and not is_map:
            strategy = st.lists(strategy, max_size=3) | st.just([draw(strategy)] * 20)
        drawn = draw(strategy)
        if drawn is not None:
            values[field.name] = drawn
    return values


def message(descriptor: Descriptor, pool: list[str], rpc: str, depth: int = 0) -> Any:
    return message_values(descriptor, pool, rpc, depth)


def requests(path: str, pool: list[str]) -> st.SearchStrategy[bytes]:
    cls = REQUESTS[path]

    def build(values: dict[str, Any]) -> bytes:
        request = cls(**values)
        if cls is inference_pb2.GenerateRequest and not request.HasField("max_tokens"):
            request.max_tokens = 1
        if cls is adapters_pb2.RegisterAdapterRequest and request.path.startswith("/tmp"):
            request.path = "/etc"  # never a real adapter directory
        if cls is adapters_pb2.GetDiagnosticsRequest:  # a valid one costs ~30 s of fp64 SVDs
            request.preference["h-unknown"] = 1.0
        return request.SerializeToString()

    return message(cls.DESCRIPTOR, pool, path).map(build) | st.binary(max_size=48)


@pytest.mark.parametrize("path", list(REQUESTS), ids=[p.rsplit("/", 1)[1] for p in REQUESTS])
def test_random_requests_are_answered_cleanly(
    path: str, channel: grpc.Channel, server: ServerProcess, task_names: list[str]
) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=requests(path, task_names))
    def check(data: bytes) -> None:
        tenants, pool, resident = snapshot(channel, server)
        try:
            call(channel, path, data, timeout=300)
        except grpc.RpcError as error:
            assert error.code() not in NEVER, (error.code(), error.details(), data[:200])
            assert status_bytes(error) < MAX_STATUS_BYTES
            after = snapshot(channel, server)
            assert after[:2] == (tenants, pool), (error.code(), error.details())
            assert after[2] <= resident  # a rejected request never adds a merged version
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    assert path in RPCS
    check()
