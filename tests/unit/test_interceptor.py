"""The gRPC adapter of auth and limits, on a real in-process gRPC server with the real
interceptor and store; only the Inference servicer is a stand-in that reports token counts (the
real one is covered by the integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from loramerge.server.auth import Authenticator, new_key
from loramerge.server.config import LimitSettings, MetricsSettings
from loramerge.server.interceptors import ServiceInterceptor
from loramerge.server.limits import TenantLimiter
from loramerge.server.metrics import Metrics
from loramerge.server.store import SqliteStore
from loramerge.v1 import inference_pb2, inference_pb2_grpc

TOKENS = 5


class CountingInference(inference_pb2_grpc.InferenceServicer):  # type: ignore[misc]
    """Answers with `TOKENS` completion tokens, streamed one by one."""

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        return inference_pb2.GenerateResponse(text="x" * TOKENS, completion_tokens=TOKENS)

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        for produced in range(1, TOKENS + 1):
            yield inference_pb2.GenerateStreamResponse(text="x", completion_tokens=produced)


async def _serve(tmp_path: Path, limits: LimitSettings, body: object) -> None:
    store = SqliteStore(tmp_path / "store.db")
    acme, record = new_key("tenant", "acme")
    store.add_api_key(record)
    metrics = Metrics(MetricsSettings(), registry=CollectorRegistry())
    interceptor = ServiceInterceptor(metrics, Authenticator(store, True), TenantLimiter(limits))
    server = grpc.aio.server(interceptors=[interceptor])
    inference_pb2_grpc.add_InferenceServicer_to_server(CountingInference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        metadata = (("authorization", f"Bearer {acme}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(inference_pb2_grpc.InferenceStub(channel), metadata)  # type: ignore[operator]
    finally:
        await server.stop(0)
        store.close()


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    raise AssertionError("no RetryInfo in the status")


def test_over_the_request_rate_is_resource_exhausted_with_a_retry_delay(tmp_path: Path) -> None:
    async def body(stub: inference_pb2_grpc.InferenceStub, metadata: tuple) -> None:
        request = inference_pb2.GenerateRequest(prompt="hi", tenant_id="acme")
        for _ in range(2):
            await stub.Generate(request, metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(request, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'acme'" in (refused.value.details() or "")
        assert 0 < retry_delay(refused.value) <= 100

    asyncio.run(_serve(tmp_path, LimitSettings(requests_per_second=0.01, request_burst=2), body))


def test_generated_tokens_are_charged_unary_and_streamed(tmp_path: Path) -> None:
    async def body(stub: inference_pb2_grpc.InferenceStub, metadata: tuple) -> None:
        request = inference_pb2.GenerateRequest(prompt="hi", tenant_id="acme")
        await stub.Generate(request, metadata=metadata)  # 5 of 8 tokens
        chunks = [c async for c in stub.GenerateStream(request, metadata=metadata)]  # 10 of 8
        assert [c.completion_tokens for c in chunks] == [1, 2, 3, 4, 5]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(request, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "generated tokens" in (refused.value.details() or "")
        assert retry_delay(refused.value) == pytest.approx(2 / 0.01, rel=0.01)  # debt 2 tokens

    asyncio.run(_serve(tmp_path, LimitSettings(tokens_per_second=0.01, token_burst=8), body))


def test_the_limits_are_charged_to_the_keys_tenant_only_after_authorization(
    tmp_path: Path,
) -> None:
    async def body(stub: inference_pb2_grpc.InferenceStub, metadata: tuple) -> None:
        other = inference_pb2.GenerateRequest(prompt="hi", tenant_id="globex")
        for _ in range(3):  # refused before admission: spends nothing
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.Generate(other, metadata=metadata)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await stub.Generate(other)
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.Generate(
            inference_pb2.GenerateRequest(prompt="hi", tenant_id="acme"), metadata=metadata
        )

    asyncio.run(_serve(tmp_path, LimitSettings(requests_per_second=0.01, request_burst=1), body))
