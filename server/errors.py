"""The server's error hierarchy. `server/interceptors.py` maps these (and the merge engine's
errors) to gRPC status codes in one table; nothing else chooses a status code."""

from __future__ import annotations

SHOWN_CHARACTERS = 64


def shown(value: object, limit: int = SHOWN_CHARACTERS) -> str:
    """`repr(value)`, cut to `limit` characters: error messages echo what a client sent, and a
    status must stay far below gRPC's 16 KiB header limit whatever the client sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more)"


class ServerError(Exception):
    """Base of the server's own errors. `field` names the request field at fault, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class InvalidRequestError(ServerError):
    """A request field is missing, malformed or out of range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field)


class NotFoundError(ServerError):
    """A tenant, tenant version or adapter does not exist."""


class AlreadyExistsError(ServerError):
    """An adapter name is already registered."""


class ConflictError(ServerError):
    """A precondition stated by the caller does not hold (e.g. expected_version)."""


class PermissionDeniedError(ServerError):
    """A path outside the configured allowed roots, or a caller acting beyond its API key."""


class UnauthenticatedError(ServerError):
    """No API key, or one that is unknown, malformed or revoked."""


class OverloadedError(ServerError):
    """Too much work in flight: retry later (after `retry_after` seconds, if known)."""

    def __init__(
        self, message: str, field: str | None = None, retry_after: float | None = None
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, field)


class EngineUnavailableError(ServerError):
    """The inference engine is not (or no longer) ready."""


class ConfigError(ServerError):
    """The configuration file, an environment override or a flag is invalid."""


class StoreUnavailableError(ServerError):
    """The tenant store (a database server) cannot be reached: retry later."""
