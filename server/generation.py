"""Text generation, independent of the transport: validate → select the adapter → lease its
merged version → generate → text deltas. The gRPC Inference service and the OpenAI-compatible
HTTP endpoint both call `Generator.stream`, so both get the same validation, adapter selection,
lease (the version is never evicted while the request runs, streaming included), concurrency cap,
metrics and log fields."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .domain import MergeChoice
from .engine import EngineSlot
from .errors import EngineUnavailableError, InvalidRequestError, OverloadedError
from .logs import annotate
from .metrics import Metrics
from .residency import Residency
from .selection import Selector

DEFAULT_MAX_TOKENS = 64
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 256
BYTES_PER_TOKEN = 16  # a prompt longer than this many bytes per context token cannot fit
MAX_TOP_K = 1 << 20
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Message:
    """One chat turn; `role` is one of ROLES."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """What any transport asks for. Exactly one of `prompt` and `messages` is set; unset
    sampling fields (None) take the defaults (64 tokens, greedy, top_p 1)."""

    prompt: str = ""
    messages: tuple[Message, ...] = ()
    tenant_id: str = ""
    preference: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    merge: MergeChoice = field(default_factory=MergeChoice)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Chunk:
    """Text produced since the previous chunk; `finish_reason` ("stop", "length", "abort") is
    set on the last one. Token counts are totals so far."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str


def routing_text(request: GenerationRequest) -> str:
    """What the router reads: the raw prompt, or the last user turn of a chat (the last turn
    when no turn is the user's)."""
    if request.prompt or not request.messages:
        return request.prompt
    users = [m.content for m in request.messages if m.role == "user"]
    return users[-1] if users else request.messages[-1].content


class Generator:
    """Runs generation requests on the engine, at most `max_concurrent` at once (all
    transports together)."""

    def __init__(
        self,
        engine: EngineSlot,
        selector: Selector,
        residency: Residency,
        metrics: Metrics,
        *,
        max_model_len: int,
        max_concurrent: int,
    ) -> None:
        self._engine = engine
        self._selector = selector
        self._residency = residency
        self._metrics = metrics
        self._max_model_len = max_model_len
        self._slots = max_concurrent
        self._in_flight = 0

    async def stream(
        self, request: GenerationRequest, protocol: str
    ) -> AsyncGenerator[Chunk, None]:
        """Validate, select the adapter, generate; yields text deltas as they come. Closing or
        cancelling the iterator aborts the engine request and releases the lease. `protocol`
        ("grpc", "http") labels the in-flight gauge."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        arrived = time.perf_counter()
        sampling = self._sampling(request)
        engine = self._engine.engine  # UNAVAILABLE until the engine is up
        if self._in_flight >= self._slots:
            raise OverloadedError(f"{self._slots} generate requests in flight; retry later")
        self._in_flight += 1
        in_flight = self._metrics.requests_in_flight.labels(protocol=protocol)
        in_flight.inc()
        request_id = uuid.uuid4().hex
        annotate(tenant=request.tenant_id, request_id=request_id)
        self._metrics.count_tenant(request.tenant_id)
        try:
            self._check_prompt_size(request)
            selection = await self._selector.select(
                request.tenant_id, request.preference, request.merge, routing_text(request)
            )
            # Tokenising (and the chat template) is CPU work: off the event loop, once the
            # request is known to be valid otherwise.
            prompt = await asyncio.to_thread(self._prompt, request, engine, sampling.max_tokens)
            async with AsyncExitStack() as stack:
                adapter_id, lora = "", None
                if selection is not None:
                    lease = await stack.enter_async_context(self._residency.lease(selection))
                    adapter_id, lora = lease.version.adapter_id, lease.version.lora_request
                    annotate(adapter_id=adapter_id, merge_cached=lease.cached)
                produced = 0
                # Cancelling this generator (client gone) makes vLLM abort the request.
                async for output in engine.generate(
                    prompt, sampling, request_id, lora_request=lora
                ):
                    completion = output.outputs[0]
                    if produced == 0 and completion.token_ids:
                        ttft = time.perf_counter() - arrived
                        self._metrics.time_to_first_token.observe(ttft)
                        annotate(ttft_seconds=round(ttft, 4))
                    produced += len(completion.token_ids)
                    self._metrics.generated_tokens.inc(len(completion.token_ids))
                    yield Chunk(
                        completion.text,
                        completion.finish_reason if output.finished else None,
                        len(prompt["prompt_token_ids"]),
                        produced,
                        adapter_id,
                    )
                annotate(prompt_tokens=len(prompt["prompt_token_ids"]), completion_tokens=produced)
        except EngineDeadError as err:
            raise EngineUnavailableError(f"the inference engine stopped: {err}") from None
        except VLLMValidationError as err:
            raise InvalidRequestError(
                getattr(err, "parameter", None) or "prompt", str(err)
            ) from None
        finally:
            self._in_flight -= 1
            in_flight.dec()

    async def complete(self, request: GenerationRequest, protocol: str) -> Chunk:
        """The whole completion as one chunk (text joined, last chunk's counts and reason)."""
        parts, last = [], None
        async for chunk in self.stream(request, protocol):
            parts.append(chunk.text)
            last = chunk
        assert last is not None  # vLLM always ends with a finished output
        return Chunk(
            "".join(parts),
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            last.adapter_id,
        )

    def _check_prompt_size(self, request: GenerationRequest) -> None:
        """Bounds checked before any tokenising: exactly one of prompt and messages, at most
        `MAX_MESSAGES` messages, and no more UTF-8 bytes than the context could hold."""
        if bool(request.prompt) == bool(request.messages):
            raise InvalidRequestError("prompt", "give exactly one of prompt and messages")
        if len(request.messages) > MAX_MESSAGES:
            raise InvalidRequestError(
                "messages", f"at most {MAX_MESSAGES} messages, got {len(request.messages)}"
            )
        limit = BYTES_PER_TOKEN * self._max_model_len
        field = "prompt" if request.prompt else "messages"
        size = len(request.prompt.encode()) + sum(
            len(m.content.encode()) + len(m.role) for m in request.messages
        )
        if size > limit:
            raise InvalidRequestError(
                field, f"{size} bytes cannot fit the context length {self._max_model_len} "
                f"(at most {limit} bytes are read)",
            )  # fmt: skip

    def _prompt(
        self, request: GenerationRequest, engine: Any, max_tokens: int
    ) -> dict[str, list[int]]:
        """Token ids of the prompt (raw text, or chat messages through the chat template)."""
        tokenizer = engine.get_tokenizer()
        field = "prompt"
        if request.prompt:
            ids = tokenizer.encode(request.prompt)
        else:
            field = "messages"
            for index, message in enumerate(request.messages):
                if message.role not in ROLES:
                    raise InvalidRequestError(
                        f"messages[{index}].role",
                        f"must be one of {', '.join(ROLES)}, got {message.role!r}",
                    )
            text = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) + max_tokens > self._max_model_len:
            raise InvalidRequestError(
                field,
                f"{len(ids)} prompt tokens + max_tokens {max_tokens} exceed the context length "
                f"{self._max_model_len}",
            )
        return {"prompt_token_ids": list(ids)}

    def _sampling(self, request: GenerationRequest) -> Any:
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        if not 1 <= max_tokens < self._max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"must be in [1, {self._max_model_len}], got {max_tokens}"
            )
        # The bounds are vLLM's own (SamplingParams._verify_args), checked before calling it.
        temperature = 0.0 if request.temperature is None else request.temperature
        if not math.isfinite(temperature) or not 0 <= temperature <= 2:
            raise InvalidRequestError("temperature", f"must be in [0, 2], got {temperature}")
        top_p = 1.0 if request.top_p is None else request.top_p
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {top_p}")
        if not 0 <= request.top_k <= MAX_TOP_K:
            raise InvalidRequestError("top_k", f"must be in [0, {MAX_TOP_K}], got {request.top_k}")
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequestError("seed", f"must be in [0, 2^63 - 1], got {request.seed}")
        if len(request.stop) > MAX_STOP_STRINGS or any(
            not s or len(s) > MAX_STOP_LENGTH for s in request.stop
        ):
            raise InvalidRequestError(
                "stop",
                f"at most {MAX_STOP_STRINGS} non-empty strings of ≤ {MAX_STOP_LENGTH} characters",
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=request.top_k,
                stop=list(request.stop) or None,
                seed=request.seed,
                output_kind=RequestOutputKind.DELTA,
            )
        except VLLMValidationError as err:  # a bound vLLM has and the checks above missed
            raise InvalidRequestError(err.parameter or "request", str(err)) from None
