"""Reading files whose size an attacker may control."""

from __future__ import annotations

from pathlib import Path

from .errors import AdapterFormatError


def read_capped(path: Path, limit: int) -> bytes:
    """The file's bytes, refusing a file larger than `limit` (checked while reading, so a file
    that grows after a size check is refused too)."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise AdapterFormatError(f"larger than the {limit}-byte limit", path=path)
    return data
