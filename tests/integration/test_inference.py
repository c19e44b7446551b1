"""Generation over a real gRPC channel on the real vLLM engine, base and merged."""

from __future__ import annotations

import grpc
import pytest

from harness import ServerProcess, eventually, gauges
from loramerge.server.defaults.tasks import task_by_name
from loramerge.v1 import inference_pb2, inference_pb2_grpc, tenants_pb2, tenants_pb2_grpc

pytestmark = pytest.mark.slow


def chat(text: str, **fields: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        messages=[inference_pb2.ChatMessage(role="user", content=text)], **fields
    )


def test_base_model_without_tenant_or_preference(
    inference: inference_pb2_grpc.InferenceStub,
) -> None:
    reply = inference.Generate(
        inference_pb2.GenerateRequest(prompt="The capital of France is", max_tokens=6)
    )
    assert "Paris" in reply.text
    assert reply.adapter_id == ""
    assert reply.prompt_tokens == 5 and reply.completion_tokens == 6
    assert reply.finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_chat_messages_use_the_chat_template(inference: inference_pb2_grpc.InferenceStub) -> None:
    raw = inference.Generate(inference_pb2.GenerateRequest(prompt="What is 2+2?", max_tokens=4))
    templated = inference.Generate(chat("What is 2+2?", max_tokens=4))
    assert templated.prompt_tokens > raw.prompt_tokens + 10  # system prompt and role markers


def test_sampling_seed_reproduces_and_stop_strings_stop(
    inference: inference_pb2_grpc.InferenceStub,
) -> None:
    request = inference_pb2.GenerateRequest(
        prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=7
    )
    assert inference.Generate(request).text == inference.Generate(request).text
    stopped = inference.Generate(
        inference_pb2.GenerateRequest(prompt="The capital of France is", max_tokens=12, stop=["."])
    )
    assert stopped.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert "." not in stopped.text


def test_streaming_delivers_chunks_as_they_are_produced(
    inference: inference_pb2_grpc.InferenceStub,
) -> None:
    chunks = list(
        inference.GenerateStream(
            inference_pb2.GenerateRequest(prompt="Once upon a time", max_tokens=10)
        )
    )
    assert len(chunks) >= 5
    assert all(c.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].completion_tokens == 10
    streamed = "".join(c.text for c in chunks)
    whole = inference.Generate(
        inference_pb2.GenerateRequest(prompt="Once upon a time", max_tokens=10)
    )
    assert streamed == whole.text


def test_one_hot_tenant_answers_its_task_like_the_adapter_alone(
    server: ServerProcess,
    inference: inference_pb2_grpc.InferenceStub,
    tenants: tenants_pb2_grpc.TenantsStub,
    adapter_alone_answers: dict[str, list[tuple[str, str, str]]],
) -> None:
    """The tenant's merged adapter (all weight on one task) gives the same greedy answers as
    that task's adapter alone (computed with transformers + peft), and they are right: the
    merged version is served, not the base model. It was merged ahead when the tenant was
    stored, and its first request takes it from disk with no merge and no add_lora: vLLM
    loads it in that request's step."""
    name = "add"
    tenants.SetTenant(
        tenants_pb2.SetTenantRequest(
            tenant=tenants_pb2.Tenant(tenant_id="t-add", preference={name: 1})
        )
    )
    eventually(lambda: gauges(server)["loramerge_merge_ahead_backlog"] == 0, timeout=120)
    misses = gauges(server)["loramerge_merged_adapter_cache_misses_total"]
    task = task_by_name(name)
    same, correct = 0, 0
    for prompt, expected_text, answer in adapter_alone_answers[name]:
        reply = inference.Generate(chat(prompt, tenant_id="t-add", max_tokens=8))
        assert reply.adapter_id
        same += reply.text.strip() == expected_text.strip()
        correct += task.is_correct(reply.text, answer)
    count = len(adapter_alone_answers[name])
    assert same >= count - 1, "served answers differ from the adapter alone"
    assert correct >= count - 1
    assert gauges(server)["loramerge_merged_adapter_cache_misses_total"] == misses  # no merge


def test_preference_change_changes_the_served_version(
    inference: inference_pb2_grpc.InferenceStub,
    tenants: tenants_pb2_grpc.TenantsStub,
    task_names: list[str],
) -> None:
    first, second = task_names[0], task_names[1]

    def served(preference: dict[str, float]) -> str:
        tenants.SetTenant(
            tenants_pb2.SetTenantRequest(
                tenant=tenants_pb2.Tenant(tenant_id="t-change", preference=preference)
            )
        )
        return inference.Generate(chat("Hi", tenant_id="t-change", max_tokens=1)).adapter_id

    one = served({first: 1, second: 1})
    assert served({first: 1, second: 1}) == one  # same preference, same version
    assert served({first: 3, second: 1}) != one
    inline = inference.Generate(
        chat("Hi", tenant_id="t-change", preference={second: 1}, max_tokens=1)
    )
    assert inline.adapter_id not in ("", one)  # the inline preference overrides the stored one


def test_tenant_without_preference_gets_the_base_model(
    inference: inference_pb2_grpc.InferenceStub, tenants: tenants_pb2_grpc.TenantsStub
) -> None:
    tenants.SetTenant(tenants_pb2.SetTenantRequest(tenant=tenants_pb2.Tenant(tenant_id="t-empty")))
    reply = inference.Generate(chat("Hi", tenant_id="t-empty", max_tokens=1))
    assert reply.adapter_id == ""


def test_prompt_longer_than_the_context_is_invalid(
    inference: inference_pb2_grpc.InferenceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        inference.Generate(inference_pb2.GenerateRequest(prompt="word " * 5000, max_tokens=4))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context length" in info.value.details()
