"""Cached folders that are either absent or complete: built in a temporary sibling, then renamed."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import IncompleteAssetError


def is_built(folder: Path, required: Sequence[str]) -> bool:
    """Whether `folder` was built already.

    A folder only appears by an atomic rename once it is complete, so a folder that exists but
    lacks a `required` file was changed by hand: that raises `IncompleteAssetError` rather than
    silently rebuilding over (or serving from) it.
    """
    if not folder.exists():
        return False
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise IncompleteAssetError(
            f"{folder} exists but lacks {', '.join(missing)}; delete the folder to rebuild it"
        )
    return True


@contextmanager
def build_atomically(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; rename it to `folder` when the block ends
    without an error, and delete it in every case otherwise.

    If another process built `folder` meanwhile, its copy is kept and ours is discarded.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield staging
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
