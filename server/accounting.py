"""The end of every request, whatever its transport: count it, time it, write its log line."""

from __future__ import annotations

import logging
from typing import Any

from .metrics import Metrics

logger = logging.getLogger("loramerge.request")


def record_request(
    metrics: Metrics, protocol: str, rpc: str, code: str, seconds: float, fields: dict[str, Any]
) -> None:
    """`protocol`: "grpc" or "http"; `rpc`: e.g. "Inference.Generate" or
    "OpenAI.ChatCompletions"; `code`: the gRPC status code name (the HTTP status maps from it)."""
    metrics.requests.labels(protocol=protocol, rpc=rpc, code=code).inc()
    metrics.request_duration.labels(protocol=protocol, rpc=rpc).observe(seconds)
    if not rpc.startswith("Health."):
        logger.info(
            "rpc",
            extra={"protocol": protocol, "rpc": rpc, "code": code, "seconds": round(seconds, 4),
                   **fields},
        )  # fmt: skip
