"""Authentication and authorization on the real server (the session server runs with
`auth.enabled`; keys are made with `loramerge keys` on its store while it runs)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ServerProcess, create_key
from loramerge.v1 import adapters_pb2, inference_pb2, merges_pb2, tenants_pb2

pytestmark = pytest.mark.slow

OWN, OTHER = "t-auth-own", "t-auth-other"

# One request per RPC (all but health), valid enough to reach authorization.
EVERY_RPC: list[tuple[str, Message, type[Message]]] = [
    (
        "/loramerge.v1.Tenants/SetTenant",
        tenants_pb2.SetTenantRequest(tenant={"tenant_id": OWN}),
        tenants_pb2.SetTenantResponse,
    ),
    (
        "/loramerge.v1.Tenants/GetTenant",
        tenants_pb2.GetTenantRequest(tenant_id=OWN),
        tenants_pb2.GetTenantResponse,
    ),
    (
        "/loramerge.v1.Tenants/ListTenants",
        tenants_pb2.ListTenantsRequest(),
        tenants_pb2.ListTenantsResponse,
    ),
    (
        "/loramerge.v1.Tenants/DeleteTenant",
        tenants_pb2.DeleteTenantRequest(tenant_id=OWN),
        tenants_pb2.DeleteTenantResponse,
    ),
    (  # no prompts: past authorization it is INVALID_ARGUMENT, and no tuning starts
        "/loramerge.v1.Tenants/TuneTenant",
        tenants_pb2.TuneTenantRequest(tenant_id=OWN),
        tenants_pb2.TuneTenantResponse,
    ),
    (
        "/loramerge.v1.Adapters/RegisterAdapter",
        adapters_pb2.RegisterAdapterRequest(name="x", path="/x"),
        adapters_pb2.RegisterAdapterResponse,
    ),
    (
        "/loramerge.v1.Adapters/RemoveAdapter",
        adapters_pb2.RemoveAdapterRequest(name="x"),
        adapters_pb2.RemoveAdapterResponse,
    ),
    (
        "/loramerge.v1.Adapters/ListAdapters",
        adapters_pb2.ListAdaptersRequest(),
        adapters_pb2.ListAdaptersResponse,
    ),
    (
        "/loramerge.v1.Adapters/GetDiagnostics",
        adapters_pb2.GetDiagnosticsRequest(),
        adapters_pb2.GetDiagnosticsResponse,
    ),
    (
        "/loramerge.v1.Inference/Generate",
        inference_pb2.GenerateRequest(prompt="hi", tenant_id=OWN, max_tokens=1),
        inference_pb2.GenerateResponse,
    ),
    (
        "/loramerge.v1.Inference/GenerateStream",
        inference_pb2.GenerateRequest(prompt="hi", tenant_id=OWN, max_tokens=1),
        inference_pb2.GenerateStreamResponse,
    ),
    (
        "/loramerge.v1.Merges/Merge",
        merges_pb2.MergeRequest(tenant_id=OWN),
        merges_pb2.MergeResponse,
    ),
    (
        "/loramerge.v1.Merges/Export",
        merges_pb2.ExportRequest(merge={"tenant_id": OWN}),
        merges_pb2.ExportResponse,
    ),
]
STREAMING = ("/loramerge.v1.Inference/GenerateStream", "/loramerge.v1.Merges/Export")


def invoke(channel: grpc.Channel, path: str, request: Message, response: type[Message]) -> Any:
    kind = channel.unary_stream if path in STREAMING else channel.unary_unary
    method = kind(path, request_serializer=type(request).SerializeToString,
                  response_deserializer=response.FromString)  # fmt: skip
    result = method(request, timeout=120)
    return list(result) if path in STREAMING else result


def code_of(channel: grpc.Channel, path: str, request: Message, response: type[Message]) -> Any:
    try:
        invoke(channel, path, request, response)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def own_key(server: ServerProcess, channel: grpc.Channel, task_names: list[str]) -> str:
    """A tenant key for OWN (no inline preferences); OWN and OTHER exist."""
    set_tenant = channel.unary_unary(
        "/loramerge.v1.Tenants/SetTenant",
        request_serializer=tenants_pb2.SetTenantRequest.SerializeToString,
        response_deserializer=tenants_pb2.SetTenantResponse.FromString,
    )
    for tenant in (OWN, OTHER):
        preference = {task_names[0]: 1.0}
        set_tenant(
            tenants_pb2.SetTenantRequest(tenant={"tenant_id": tenant, "preference": preference})
        )
    return create_key(server.workdir / "config.yaml", "--tenant", OWN)


def test_health_needs_no_key_and_everything_else_does(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for path, request, response in EVERY_RPC:
            assert code_of(channel, path, request, response) == grpc.StatusCode.UNAUTHENTICATED
    for bad in ("lm_0123456789abcdef." + "A" * 43, "nonsense", server.api_key + "x"):  # type: ignore[operator]
        with server.channel(key=bad) as channel:
            for path, request, response in EVERY_RPC[:3]:
                code = code_of(channel, path, request, response)
                assert code == grpc.StatusCode.UNAUTHENTICATED, path


def test_a_tenant_key_acts_only_as_its_tenant(server: ServerProcess, own_key: str) -> None:
    allowed = {
        "/loramerge.v1.Tenants/SetTenant",
        "/loramerge.v1.Tenants/GetTenant",
        "/loramerge.v1.Adapters/ListAdapters",
        "/loramerge.v1.Merges/Merge",
        "/loramerge.v1.Merges/Export",
        "/loramerge.v1.Inference/Generate",
    }
    denied = grpc.StatusCode.PERMISSION_DENIED
    with server.channel(key=own_key) as channel:
        for path, request, response in EVERY_RPC:
            if path == "/loramerge.v1.Inference/GenerateStream":
                continue  # same rule as Generate; one LoRA generation is enough
            if path == "/loramerge.v1.Tenants/SetTenant":
                continue  # would drop OWN's preference; checked below
            if path == "/loramerge.v1.Tenants/TuneTenant":  # allowed: its own prompts
                assert code_of(channel, path, request, response) == grpc.StatusCode.INVALID_ARGUMENT
                continue
            code = code_of(channel, path, request, response)
            assert (code == grpc.StatusCode.OK) == (path in allowed), (path, code)
            if path not in allowed:
                assert code == denied, path
        as_other = [
            (
                "/loramerge.v1.Tenants/GetTenant",
                tenants_pb2.GetTenantRequest(tenant_id=OTHER),
                tenants_pb2.GetTenantResponse,
            ),
            (
                "/loramerge.v1.Tenants/SetTenant",
                tenants_pb2.SetTenantRequest(tenant={"tenant_id": OTHER}),
                tenants_pb2.SetTenantResponse,
            ),
            (
                "/loramerge.v1.Tenants/TuneTenant",
                tenants_pb2.TuneTenantRequest(tenant_id=OTHER),
                tenants_pb2.TuneTenantResponse,
            ),
            (  # TARA weights from a file come from an admin
                "/loramerge.v1.Tenants/SetTenant",
                tenants_pb2.SetTenantRequest(tenant={"tenant_id": OWN}, tuned={"adapters": ["x"]}),
                tenants_pb2.SetTenantResponse,
            ),
            (
                "/loramerge.v1.Inference/Generate",
                inference_pb2.GenerateRequest(prompt="hi", tenant_id=OTHER),
                inference_pb2.GenerateResponse,
            ),
            (
                "/loramerge.v1.Inference/Generate",
                inference_pb2.GenerateRequest(prompt="hi"),
                inference_pb2.GenerateResponse,
            ),
            (
                "/loramerge.v1.Merges/Merge",
                merges_pb2.MergeRequest(tenant_id=OTHER),
                merges_pb2.MergeResponse,
            ),
            (
                "/loramerge.v1.Inference/Generate",
                inference_pb2.GenerateRequest(prompt="hi", tenant_id=OWN, preference={"x": 1}),
                inference_pb2.GenerateResponse,
            ),
            (
                "/loramerge.v1.Merges/Merge",
                merges_pb2.MergeRequest(tenant_id=OWN, merge={"method": "ties"}),
                merges_pb2.MergeResponse,
            ),
        ]
        for path, request, response in as_other:
            assert code_of(channel, path, request, response) == denied, (path, request)


def test_inline_preferences_need_a_key_that_allows_them(server: ServerProcess) -> None:
    key = create_key(server.workdir / "config.yaml", "--tenant", OWN, "--allow-inline")
    request = inference_pb2.GenerateRequest(prompt="hi", tenant_id=OWN, preference={"nope": 1})
    with server.channel(key=key) as channel:  # past authorization: the preference is checked
        path, response = "/loramerge.v1.Inference/Generate", inference_pb2.GenerateResponse
        assert code_of(channel, path, request, response) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_revoked_key_is_refused_at_once(server: ServerProcess) -> None:
    key = create_key(server.workdir / "config.yaml", "--tenant", OWN)
    path, request, response = next(rpc for rpc in EVERY_RPC if rpc[0].endswith("/ListAdapters"))
    with server.channel(key=key) as channel:
        assert code_of(channel, path, request, response) == grpc.StatusCode.OK
        subprocess.run(
            [sys.executable, "-m", "loramerge.server", "keys", "--config",
             str(server.workdir / "config.yaml"), "revoke", key[3:19]],
            check=True, capture_output=True,
        )  # fmt: skip
        assert code_of(channel, path, request, response) == grpc.StatusCode.UNAUTHENTICATED
