"""The CPUs the engine has pinned to itself, so that merges can keep off them.

vLLM on the CPU binds its worker's OpenMP threads to all cores but one (`VLLM_CPU_OMP_THREADS_BIND`
auto) and leaves the rest to its scheduler and to us; a merge thread the kernel puts on a bound
core takes its time from decoding. A GPU engine pins nothing, and then neither do we.
"""

from __future__ import annotations

import os

import psutil


def pinned_by_descendants(pid: int | None = None) -> frozenset[int]:
    """CPUs that some thread of a descendant process of `pid` (default: this one) is confined
    to, counting only threads whose affinity is narrower than `pid`'s own (pinned threads).
    Empty where nothing is pinned, or off Linux."""
    if not hasattr(os, "sched_getaffinity"):
        return frozenset()
    root = psutil.Process(pid)
    return _pinned(root, frozenset(os.sched_getaffinity(root.pid)))


def cpus_for_merges(pid: int | None = None) -> frozenset[int] | None:
    """The CPUs `pid`'s merges should run on: its own minus those its descendants pinned;
    None (no restriction) when nothing is pinned or nothing would be left."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    root = psutil.Process(pid)
    ours = frozenset(os.sched_getaffinity(root.pid))
    free = ours - _pinned(root, ours)
    return free if free and free != ours else None


def _pinned(root: psutil.Process, ours: frozenset[int]) -> frozenset[int]:
    pinned: set[int] = set()
    for child in root.children(recursive=True):
        try:
            threads = child.threads()
        except psutil.Error:  # it ended meanwhile
            continue
        for thread in threads:
            try:
                cpus = os.sched_getaffinity(thread.id)
            except OSError:
                continue
            if cpus < ours:
                pinned |= cpus
    return frozenset(pinned)
