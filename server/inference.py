"""The Inference service: prompt or chat in, text out, on the base model or a merged adapter."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc

from loramerge.v1 import inference_pb2, inference_pb2_grpc

from . import translate
from .engine import EngineSlot
from .errors import EngineUnavailableError, InvalidRequestError, OverloadedError
from .logs import annotate
from .metrics import Metrics
from .residency import Residency
from .selection import Selector

DEFAULT_MAX_TOKENS = 64
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class Chunk:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str


class InferenceServicer(inference_pb2_grpc.InferenceServicer):  # type: ignore[misc]
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

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        parts, last = [], None
        async for chunk in self._run(request):
            parts.append(chunk.text)
            last = chunk
        assert last is not None
        return inference_pb2.GenerateResponse(
            text="".join(parts),
            finish_reason=translate.finish_reason(last.finish_reason),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            adapter_id=last.adapter_id,
        )

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        async for chunk in self._run(request):
            yield inference_pb2.GenerateStreamResponse(
                text=chunk.text,
                finish_reason=translate.finish_reason(chunk.finish_reason),
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                adapter_id=chunk.adapter_id,
            )

    async def _run(self, request: inference_pb2.GenerateRequest) -> AsyncIterator[Chunk]:
        """Validate, select the adapter, generate; yields text deltas as they come."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        arrived = time.perf_counter()
        sampling = self._sampling(request)
        engine = self._engine.engine  # UNAVAILABLE until the engine is up
        if self._in_flight >= self._slots:
            raise OverloadedError(f"{self._slots} generate requests in flight; retry later")
        self._in_flight += 1
        in_flight = self._metrics.requests_in_flight.labels(protocol="grpc")
        in_flight.inc()
        request_id = uuid.uuid4().hex
        annotate(tenant=request.tenant_id, request_id=request_id)
        self._metrics.count_tenant(request.tenant_id)
        try:
            prompt = self._prompt(request, engine, sampling.max_tokens)
            selection = await self._selector.select(
                request.tenant_id,
                translate.preference_from_proto(request.preference, "preference"),
                translate.merge_choice_from_proto(request.merge),
            )
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
                annotate(completion_tokens=produced)
        except EngineDeadError as err:
            raise EngineUnavailableError(f"the inference engine stopped: {err}") from None
        except VLLMValidationError as err:
            raise InvalidRequestError(
                getattr(err, "parameter", None) or "prompt", str(err)
            ) from None
        finally:
            self._in_flight -= 1
            in_flight.dec()

    def _prompt(
        self, request: inference_pb2.GenerateRequest, engine: Any, max_tokens: int
    ) -> dict[str, list[int]]:
        """Token ids of the prompt (raw text, or chat messages through the chat template)."""
        if bool(request.prompt) == bool(request.messages):
            raise InvalidRequestError("prompt", "give exactly one of prompt and messages")
        tokenizer = engine.get_tokenizer()
        field = "prompt"
        if request.prompt:
            ids = tokenizer.encode(request.prompt)
        else:
            field = "messages"
            messages = []
            for index, message in enumerate(request.messages):
                if message.role not in ROLES:
                    raise InvalidRequestError(
                        f"messages[{index}].role",
                        f"must be one of {', '.join(ROLES)}, got {message.role!r}",
                    )
                messages.append({"role": message.role, "content": message.content})
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) + max_tokens > self._max_model_len:
            raise InvalidRequestError(
                field,
                f"{len(ids)} prompt tokens + max_tokens {max_tokens} exceed the context length "
                f"{self._max_model_len}",
            )
        return {"prompt_token_ids": list(ids)}

    def _sampling(self, request: inference_pb2.GenerateRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        max_tokens = request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        if not 1 <= max_tokens < self._max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"must be in [1, {self._max_model_len}], got {max_tokens}"
            )
        temperature = request.temperature if request.HasField("temperature") else 0.0
        if not math.isfinite(temperature) or not 0 <= temperature <= 100:
            raise InvalidRequestError("temperature", f"must be in [0, 100], got {temperature}")
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {top_p}")
        if len(request.stop) > MAX_STOP_STRINGS or any(not s or len(s) > 256 for s in request.stop):
            raise InvalidRequestError(
                "stop", f"at most {MAX_STOP_STRINGS} non-empty strings of ≤ 256 characters"
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=request.top_k or 0,
            stop=list(request.stop) or None,
            seed=request.seed if request.HasField("seed") else None,
            output_kind=RequestOutputKind.DELTA,
        )
