"""An HTTP request holds its merged version's lease for its whole life — an SSE stream until
its last event — and a client that goes away mid-stream aborts the engine request and gives
the lease back. Real aiohttp server and client, real residency with real merges and files;
a test double of vLLM's generate (the real engine is in tests/integration)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from serving import EngineDouble, make_residency, metrics, select

from loramerge.merge_engine import AdapterPool
from loramerge.server.auth import Authenticator
from loramerge.server.config import LimitSettings
from loramerge.server.engine import EngineSlot
from loramerge.server.generation import Generator
from loramerge.server.http_openai import ADAPTER_HEADER, OpenAIEndpoint
from loramerge.server.limits import TenantLimiter
from loramerge.server.residency import Residency
from loramerge.server.selection import Selection


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool


class Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return "".join(m["content"] for m in messages)


class GeneratingEngine(EngineDouble):
    """Also generates: one token per `release` of `step`, `tokens` in all; records requests
    that ended without finishing (vLLM aborts a request whose generator is closed)."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.errored = False
        self.tokens = tokens
        self.step = asyncio.Semaphore(0)
        self.aborted: list[str] = []
        self.lora_names: list[str] = []

    def get_tokenizer(self) -> Tokenizer:
        return Tokenizer()

    async def generate(
        self, prompt: object, sampling: object, request_id: str, lora_request: Any = None
    ) -> AsyncIterator[Output]:
        self.lora_names.append(lora_request[0] if lora_request else "")
        finished = False
        try:
            for index in range(self.tokens):
                await self.step.acquire()
                finished = index == self.tokens - 1
                yield Output([Completion(f"t{index} ", [index], "length" if finished else None)],
                             finished)  # fmt: skip
        finally:
            if not finished:
                self.aborted.append(request_id)


class FixedSelector:
    def __init__(self, selection: Selection) -> None:
        self.selection = selection

    async def select(
        self, tenant_id: str, preference: object, overrides: object, text: str | None = None
    ) -> Selection:
        return self.selection


def run(
    scenario: Callable[[GeneratingEngine, Residency, str], Coroutine[Any, Any, None]],
    pool: AdapterPool,
    tmp_path: Path,
) -> None:
    async def main() -> None:
        engine = GeneratingEngine(tokens=4)
        residency = make_residency(engine, tmp_path / "run")
        residency.start()
        slot = EngineSlot()
        slot.set(engine)
        generator = Generator(
            slot, FixedSelector(select(pool, 1, 1, 0)), residency, metrics(),  # type: ignore[arg-type]
            max_model_len=512, max_concurrent=4,
        )  # fmt: skip
        endpoint = OpenAIEndpoint(
            generator, None, slot, metrics(),  # type: ignore[arg-type]
            Authenticator(None, enabled=False),  # type: ignore[arg-type]
            TenantLimiter(LimitSettings()), model_id="base", max_body_bytes=1 << 16,
        )  # fmt: skip
        server = TestServer(endpoint.application())
        await server.start_server()
        try:
            await scenario(engine, residency, str(server.make_url("/v1/completions")))
        finally:
            await server.close()
            await residency.close()

    asyncio.run(main())


BODY = {"model": "base", "prompt": "hello", "max_tokens": 4, "stream": True,
        "loramerge": {"preference": {"a": 1}}}  # fmt: skip


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for line in response.content:
        if line.startswith(b"data: {"):
            yield json.loads(line[len(b"data: ") :])


def test_sse_stream_holds_the_lease_until_its_last_event(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario(engine: GeneratingEngine, residency: Residency, url: str) -> None:
        engine.step.release()  # the first token: the response starts with it
        async with aiohttp.ClientSession() as session, session.post(url, json=BODY) as response:
            stream = events(response)
            first = await anext(stream)
            (version,) = residency.versions()
            assert response.headers[ADAPTER_HEADER] == version.adapter_id
            assert first["loramerge"]["adapter_id"] == version.adapter_id
            for _ in range(3):
                assert version.leases == 1  # mid-stream: leased, so never evicted
                engine.step.release()
                await anext(stream)
            rest = [event async for event in stream]
        assert rest == []
        assert version.leases == 0 and engine.aborted == []
        assert engine.lora_names == [version.adapter_id]

    run(scenario, pool3, tmp_path)


def test_client_gone_mid_stream_aborts_and_releases(pool3: AdapterPool, tmp_path: Path) -> None:
    async def scenario(engine: GeneratingEngine, residency: Residency, url: str) -> None:
        engine.step.release()
        async with aiohttp.ClientSession() as session:
            response = await session.post(url, json=BODY)
            await anext(events(response))
            (version,) = residency.versions()
            assert version.leases == 1
            response.close()  # the client goes away after the first token
        for _ in range(100):
            if version.leases == 0 and engine.aborted:
                break
            await asyncio.sleep(0.02)
        assert version.leases == 0
        assert len(engine.aborted) == 1  # the engine request was aborted, not left running

    run(scenario, pool3, tmp_path)


def test_non_streaming_request_holds_the_lease_until_it_answers(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    async def scenario(engine: GeneratingEngine, residency: Residency, url: str) -> None:
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(session.post(url, json={**BODY, "stream": False}))
            engine.step.release()
            while not residency.versions() or engine.step._value:  # first token consumed
                await asyncio.sleep(0.01)
            (version,) = residency.versions()
            assert version.leases == 1
            for _ in range(3):
                engine.step.release()
            response = await request
            body = await response.json()
        assert body["choices"][0]["text"] == "t0 t1 t2 t3 "
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        assert version.leases == 0

    run(scenario, pool3, tmp_path)
