"""The Inference service: prompt or chat in, text out, on the base model or a merged adapter.
A thin gRPC adapter over `generation.Generator` (shared with the HTTP endpoint)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from loramerge.v1 import inference_pb2, inference_pb2_grpc

from . import translate
from .generation import GenerationRequest, Generator, Message

PROTOCOL = "grpc"


class InferenceServicer(inference_pb2_grpc.InferenceServicer):  # type: ignore[misc]
    def __init__(self, generator: Generator) -> None:
        self._generator = generator

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        result = await self._generator.complete(_generation_request(request), PROTOCOL)
        return inference_pb2.GenerateResponse(
            text=result.text,
            finish_reason=translate.finish_reason(result.finish_reason),
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            adapter_id=result.adapter_id,
        )

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        async for chunk in self._generator.stream(_generation_request(request), PROTOCOL):
            yield inference_pb2.GenerateStreamResponse(
                text=chunk.text,
                finish_reason=translate.finish_reason(chunk.finish_reason),
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                adapter_id=chunk.adapter_id,
            )


def _generation_request(request: inference_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        prompt=request.prompt,
        messages=tuple(Message(m.role, m.content) for m in request.messages),
        tenant_id=request.tenant_id,
        preference=translate.preference_from_proto(request.preference, "preference"),
        merge=translate.merge_choice_from_proto(request.merge),
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        top_k=request.top_k,
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
    )
