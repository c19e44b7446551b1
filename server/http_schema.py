"""The OpenAI-compatible request bodies we accept, and the response bodies we send.

Requests are validated strictly: a field we do not implement (tools, logprobs, n > 1, penalties,
...) is a 400 naming it, never silently ignored. The extension field `loramerge` carries an
inline preference and merge options; `model` is the base model's id or `tenant:<tenant_id>`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .domain import MergeChoice, RouteChoice
from .generation import Chunk, GenerationRequest, Message

TENANT_PREFIX = "tenant:"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeParameters(_Strict):
    """The methods' parameters, as in loramerge.v1.MergeParameters."""

    scaling: float | None = None
    density: float | None = None
    drop_rate: float | None = None
    majority_sign: Literal["total", "frequency"] | None = None
    seed: int | None = Field(None, ge=0)
    inner: str | None = None
    branch_rank: int | None = Field(None, ge=1)
    mix: float | None = None


class RouteOptions(_Strict):
    """As loramerge.v1.RouteOptions: preference from the prompt (docs/router.md)."""

    enabled: bool | None = None
    temperature: float | None = Field(None, ge=0, le=10, allow_inf_nan=False)
    min_weight: float | None = Field(None, ge=0, le=0.5, allow_inf_nan=False)


class MergeOptions(_Strict):
    """As loramerge.v1.MergeOptions; unset fields take the tenant's, then the server's."""

    method: str | None = None
    pico: bool | None = None
    parameters: MergeParameters = MergeParameters()
    svc: bool | None = None
    rank: int | None = Field(None, ge=1)
    energy_compensation: bool | None = None
    route: RouteOptions = RouteOptions()

    def choice(self) -> MergeChoice:
        params = self.parameters.model_dump(exclude_none=True)
        return MergeChoice(
            method=self.method,
            pico=self.pico,
            params=MappingProxyType(params),
            svc=self.svc,
            rank=self.rank,
            energy_compensation=self.energy_compensation,
            route=RouteChoice(**self.route.model_dump(exclude_none=True)),
        )


class Extension(_Strict):
    """The body's `loramerge` field."""

    preference: dict[str, float] = Field(default_factory=dict)
    merge: MergeOptions = MergeOptions()


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields both endpoints share. `n`, `presence_penalty`, `frequency_penalty` and `logprobs`
    are accepted only at their no-op values (clients send them by default)."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 and 0 disable it
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    user: str | None = Field(None, max_length=256)
    loramerge: Extension = Extension()

    def tenant_id(self) -> str:
        return self.model.removeprefix(TENANT_PREFIX) if self.is_tenant_model() else ""

    def is_tenant_model(self) -> bool:
        return self.model.startswith(TENANT_PREFIX)

    def _generation(self, **text: Any) -> GenerationRequest:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return GenerationRequest(
            tenant_id=self.tenant_id(),
            preference=MappingProxyType(dict(self.loramerge.preference)),
            merge=self.loramerge.merge.choice(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k or 0, 0),
            stop=tuple(stop),
            seed=self.seed,
            **text,
        )


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None

    def generation(self) -> GenerationRequest:
        messages = tuple(
            Message("system" if m.role == "developer" else m.role, m.text()) for m in self.messages
        )
        return self._generation(
            messages=messages, max_tokens=self.max_completion_tokens or self.max_tokens
        )


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        if not (prompt if isinstance(prompt, str) else prompt[0]):
            raise ValueError("the prompt must not be empty")
        return prompt

    def generation(self) -> GenerationRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return self._generation(prompt=prompt, max_tokens=self.max_tokens or COMPLETION_MAX_TOKENS)


ChatMessage.model_rebuild()


# --- responses ------------------------------------------------------------------------------


def usage(chunk: Chunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


def extension(chunk: Chunk) -> dict[str, str]:
    """Our response field: the merged adapter version that served ("" for the base model)."""
    return {"adapter_id": chunk.adapter_id}


@dataclass(frozen=True)
class Shape:
    """How one endpoint's responses look: chat puts the text in `message` / `delta`,
    completions in `text`."""

    id_prefix: str
    whole_object: str
    chunk_object: str
    chat: bool

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    def whole(self, request_id: str, model: str, result: Chunk) -> dict[str, Any]:
        """The non-streaming response."""
        text: dict[str, Any] = (
            {"message": {"role": "assistant", "content": result.text}}
            if self.chat
            else {"text": result.text}
        )
        choice = {"index": 0, **text, "finish_reason": result.finish_reason, "logprobs": None}
        return {
            "id": request_id,
            "object": self.whole_object,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage(result),
            "loramerge": extension(result),
        }

    def chunk(
        self, request_id: str, model: str, created: int, chunk: Chunk, first: bool
    ) -> dict[str, Any]:
        """One streamed event; the first chat delta also names the role."""
        text: dict[str, Any] = {"text": chunk.text}
        if self.chat:
            delta = (
                {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
            )
            text = {"delta": delta}
        choice = {"index": 0, **text, "finish_reason": chunk.finish_reason, "logprobs": None}
        return {**self._event(request_id, model, created), "choices": [choice],
                "loramerge": extension(chunk)}  # fmt: skip

    def usage_chunk(self, request_id: str, model: str, created: int, last: Chunk) -> dict[str, Any]:
        """The last event with `stream_options.include_usage`: no choices, the usage."""
        return {**self._event(request_id, model, created), "choices": [], "usage": usage(last),
                "loramerge": extension(last)}  # fmt: skip

    def _event(self, request_id: str, model: str, created: int) -> dict[str, Any]:
        return {"id": request_id, "object": self.chunk_object, "created": created, "model": model}


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = Shape("cmpl", "text_completion", "text_completion", chat=False)


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loramerge"}
