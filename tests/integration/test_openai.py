"""The OpenAI-compatible endpoint with the real `openai` SDK as the client, on the session's
real server: the same engine, tenants, merged versions and metrics as gRPC."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from harness import ServerProcess
from loramerge.v1 import inference_pb2, inference_pb2_grpc, tenants_pb2, tenants_pb2_grpc

pytestmark = pytest.mark.slow

ADAPTER_HEADER = "x-loramerge-adapter-id"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.http_url, api_key=server.api_key, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def base_model(sdk: openai.OpenAI, default_assets: object) -> str:
    return Path(default_assets.model_dir).name  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tenant(tenants: tenants_pb2_grpc.TenantsStub, task_names: list[str]) -> str:
    """A tenant whose preference is all on one task (the same merged version as below)."""
    tenants.SetTenant(
        tenants_pb2.SetTenantRequest(
            tenant=tenants_pb2.Tenant(tenant_id="openai-acme", preference={task_names[0]: 1.0})
        )
    )
    return "openai-acme"


def test_models_lists_the_base_model_and_tenants(
    sdk: openai.OpenAI, base_model: str, tenant: str
) -> None:
    ids = [model.id for model in sdk.models.list()]
    assert ids[0] == base_model
    assert f"tenant:{tenant}" in ids


def test_chat_completion_matches_grpc_on_the_base_model(
    sdk: openai.OpenAI, base_model: str, inference: inference_pb2_grpc.InferenceStub
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=base_model, messages=QUESTION, max_tokens=8, temperature=0
    )
    reply = raw.parse()
    grpc_reply = inference.Generate(
        inference_pb2.GenerateRequest(
            messages=[inference_pb2.ChatMessage(role="user", content=QUESTION[0]["content"])],
            max_tokens=8,
        )
    )
    assert reply.choices[0].message.content == grpc_reply.text
    assert "Paris" in grpc_reply.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == grpc_reply.prompt_tokens
    assert reply.usage.completion_tokens == grpc_reply.completion_tokens
    assert reply.usage.total_tokens == grpc_reply.prompt_tokens + grpc_reply.completion_tokens
    assert raw.headers[ADAPTER_HEADER] == ""
    assert reply.model == base_model


def test_completion_and_stop_strings(sdk: openai.OpenAI, base_model: str) -> None:
    reply = sdk.completions.create(model=base_model, prompt="The capital of France is",
                                   max_tokens=6, temperature=0)  # fmt: skip
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    stopped = sdk.completions.create(
        model=base_model, prompt="The capital of France is", max_tokens=12, stop=["."]
    )
    assert stopped.choices[0].finish_reason == "stop" and "." not in stopped.choices[0].text


def test_streaming_chat_sends_deltas_then_usage(sdk: openai.OpenAI, base_model: str) -> None:
    whole = sdk.chat.completions.create(model=base_model, messages=QUESTION, max_tokens=10)
    stream = sdk.chat.completions.create(
        model=base_model, messages=QUESTION, max_tokens=10, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(content) >= 3  # tokens arrive as they are produced
    assert "".join(content) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finished[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage == whole.usage


def test_streaming_completion(sdk: openai.OpenAI, base_model: str) -> None:
    chunks = list(sdk.completions.create(model=base_model, prompt="Once upon a time",
                                         max_tokens=6, stream=True))  # fmt: skip
    assert len(chunks) >= 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_tenant_model_is_served_by_the_tenants_merged_version(
    sdk: openai.OpenAI, tenant: str, inference: inference_pb2_grpc.InferenceStub
) -> None:
    """`tenant:<id>` answers with the tenant's merged adapter — the same version gRPC uses."""
    raw = sdk.chat.completions.with_raw_response.create(
        model=f"tenant:{tenant}", messages=[{"role": "user", "content": "2+2"}], max_tokens=2
    )
    reply = raw.parse()
    adapter_id = raw.headers[ADAPTER_HEADER]
    assert adapter_id.startswith("m")
    assert reply.model_extra is not None and reply.model_extra["loramerge"] == {
        "adapter_id": adapter_id
    }
    grpc_reply = inference.Generate(
        inference_pb2.GenerateRequest(tenant_id=tenant, prompt="2+2", max_tokens=1)
    )
    assert grpc_reply.adapter_id == adapter_id


def test_inline_preference_in_the_extra_body(
    sdk: openai.OpenAI, base_model: str, task_names: list[str], tenant: str
) -> None:
    """An inline preference equal to the tenant's selects the same (cached) merged version;
    streaming reports it in the header and on every chunk."""
    tenant_version = sdk.chat.completions.with_raw_response.create(
        model=f"tenant:{tenant}", messages=[{"role": "user", "content": "1+1"}], max_tokens=1
    ).headers[ADAPTER_HEADER]
    with sdk.completions.with_streaming_response.create(
        model=base_model, prompt="3+4=", max_tokens=2, stream=True,
        extra_body={"loramerge": {"preference": {task_names[0]: 5.0}}},
    ) as response:  # fmt: skip
        assert response.headers[ADAPTER_HEADER] == tenant_version
        chunks = list(response.parse())
    assert {c.model_extra["loramerge"]["adapter_id"] for c in chunks} == {tenant_version}  # type: ignore[index]


def test_unknown_model_and_tenant_are_404(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2)
    assert unknown.value.status_code == 404
    assert unknown.value.body["param"] == "model"  # type: ignore[index]
    assert "gpt-4o" in unknown.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="tenant:nobody-here", messages=QUESTION, max_tokens=2)


def test_bad_parameters_are_400_naming_the_field(
    sdk: openai.OpenAI, base_model: str, task_names: list[str]
) -> None:
    cases = [
        ({"temperature": 7.5}, "temperature"),
        ({"n": 2}, "n"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"extra_body": {"loramerge": {"preference": {"nope": 1.0}}}}, None),
        ({"extra_body": {"loramerge": {"preference": {task_names[0]: -1.0}}}}, None),
        ({"extra_body": {"logit_bias_typo": 1}}, "logit_bias_typo"),
    ]
    for arguments, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.chat.completions.create(
                model=base_model, messages=QUESTION, **{"max_tokens": 2, **arguments}
            )
        assert bad.value.status_code == 400
        if param is not None:
            assert bad.value.body["param"] == param, bad.value.body  # type: ignore[index]


def test_the_same_api_keys_as_grpc(server: ServerProcess, base_model: str) -> None:
    """Authentication is on in the session server: a malformed or unknown key is a 401."""
    for key in ("not-a-key", "lm_0123456789abcdef.wrong"):
        anonymous = openai.OpenAI(base_url=server.http_url, api_key=key, max_retries=0)
        with anonymous, pytest.raises(openai.AuthenticationError) as refused:
            anonymous.completions.create(model=base_model, prompt="Hi", max_tokens=1)
        assert refused.value.status_code == 401


def test_http_requests_are_counted_with_their_protocol(
    sdk: openai.OpenAI, base_model: str, server: ServerProcess
) -> None:
    def count() -> float:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        wanted = ('loramerge_requests_total{code="OK",protocol="http",'
                  'rpc="OpenAI.Completions"}')  # fmt: skip
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))

    before = count()
    sdk.completions.create(model=base_model, prompt="Hi", max_tokens=1)
    assert count() == before + 1
    health = urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/health", timeout=10)
    assert health.status == 200
