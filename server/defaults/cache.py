"""Cached folders that are either absent or complete: built in a temporary sibling, then renamed.

The sibling's name carries its builder's pid and start time, so the staging folders of a
builder that was killed (SIGTERM, `kill -9`, OOM) are deleted by the next build of the folder.
"""

from __future__ import annotations

import dataclasses
import glob
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..run_dir import Owner, current_owner, is_alive
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
    owner = current_owner()
    for orphan in _orphans(folder, owner):
        shutil.rmtree(orphan, ignore_errors=True)
    prefix = f".{folder.name}.{owner.pid}-{owner.start_ticks}."
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=folder.parent))
    try:
        yield staging
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _orphans(folder: Path, owner: Owner) -> list[Path]:
    """The staging siblings of `folder` whose builder (pid and start time) is gone."""
    found = []
    for sibling in folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp"):
        pid, _, ticks = sibling.name[len(folder.name) + 2 :].split(".", 1)[0].partition("-")
        if not (pid.isdigit() and ticks.isdigit()):
            continue  # not named by this module
        builder = dataclasses.replace(owner, pid=int(pid), start_ticks=int(ticks))
        if not is_alive(builder):
            found.append(sibling)
    return found
