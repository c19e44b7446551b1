"""This run's directory under `merge.export_dir`, and sweeping the directories of dead runs.

A run directory `run-<id>` holds an `owner.json` naming the process that made it (boot id, pid
and the pid's start time, so a recycled pid or a restarted container is not mistaken for the
owner). It is created under a temporary name and renamed into place with its owner file, so a
`run-*` directory without one was never ours to keep. At start every `run-*` directory whose
owner is not alive is deleted: the leftovers of a `kill -9` or an OOM kill, which on Kubernetes
survive container restarts in the in-memory `emptyDir`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
PREFIX = "run-"


@dataclass(frozen=True)
class Owner:
    boot_id: str
    pid: int
    start_ticks: int  # the process's start time since boot, in clock ticks


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The start time of process `pid` (field 22 of /proc/pid/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def current_owner() -> Owner:
    pid = os.getpid()
    return Owner(_boot_id(), pid, _start_ticks(pid) or 0)


def is_alive(owner: Owner) -> bool:
    return owner.boot_id == _boot_id() and _start_ticks(owner.pid) == owner.start_ticks


def create_run_dir(export_dir: Path) -> Path:
    """Make this run's directory (with its owner file) under `export_dir`."""
    export_dir.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{uuid.uuid4().hex[:12]}"
    staging = export_dir / f".{name}.tmp"
    staging.mkdir()
    owner = current_owner()
    (staging / OWNER_FILE).write_text(json.dumps(owner.__dict__))
    target = export_dir / name
    os.rename(staging, target)
    return target


def _owner_of(run_dir: Path) -> Owner | None:
    try:
        data = json.loads((run_dir / OWNER_FILE).read_text())
        return Owner(str(data["boot_id"]), int(data["pid"]), int(data["start_ticks"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep_dead_runs(export_dir: Path) -> list[Path]:
    """Delete the run directories (and staging leftovers) of runs that are not alive."""
    swept: list[Path] = []
    if not export_dir.is_dir():
        return swept
    for path in sorted(export_dir.iterdir()):
        staging = path.name.startswith(f".{PREFIX}") and path.name.endswith(".tmp")
        if not (path.name.startswith(PREFIX) or staging) or not path.is_dir():
            continue
        owner = _owner_of(path)
        if owner is not None and is_alive(owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        swept.append(path)
    if swept:
        logger.info("swept %d run directories of dead runs from %s", len(swept), export_dir)
    return swept
