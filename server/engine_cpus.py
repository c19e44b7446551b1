"""The CPUs the engine has pinned to itself, so that merges can keep off them.

vLLM on the CPU binds its worker's OpenMP threads to all cores but one (`VLLM_CPU_OMP_THREADS_BIND`
auto) and leaves the rest to its scheduler and to us; a merge thread the kernel puts on a bound
core takes its time from decoding. A GPU engine pins nothing, and then neither do we.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")


def pinned_by_descendants(pid: int | None = None) -> frozenset[int]:
    """CPUs that some thread of a descendant process of `pid` (default: this one) is confined
    to, counting only threads whose affinity is narrower than `pid`'s own (pinned threads).
    Empty where nothing is pinned, or off Linux."""
    root = os.getpid() if pid is None else pid
    if not hasattr(os, "sched_getaffinity") or not PROC.is_dir():
        return frozenset()
    ours = os.sched_getaffinity(root)
    pinned: set[int] = set()
    for child in _descendants(root):
        for thread in _threads(child):
            try:
                cpus = os.sched_getaffinity(thread)
            except OSError:  # it ended meanwhile
                continue
            if cpus < ours:
                pinned |= cpus
    return frozenset(pinned)


def cpus_for_merges(pid: int | None = None) -> frozenset[int] | None:
    """The CPUs `pid`'s merges should run on: its own minus those its descendants pinned;
    None (no restriction) when nothing is pinned or nothing would be left."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    ours = os.sched_getaffinity(0 if pid is None else pid)
    free = frozenset(ours) - pinned_by_descendants(pid)
    return free if free and free != ours else None


def _descendants(root: int) -> Iterator[int]:
    parents: dict[int, list[int]] = {}
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    frontier = [root]
    while frontier:
        for child in parents.get(frontier.pop(), []):
            yield child
            frontier.append(child)


def _threads(pid: int) -> list[int]:
    try:
        return [int(task.name) for task in (PROC / str(pid) / "task").iterdir()]
    except OSError:
        return []
