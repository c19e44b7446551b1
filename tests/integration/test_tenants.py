"""Tenants over a real gRPC channel: stored, versioned, paginated, validated."""

from __future__ import annotations

import grpc
import pytest

from harness import ServerProcess, eventually, gauges
from loramerge.v1 import merge_pb2, merges_pb2, merges_pb2_grpc, tenants_pb2, tenants_pb2_grpc

pytestmark = pytest.mark.slow


def tenant(tenant_id: str, **preference: float) -> tenants_pb2.Tenant:
    return tenants_pb2.Tenant(tenant_id=tenant_id, preference=preference)


def test_set_get_versions_and_history(
    tenants: tenants_pb2_grpc.TenantsStub, task_names: list[str]
) -> None:
    first, second = task_names[0], task_names[1]
    created = tenants.SetTenant(
        tenants_pb2.SetTenantRequest(tenant=tenant("t-history", **{first: 1}))
    )
    assert created.tenant.version == 1
    options = merge_pb2.MergeOptions(method="ties", pico=False)
    options.parameters.density = 0.3
    updated = tenants.SetTenant(
        tenants_pb2.SetTenantRequest(
            tenant=tenants_pb2.Tenant(
                tenant_id="t-history", preference={second: 2.0}, merge=options
            ),
            expected_version=1,
        )
    )
    assert updated.tenant.version == 2
    latest = tenants.GetTenant(tenants_pb2.GetTenantRequest(tenant_id="t-history")).tenant
    assert dict(latest.preference) == {second: 2.0}
    assert latest.merge.method == "ties" and latest.merge.pico is False
    assert latest.merge.parameters.density == pytest.approx(0.3)
    assert latest.update_time.seconds > 0
    old = tenants.GetTenant(tenants_pb2.GetTenantRequest(tenant_id="t-history", version=1)).tenant
    assert dict(old.preference) == {first: 1.0} and not old.merge.method


def test_expected_version_conflict(
    tenants: tenants_pb2_grpc.TenantsStub, task_names: list[str]
) -> None:
    tenants.SetTenant(
        tenants_pb2.SetTenantRequest(tenant=tenant("t-conflict", **{task_names[0]: 1}))
    )
    with pytest.raises(grpc.RpcError) as info:
        tenants.SetTenant(
            tenants_pb2.SetTenantRequest(
                tenant=tenant("t-conflict", **{task_names[0]: 2}), expected_version=0
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected_version" in info.value.details()


def test_list_is_paginated_and_delete_removes(
    tenants: tenants_pb2_grpc.TenantsStub, task_names: list[str]
) -> None:
    for index in range(5):
        tenants.SetTenant(
            tenants_pb2.SetTenantRequest(tenant=tenant(f"t-page-{index}", **{task_names[0]: 1}))
        )
    seen, token = [], ""
    while True:
        page = tenants.ListTenants(tenants_pb2.ListTenantsRequest(page_size=2, page_token=token))
        seen += [t.tenant_id for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert [t for t in seen if t.startswith("t-page-")] == [f"t-page-{i}" for i in range(5)]
    assert seen == sorted(seen)
    tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(tenant_id="t-page-0"))
    with pytest.raises(grpc.RpcError) as info:
        tenants.GetTenant(tenants_pb2.GetTenantRequest(tenant_id="t-page-0"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_tenant", "field"),
    [
        (tenants_pb2.Tenant(tenant_id="bad id!", preference={"x": 1}), "tenant.tenant_id"),
        (
            tenants_pb2.Tenant(tenant_id="t-bad", preference={"no-such-adapter": 1}),
            "preference['no-such-adapter']",
        ),
        (
            tenants_pb2.Tenant(tenant_id="t-bad", merge=merge_pb2.MergeOptions(method="magic")),
            "method",
        ),
    ],
)
def test_invalid_tenants_are_rejected_naming_the_field(
    tenants: tenants_pb2_grpc.TenantsStub, request_tenant: tenants_pb2.Tenant, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        tenants.SetTenant(tenants_pb2.SetTenantRequest(tenant=request_tenant))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_a_stored_tenant_is_merged_ahead_of_its_first_request(
    server: ServerProcess,
    tenants: tenants_pb2_grpc.TenantsStub,
    merges: merges_pb2_grpc.MergesStub,
    task_names: list[str],
) -> None:
    def merged_ahead() -> float:
        return gauges(server).get("loramerge_merged_ahead_total", 0.0)

    before = merged_ahead()
    tenants.SetTenant(
        tenants_pb2.SetTenantRequest(
            tenant=tenant("t-ahead", **{task_names[0]: 3, task_names[2]: 1})
        )
    )
    # the backlog (earlier tenants' merges ahead, then this one) runs one merge at a time
    eventually(lambda: gauges(server)["loramerge_merge_ahead_backlog"] == 0, timeout=120)
    assert merged_ahead() > before
    first = merges.Merge(merges_pb2.MergeRequest(tenant_id="t-ahead"))
    assert first.cached  # merged when stored: the first request only loaded it
    assert first.method == "regmean" and first.rank == 32  # two rank-16 adapters, exact
