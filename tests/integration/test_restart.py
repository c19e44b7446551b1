"""Tenants survive a restart of the server (SQLite store on disk)."""

from __future__ import annotations

import pytest

from harness import ServerProcess
from loramerge.v1 import inference_pb2, inference_pb2_grpc, tenants_pb2, tenants_pb2_grpc

pytestmark = pytest.mark.slow


def test_tenants_survive_a_restart(server: ServerProcess, task_names: list[str]) -> None:
    with server.channel() as channel:
        stored = (
            tenants_pb2_grpc.TenantsStub(channel)
            .SetTenant(
                tenants_pb2.SetTenantRequest(
                    tenant=tenants_pb2.Tenant(
                        tenant_id="t-durable", preference={task_names[2]: 1.0}
                    )
                )
            )
            .tenant
        )
    assert server.stop() == 0  # SIGTERM: graceful
    server.start()
    with server.channel() as channel:
        loaded = (
            tenants_pb2_grpc.TenantsStub(channel)
            .GetTenant(tenants_pb2.GetTenantRequest(tenant_id="t-durable"))
            .tenant
        )
        assert loaded == stored
        reply = inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(prompt="Hi", tenant_id="t-durable", max_tokens=1)
        )
        assert reply.adapter_id
