"""The merge engine's error hierarchy.

Every error names what is wrong: the file and tensor for adapter problems, the field and value
for bad preferences and parameters. Callers (the server, the CLI) map these types to their own
codes once; they never parse messages.
"""

from __future__ import annotations

from pathlib import Path


class MergeEngineError(Exception):
    """Base class of every error raised by `loramerge.merge_engine`."""


class AdapterError(MergeEngineError):
    """An adapter on disk cannot be used. `path` is the offending file, `tensor` the tensor key."""

    def __init__(self, message: str, *, path: Path | str, tensor: str | None = None) -> None:
        self.path = Path(path)
        self.tensor = tensor
        where = f"{self.path}" + (f" [{tensor}]" if tensor else "")
        super().__init__(f"{where}: {message}")


class AdapterNotFoundError(AdapterError):
    """The adapter directory or one of its required files does not exist."""


class AdapterFormatError(AdapterError):
    """A file exists but cannot be read: corrupt JSON or safetensors, or a `.bin`-only adapter."""


class UnsupportedAdapterError(AdapterError):
    """A readable adapter that uses a feature the engine does not merge (DoRA, bias, ...)."""


class InvalidAdapterTensorError(AdapterError):
    """A tensor has the wrong shape, a non-finite value, or its A/B partner is missing."""


class IncompatiblePoolError(MergeEngineError):
    """Adapters that cannot be merged together. `violations` lists every problem found."""

    def __init__(self, violations: list[str]) -> None:
        self.violations = tuple(violations)
        super().__init__("incompatible adapter pool:\n  - " + "\n  - ".join(violations))


class MissingStatisticsError(IncompatiblePoolError):
    """A data-aware rule (RegMean) was asked to merge adapters that have no input statistics."""

    def __init__(self, adapters: list[str]) -> None:
        self.adapters = tuple(adapters)
        super().__init__(
            [
                f"adapter {name!r} has no input statistics (input_statistics.safetensors in its "
                "directory), which this merge method needs; write them with "
                "`loramerge stats --adapter DIR --prompts FILE`"
                for name in adapters
            ]
        )


class InvalidArgumentError(MergeEngineError):
    """A caller-supplied value is invalid. `field` names it (e.g. `preference["math"]`)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class InvalidPreferenceError(InvalidArgumentError):
    """A preference (adapter name -> weight) is unusable."""


class InvalidParameterError(InvalidArgumentError):
    """A merge method parameter or option is out of range or unknown."""


class ExportError(MergeEngineError):
    """A merged adapter could not be written."""

    def __init__(self, message: str, *, path: Path | str, errno: int | None = None) -> None:
        self.path = Path(path)
        self.errno = errno  # the OS error number when the file system refused (e.g. ENOSPC)
        super().__init__(f"{self.path}: {message}")
