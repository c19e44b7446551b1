"""The server's error hierarchy. `server/interceptors.py` maps these (and the merge engine's
errors) to gRPC status codes in one table; nothing else chooses a status code."""

from __future__ import annotations


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
    """A path outside the configured allowed roots."""


class OverloadedError(ServerError):
    """Too much work in flight: retry later."""


class EngineUnavailableError(ServerError):
    """The inference engine is not (or no longer) ready."""


class ConfigError(ServerError):
    """The configuration file, an environment override or a flag is invalid."""


class StoreUnavailableError(ServerError):
    """The tenant store (a database server) cannot be reached: retry later."""
