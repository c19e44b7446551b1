"""The OpenAI-compatible HTTP endpoint: /v1/chat/completions, /v1/completions (JSON or SSE),
/v1/models, /health — in the server's process and event loop, on the same `Generator` as the
gRPC Inference service (so the same validation, adapter selection, leases, caps, metrics and
log lines). See docs/openai.md for why this is ours and not vLLM's OpenAI server.

The merged adapter version that served a request is in the `x-loramerge-adapter-id` response
header and in the body's `loramerge.adapter_id` ("" for the base model).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aiohttp import web
from pydantic import ValidationError

from . import auth
from . import http_schema as schema
from .accounting import record_request
from .config import HttpSettings
from .domain import validate_tenant_id
from .engine import EngineSlot
from .errors import ConfigError, EngineUnavailableError, NotFoundError
from .generation import Chunk, Generator
from .interceptors import status_for
from .limits import Admission, TenantLimiter
from .logs import annotate, begin_request
from .metrics import Metrics
from .store import Store
from .translate import preference_from_proto

logger = logging.getLogger("loramerge.http")

PROTOCOL = "http"
ADAPTER_HEADER = "x-loramerge-adapter-id"
ROUTES = {
    "/v1/chat/completions": "OpenAI.ChatCompletions",
    "/v1/completions": "OpenAI.Completions",
    "/v1/models": "OpenAI.Models",
    "/health": "Health.Http",
}
# gRPC code (from the server's one error table) → HTTP status and OpenAI error type.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
# aiohttp's own errors (unknown route, wrong method, body too large) → gRPC code for metrics.
HTTP_CODES = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
              413: grpc.StatusCode.INVALID_ARGUMENT}  # fmt: skip
TENANT_LIST_PAGE = 500
Body = TypeVar("Body", schema.ChatCompletionRequest, schema.CompletionRequest)


@dataclass(frozen=True)
class Failure:
    """An error as the HTTP client sees it, and its gRPC code for the metrics."""

    code: grpc.StatusCode
    status: int
    body: dict[str, Any]
    retry_after: float | None = None

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return web.json_response(self.body, status=self.status, headers=headers)


def failure(error: BaseException, fields: dict[str, Any]) -> Failure:
    """The OpenAI error JSON for an exception (server errors through the one error table)."""
    if isinstance(error, ValidationError):
        issue = error.errors()[0]
        param = ".".join(str(part) for part in issue["loc"]) or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in i['loc']) or 'body'}: {i['msg']}" for i in error.errors()
        )
        code, message = grpc.StatusCode.INVALID_ARGUMENT, message[:2000]
    else:
        code, message, param = status_for(error)
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    fields["error"] = message
    body = {"error": {"message": message, "type": kind, "param": param, "code": code.name.lower()}}
    return Failure(code, status, body, getattr(error, "retry_after", None))


class OpenAIEndpoint:
    """The aiohttp application's handlers."""

    def __init__(
        self,
        generator: Generator,
        store: Store,
        engine: EngineSlot,
        metrics: Metrics,
        authenticator: auth.Authenticator,
        limiter: TenantLimiter,
        *,
        model_id: str,
        max_body_bytes: int,
    ) -> None:
        self._generator = generator
        self._store = store
        self._engine = engine
        self._metrics = metrics
        self._auth = authenticator
        self._limiter = limiter
        self._model_id = model_id
        self._max_body_bytes = max_body_bytes
        self._started = int(time.time())

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._account])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _account(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Around every request: errors → OpenAI error JSON; metrics and the log line."""
        rpc = ROUTES.get(request.path, "OpenAI.Unknown")
        fields, start = begin_request(), time.perf_counter()
        annotate(http_method=request.method, path=request.path[:200])
        code = grpc.StatusCode.OK
        try:
            response = await handler(request)
            code = request.get("code", grpc.StatusCode.OK)
            return response
        except asyncio.CancelledError:  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except web.HTTPException as error:  # aiohttp's: unknown route, method, body size
            code = HTTP_CODES.get(error.status, grpc.StatusCode.UNKNOWN)
            fields["error"] = error.reason
            return web.json_response(
                {"error": {"message": error.reason, "type": "invalid_request_error",
                           "param": None, "code": code.name.lower()}},
                status=error.status,
            )  # fmt: skip
        except Exception as error:
            result = failure(error, fields)
            code = result.code
            return result.response()
        finally:
            record_request(
                self._metrics, PROTOCOL, rpc, code.name, time.perf_counter() - start, fields
            )

    def _check_model(self, body: schema.ChatCompletionRequest | schema.CompletionRequest) -> None:
        """`model` is the base model's id or tenant:<id> (the tenant must exist: selection
        raises NotFoundError otherwise)."""
        if body.is_tenant_model():
            validate_tenant_id(body.tenant_id(), "model")
        elif body.model != self._model_id:
            raise NotFoundError(
                f"the model {body.model!r} does not exist; use {self._model_id!r} or "
                f"'{schema.TENANT_PREFIX}<tenant_id>'",
                "model",
            )
        preference_from_proto(body.loramerge.preference, "loramerge.preference")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._parse(request, schema.ChatCompletionRequest)
        return await self._respond(request, body, schema.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._parse(request, schema.CompletionRequest)
        return await self._respond(request, body, schema.COMPLETION)

    async def _respond(
        self,
        request: web.Request,
        body: schema.ChatCompletionRequest | schema.CompletionRequest,
        shape: schema.Shape,
    ) -> web.StreamResponse:
        principal = await self._authenticate(request)
        tenant_id = body.tenant_id()
        auth.authorize_generate(principal, tenant_id, inline="loramerge" in body.model_fields_set)
        request_id, generation = shape.new_id(), body.generation()
        with self._admit(auth.subject(principal, tenant_id)) as admission:
            if body.stream:
                chunks = self._generator.stream(generation, PROTOCOL)
                return await self._stream(request, body, shape, request_id, chunks, admission)
            result = await self._generator.complete(generation, PROTOCOL)
            if admission is not None:
                admission.charge_tokens(result.completion_tokens)
        return web.json_response(
            shape.whole(request_id, body.model, result), headers={ADAPTER_HEADER: result.adapter_id}
        )

    async def _authenticate(self, request: web.Request) -> auth.Principal:
        """The caller behind `Authorization: Bearer <key>` (the same keys as gRPC)."""
        principal = await self._auth.authenticate(request.headers.get("Authorization"))
        annotate(key_id=principal.key_id)
        return principal

    @contextmanager
    def _admit(self, subject: str) -> Iterator[Admission | None]:
        """The tenant's rate and concurrency limits, as for gRPC (OverloadedError → 429)."""
        if not self._limiter.enabled:
            yield None
            return
        with self._limiter.admit(subject) as admission:
            yield admission

    async def _parse(self, request: web.Request, model: type[Body]) -> Body:
        body = model.model_validate_json(await request.read())
        annotate(model=body.model[:256], stream=body.stream)
        self._check_model(body)
        return body

    async def _stream(
        self,
        request: web.Request,
        body: schema.ChatCompletionRequest | schema.CompletionRequest,
        shape: schema.Shape,
        request_id: str,
        chunks: AsyncGenerator[Chunk, None],
        admission: Admission | None,
    ) -> web.StreamResponse:
        """Server-sent events. The first chunk is awaited before the response starts, so errors
        found before generation (validation, unknown tenant, overload) keep their HTTP status;
        later errors arrive as an `error` event. The lease is held until the stream ends."""
        try:
            first = await anext(chunks)
        except StopAsyncIteration:  # vLLM always sends a finished output
            raise EngineUnavailableError("the inference engine returned no output") from None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                     ADAPTER_HEADER: first.adapter_id}
        )  # fmt: skip
        await response.prepare(request)
        created = int(time.time())
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        try:
            last, is_first = first, True
            chunk: Chunk | None = first
            while chunk is not None:
                if admission is not None:  # counts are cumulative
                    admission.charge_tokens(chunk.completion_tokens - admission.charged)
                await _send(response, shape.chunk(request_id, body.model, created, chunk, is_first))
                last, is_first = chunk, False
                chunk = await anext(chunks, None)
            if include_usage:
                await _send(response, shape.usage_chunk(request_id, body.model, created, last))
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            request["code"] = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:
            fields: dict[str, Any] = {}
            result = failure(error, fields)
            annotate(**fields)
            request["code"] = result.code
            await _send(response, result.body)
        finally:
            await chunks.aclose()  # aborts the engine request and releases the lease
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        """The base model and one `tenant:<id>` per stored tenant (a tenant's key: its own)."""
        principal = await self._authenticate(request)
        cards = [schema.model_card(self._model_id, self._started)]
        if not principal.is_admin:
            own = principal.tenant_id
            if own:
                cards.append(schema.model_card(schema.TENANT_PREFIX + own, self._started))
            return web.json_response({"object": "list", "data": cards})
        after: str | None = None
        while True:
            page = await asyncio.to_thread(self._store.list_tenants, TENANT_LIST_PAGE, after)
            cards.extend(
                schema.model_card(schema.TENANT_PREFIX + record.tenant_id,
                                  int(record.updated_at.timestamp()))
                for record in page
            )  # fmt: skip
            if len(page) < TENANT_LIST_PAGE:
                break
            after = page[-1].tenant_id
        return web.json_response({"object": "list", "data": cards})

    async def health(self, request: web.Request) -> web.Response:
        """200 once the engine serves, 503 before (and after it stopped)."""
        ready = self._engine.ready
        return web.json_response(
            {"status": "serving" if ready else "not_serving"}, status=200 if ready else 503
        )


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")


class HttpServer:
    """The endpoint listening on host:port; `stop()` waits up to `grace` seconds for requests."""

    def __init__(self, runner: web.AppRunner, address: str) -> None:
        self._runner = runner
        self.address = address

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start_http(
    settings: HttpSettings, endpoint: OpenAIEndpoint, grace_seconds: float
) -> HttpServer:
    """Serve `endpoint` on settings.host:settings.port in the running event loop."""
    runner = web.AppRunner(
        endpoint.application(),
        access_log=None,  # one log line per request comes from the accounting middleware
        handler_cancellation=True,  # a client that goes away cancels its generation
        shutdown_timeout=grace_seconds,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {err.strerror}", "http.port"
        ) from None
    address = f"{settings.host}:{settings.port}"
    logger.info("HTTP (OpenAI-compatible) listening", extra={"address": address})
    return HttpServer(runner, address)
