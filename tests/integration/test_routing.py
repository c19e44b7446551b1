"""Preference from the prompt on the real server: routed requests are served the merged version
of the adapter their prompt belongs to (the same version a one-hot preference gets, so close
prompts share it), over gRPC and the OpenAI endpoint, per request and per tenant."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from harness import ServerProcess, gauges
from loramerge.server.defaults.tasks import task_by_name
from loramerge.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    merge_pb2,
    merges_pb2,
    merges_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)

pytestmark = pytest.mark.slow

ROUTE = merge_pb2.MergeOptions(route=merge_pb2.RouteOptions(enabled=True))
ROUTED = "loramerge_route_decisions_total{outcome=routed}"


def chat(prompt: str, **fields: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        messages=[inference_pb2.ChatMessage(role="user", content=prompt)], **fields
    )


def one_hot_version(merges: merges_pb2_grpc.MergesStub, name: str) -> str:
    """The merged version a preference all on adapter `name` is served (default options)."""
    return str(merges.Merge(merges_pb2.MergeRequest(preference={name: 1.0})).adapter_id)


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.http_url, api_key=server.api_key, max_retries=0) as client:
        yield client


def test_a_routed_request_is_served_its_tasks_adapter(
    server: ServerProcess,
    inference: inference_pb2_grpc.InferenceStub,
    merges: merges_pb2_grpc.MergesStub,
    adapter_alone_answers: dict[str, list[tuple[str, str, str]]],
) -> None:
    """No tenant, no preference: the router picks `add` for an addition prompt; the answer is
    the add adapter's own, and a second addition prompt shares the version (no new merge)."""
    before = gauges(server).get(ROUTED, 0.0)
    expected = one_hot_version(merges, "add")
    prompt, alone, _ = adapter_alone_answers["add"][0]
    reply = inference.Generate(chat(prompt, merge=ROUTE, max_tokens=8))
    assert reply.adapter_id == expected
    assert reply.text.strip() == alone.strip()
    other = task_by_name("add").examples(seed=777, n=1)[0].prompt
    again = inference.Generate(chat(other, merge=ROUTE, max_tokens=1))
    assert again.adapter_id == expected
    assert gauges(server)[ROUTED] == before + 2


def test_a_tenant_stores_routing_and_its_preference_weights_it(
    inference: inference_pb2_grpc.InferenceStub,
    tenants: tenants_pb2_grpc.TenantsStub,
    merges: merges_pb2_grpc.MergesStub,
) -> None:
    """A tenant restricted to date and reverse is routed among them; Merge (no prompt) serves
    its stored preference; a request can turn routing off."""
    stored = tenants.SetTenant(
        tenants_pb2.SetTenantRequest(
            tenant=tenants_pb2.Tenant(
                tenant_id="t-routed",
                preference={"date": 1.0, "reverse": 1.0},
                merge=merge_pb2.MergeOptions(route=merge_pb2.RouteOptions(enabled=True)),
            )
        )
    ).tenant
    assert stored.merge.route.enabled and not stored.merge.route.HasField("temperature")
    prompt = task_by_name("date").examples(seed=777, n=1)[0].prompt
    routed = inference.Generate(chat(prompt, tenant_id="t-routed", max_tokens=1))
    assert routed.adapter_id == one_hot_version(merges, "date")
    static = merges.Merge(merges_pb2.MergeRequest(tenant_id="t-routed"))
    assert static.preference == pytest.approx({"date": 0.5, "reverse": 0.5, "add": 0, "caesar": 0})
    off = merge_pb2.MergeOptions(route=merge_pb2.RouteOptions(enabled=False))
    unrouted = inference.Generate(chat(prompt, tenant_id="t-routed", merge=off, max_tokens=1))
    assert unrouted.adapter_id == static.adapter_id


def test_the_openai_endpoint_routes_with_the_extension_field(
    sdk: openai.OpenAI, merges: merges_pb2_grpc.MergesStub, default_assets: object
) -> None:
    prompt = task_by_name("caesar").examples(seed=777, n=1)[0].prompt
    raw = sdk.chat.completions.with_raw_response.create(
        model=default_assets.model_dir.name,  # type: ignore[attr-defined]
        messages=[{"role": "user", "content": prompt}],
        max_tokens=1,
        extra_body={"loramerge": {"merge": {"route": {"enabled": True, "temperature": 0.05}}}},
    )
    assert raw.headers["x-loramerge-adapter-id"] == one_hot_version(merges, "caesar")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        sdk.chat.completions.create(
            model=default_assets.model_dir.name,  # type: ignore[attr-defined]
            messages=[{"role": "user", "content": prompt}],
            max_tokens=1,
            extra_body={"loramerge": {"merge": {"route": {"enabled": True, "temperature": 20}}}},
        )
