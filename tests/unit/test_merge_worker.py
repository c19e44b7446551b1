"""The merge worker's bounds and the merge memory's byte accounting, on the CPU (the
accounting does not depend on the device)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from serving import metrics

from loramerge.merge_engine import AdapterPool, CalibrationCache, MergeSpec, merge, pool_diagnostics
from loramerge.server.errors import OverloadedError
from loramerge.server.merge_memory import MergeMemory, MergeMemoryError
from loramerge.server.merge_worker import MergeWorker

CPU = torch.device("cpu")


def make_worker(
    budget: int = 1 << 30, threads: int = 1, queue: int = 2, **share: int
) -> MergeWorker:
    m = metrics()
    memory = MergeMemory(CalibrationCache(64), m, device=CPU, dtype=torch.float32, budget=budget)
    return MergeWorker(memory, m, threads=threads, queue=queue, **share)


def gauge(worker: MergeWorker, name: str) -> float:
    return float(getattr(worker._metrics, name)._value.get())


def test_a_full_queue_refuses_at_once_and_a_cancelled_job_never_runs() -> None:
    async def scenario() -> None:
        worker = make_worker(threads=1, queue=2)
        gate = threading.Event()
        ran: list[int] = []

        def job(i: int) -> int:
            gate.wait(10)
            ran.append(i)
            return i

        jobs = [asyncio.create_task(worker.run(lambda i=i: job(i), f"job {i}")) for i in range(3)]
        await asyncio.sleep(0.1)
        assert gauge(worker, "merge_queue_depth") == 2  # one running, two waiting
        with pytest.raises(OverloadedError, match="1 merge jobs running and 2 queued"):
            await worker.run(lambda: job(9), "a merge")
        jobs[2].cancel()
        await asyncio.sleep(0.01)  # the cancellation reaches the queued job
        gate.set()
        assert await asyncio.gather(*jobs[:2]) == [0, 1]
        with pytest.raises(asyncio.CancelledError):
            await jobs[2]
        await asyncio.sleep(0.05)
        assert ran == [0, 1] and worker.pending == 0
        assert gauge(worker, "merge_queue_depth") == 0
        worker.shutdown()

    asyncio.run(scenario())


def test_merge_threads_use_their_own_thread_count_and_leave_the_loop_alone() -> None:
    async def scenario() -> None:
        before = torch.get_num_threads()
        worker = make_worker(threads=2, cpu_threads=before + 1)
        seen = await asyncio.gather(
            *(worker.run(torch.get_num_threads, "a probe") for _ in range(4))
        )
        assert set(seen) == {before + 1}
        assert torch.get_num_threads() == before  # the event loop's thread keeps its own
        worker.shutdown()

    asyncio.run(scenario())


def test_out_of_memory_is_resource_exhausted_naming_the_budget(pool3: AdapterPool) -> None:
    async def scenario() -> None:
        worker = make_worker(budget=3 << 30)
        worker.memory.track(pool3)
        await worker.run(lambda: pool3.groups(CPU, torch.float32), "warm-up")
        assert worker.memory.held() > 0

        def oom() -> None:
            raise torch.OutOfMemoryError("CUDA out of memory")

        with pytest.raises(MergeMemoryError, match=r"merge.memory_budget_bytes: 3.00 GiB on cpu"):
            await worker.run(oom, "a merge")
        assert worker.memory.held() == 0  # caches released to recover
        assert await worker.run(lambda: 7, "a merge") == 7  # and the worker still works
        worker.shutdown()

    asyncio.run(scenario())


def test_caches_are_accounted_in_bytes_and_evicted_to_the_budget(pool3: AdapterPool) -> None:
    stacks = sum(g.nbytes for g in pool3.groups(CPU, torch.float32))
    pool3.drop_groups()
    cache = CalibrationCache(64)
    merge(pool3, {"code": 1, "math": 1}, MergeSpec(pico=True), device="cpu", cache=cache)
    one_calibration = cache.nbytes
    assert one_calibration > 0

    async def scenario() -> None:
        # room for the stacks and two calibrations, not three
        worker = make_worker(budget=stacks + 2 * one_calibration + one_calibration // 2)
        memory = worker.memory
        memory.track(pool3)
        for subset in [("code", "math"), ("code", "finance"), ("finance", "math")]:
            await worker.run(
                lambda s=subset: merge(
                    pool3, dict.fromkeys(s, 1.0), MergeSpec(pico=True), device="cpu",
                    cache=memory.calibrations,
                ),
                "a merge",
            )  # fmt: skip
        assert len(memory.calibrations) == 2  # the least recently used one went
        assert memory.held() == stacks + memory.calibrations.nbytes <= memory.budget
        assert gauge(worker, "merge_memory") == memory.held()

        await worker.run(lambda: pool_diagnostics(pool3), "diagnostics")  # float64 stacks
        assert pool3.cached_bytes() == stacks  # dropped after the job
        assert memory.calibrations.retain("another pool") > 0
        assert memory.calibrations.nbytes == 0 and len(memory.calibrations) == 0
        worker.shutdown()

    asyncio.run(scenario())
