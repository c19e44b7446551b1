"""Merges keep off the CPUs the engine pinned to itself: a real child process pins itself to one
CPU, as vLLM-CPU's worker does, and the merge worker's jobs then run on the others."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from test_merge_worker import make_worker

from loramerge.server.engine_cpus import cpus_for_merges, pinned_by_descendants

ours = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
pytestmark = pytest.mark.skipif(len(ours) < 2, reason="needs Linux and two CPUs or more")

PIN_AND_WAIT = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
print("pinned", flush=True)
sys.stdin.read()
"""
PARENT = "import subprocess, sys; subprocess.run([sys.executable, '-c', *sys.argv[1:]])"


@pytest.fixture
def pinned_child() -> Iterator[tuple[int, int]]:
    """A process (as vLLM's engine core) whose child pins itself to our highest CPU (as
    vLLM's worker does): the parent's pid and the CPU."""
    cpu = max(ours)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, PIN_AND_WAIT, str(cpu)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None and parent.stdout.readline() == "pinned\n"
    try:
        yield parent.pid, cpu
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait(10)


def test_nothing_pinned_means_no_restriction() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert pinned_by_descendants(child.pid) == frozenset()  # it has no children
        assert cpus_for_merges(child.pid) is None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


def test_a_pinned_descendant_is_found_and_merges_run_on_the_other_cpus(
    pinned_child: tuple[int, int],
) -> None:
    engine, cpu = pinned_child  # scoped to it: this test session may run a vLLM engine too
    assert pinned_by_descendants(engine) == {cpu}
    rest = ours - {cpu}
    assert cpus_for_merges(engine) == rest

    async def scenario() -> None:
        worker = make_worker(threads=2)
        worker.confine(cpus_for_merges(engine))
        seen = await asyncio.gather(
            *(worker.run(lambda: os.sched_getaffinity(0), "a probe") for _ in range(4))
        )
        assert all(cpus == rest for cpus in seen)
        worker.confine(None)
        assert await worker.run(lambda: os.sched_getaffinity(0), "a probe") == ours
        assert os.sched_getaffinity(0) == ours  # the event loop's thread was never moved
        worker.shutdown()

    asyncio.run(scenario())
