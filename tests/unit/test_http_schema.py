"""The OpenAI request bodies: what is accepted, what is refused (naming the field), and how a
body becomes a transport-neutral GenerationRequest."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from loramerge.server.generation import Chunk, Message
from loramerge.server.http_schema import CHAT, COMPLETION, ChatCompletionRequest, CompletionRequest


def chat(**fields: object) -> ChatCompletionRequest:
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def test_chat_body_becomes_a_generation_request() -> None:
    body = chat(
        model="tenant:acme",
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b"}]}],
        max_completion_tokens=5, max_tokens=9, temperature=0.5, stop="\n", seed=3, top_k=-1,
        loramerge={"preference": {"add": 2}, "merge": {"method": "ties",
                                                       "parameters": {"density": 0.3}}},
    )  # fmt: skip
    request = body.generation()
    assert request.tenant_id == "acme"
    assert request.messages == (Message("system", "be brief"), Message("user", "ab"))
    assert request.max_tokens == 5  # max_completion_tokens wins
    assert (request.temperature, request.stop, request.seed, request.top_k) == (0.5, ("\n",), 3, 0)
    assert dict(request.preference) == {"add": 2.0}
    assert request.merge.method == "ties" and dict(request.merge.params) == {"density": 0.3}
    assert chat().generation().tenant_id == ""


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": []}, "tools"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        (
            {"loramerge": {"merge": {"parameters": {"densty": 0.3}}}},
            "loramerge.merge.parameters.densty",
        ),
        ({"max_tokens": 0}, "max_tokens"),
        ({"loramerge": {"merge": {"route": {"temperature": 11}}}}, "loramerge.merge.route"),
        ({"loramerge": {"merge": {"route": {"min_weight": -1}}}}, "loramerge.merge.route"),
        ({"loramerge": {"merge": {"route": {"enabled": True, "k": 2}}}}, "loramerge.merge.route"),
    ],
)
def test_unsupported_or_invalid_fields_are_refused_by_name(
    fields: dict[str, object], param: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        chat(**fields)
    locations = {".".join(str(p) for p in e["loc"]) for e in refused.value.errors()}
    assert any(location.startswith(param) for location in locations), locations


def test_route_options_reach_the_generation_request() -> None:
    route = {"enabled": True, "temperature": 0.1}
    request = chat(loramerge={"merge": {"route": route}}).generation()
    assert request.merge.route.enabled is True and request.merge.route.temperature == 0.1
    assert request.merge.route.min_weight is None
    assert chat().generation().merge.route.enabled is None


def test_completion_takes_one_non_empty_prompt_and_openais_default_length() -> None:
    body = CompletionRequest.model_validate({"model": "base", "prompt": ["only one"]})
    assert body.generation().prompt == "only one" and body.generation().max_tokens == 16
    for prompt in (["a", "b"], "", [""]):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "base", "prompt": prompt})


def test_response_shapes() -> None:
    done = Chunk("Paris.", "stop", 5, 2, "m1-abc")
    whole = CHAT.whole("id-1", "base", done)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert whole["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert whole["loramerge"] == {"adapter_id": "m1-abc"}
    assert COMPLETION.whole("id-2", "base", done)["choices"][0]["text"] == "Paris."
    first = CHAT.chunk("id-1", "base", 1, Chunk("Pa", None, 5, 1, ""), first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Pa"}
    assert first["object"] == "chat.completion.chunk"
    later = CHAT.chunk("id-1", "base", 1, done, first=False)
    assert later["choices"][0]["delta"] == {"content": "Paris."}
    assert CHAT.usage_chunk("id-1", "base", 1, done)["choices"] == []
