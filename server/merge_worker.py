"""Bounded work off the event loop: merges, exports and diagnostics.

At most `threads` jobs run at once and at most `queue` more wait; a job beyond that is refused
at once with RESOURCE_EXHAUSTED (`OverloadedError`), so a burst of cache misses cannot grow an
unbounded backlog or starve the default executor that tenant lookups use. A waiting caller that
is cancelled takes its job out of the queue; a running job finishes (threads cannot be stopped)
and still counts against the bound until it has. After every job the merge memory is brought
back within its budget; an out-of-memory error becomes `MergeMemoryError` naming the budget.

Merges share the CPU with decoding (on a CPU engine, and for the export on any): each worker
thread uses `cpu_threads` intra-op threads and, once `confine` is given the CPUs the engine
has not pinned to itself, runs only on those.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import TypeVar

import torch

from .errors import OverloadedError
from .merge_memory import MergeMemory, MergeMemoryError
from .metrics import Metrics

T = TypeVar("T")

logger = logging.getLogger(__name__)


class MergeWorker:
    def __init__(
        self,
        memory: MergeMemory,
        metrics: Metrics,
        *,
        threads: int,
        queue: int,
        cpu_threads: int = 1,
    ) -> None:
        self.memory = memory
        self._metrics = metrics
        self._threads = threads
        self._limit = threads + queue
        self._executor = ThreadPoolExecutor(
            threads,
            thread_name_prefix="merge",
            initializer=torch.set_num_threads,  # thread-local under OpenMP
            initargs=(cpu_threads,),
        )
        self._pending = 0  # submitted and not finished (event loop only)
        self._running = 0  # started and not finished (worker threads)
        self._lock = threading.Lock()
        self._cpus: frozenset[int] | None = None  # None: wherever the kernel puts them
        self._applied = threading.local()  # the CPU set each worker thread last applied

    @property
    def threads(self) -> int:
        """Jobs that may run at once."""
        return self._threads

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, job: Callable[[], T], what: str) -> T:
        """Run `job` on a worker thread; `what` names it in the error when the queue is full."""
        if self._pending >= self._limit:
            raise OverloadedError(
                f"cannot start {what}: {self._threads} merge jobs running and "
                f"{self._limit - self._threads} queued; retry later"
            )
        loop = asyncio.get_running_loop()
        self._pending += 1
        self._report()
        future: Future[T] = self._executor.submit(self._guarded, job)
        future.add_done_callback(lambda _: _call_soon(loop, self._finished))
        return await asyncio.wrap_future(future)

    def confine(self, cpus: frozenset[int] | None) -> None:
        """Run the jobs that start from now on only on `cpus` (None: anywhere)."""
        self._cpus = cpus
        if cpus is not None:
            logger.info("merges run on CPUs %s (the engine pinned the others)", sorted(cpus))

    def _guarded(self, job: Callable[[], T]) -> T:
        cpus = self._cpus
        if getattr(self._applied, "cpus", None) != cpus:
            os.sched_setaffinity(0, cpus if cpus is not None else os.sched_getaffinity(os.getpid()))
            self._applied.cpus = cpus
        with self._lock:
            self._running += 1
        self._report()
        try:
            return job()
        except (torch.OutOfMemoryError, MemoryError):
            described = self.memory.describe()
            self.memory.release_all()
            raise MergeMemoryError(
                f"the merge ran out of memory (merge.memory_budget_bytes: {described}); "
                "retry, or raise the budget or lower merge.max_concurrent_merges"
            ) from None
        finally:
            with self._lock:
                self._running -= 1
            self.memory.enforce()

    def _finished(self) -> None:
        self._pending -= 1
        self._report()

    def _report(self) -> None:
        self._metrics.merge_queue_depth.set(max(self._pending - self._running, 0))

    def shutdown(self) -> None:
        """Drop queued jobs and wait for the running ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with suppress(RuntimeError):  # the loop has closed: nobody counts any more
        loop.call_soon_threadsafe(callback)
