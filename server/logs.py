"""Structured logging: one JSON object per line (or plain text), with per-request fields.

Servicers add fields to the current request's log line with `annotate(...)`; the interceptor
writes that line once the RPC ends (tenant, adapter version, timings, status)."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

# Attributes every record has (and one vLLM adds to every record): not request fields.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "vllm_process_name",
}
_request_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "loramerge_request_fields", default=None
)


def begin_request() -> dict[str, Any]:
    """Start collecting fields for the current RPC's log line."""
    fields: dict[str, Any] = {}
    _request_fields.set(fields)
    return fields


def annotate(**fields: Any) -> None:
    """Add fields to the current RPC's log line (no-op outside an RPC)."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str, fmt: str) -> None:
    """Send loramerge's logs to stderr as JSON lines (fmt="json") or text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("loramerge")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
