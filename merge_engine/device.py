"""Choosing where and in what precision merges run (at run time, never at import)."""

from __future__ import annotations

import torch

from .errors import InvalidParameterError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """ "auto" (or None): CUDA when available, else CPU. Otherwise a torch device string."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidParameterError("device", f"{name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device", f"{name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise InvalidParameterError("device", f"{name!r}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The compute precision: float32 (default) or float64."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise InvalidParameterError("dtype", f"{name} is not one of float32, float64")
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidParameterError(
            "dtype", f"{name!r} is not one of {', '.join(DTYPES)}"
        ) from None
