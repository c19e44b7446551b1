"""A bounded load on loopback against the real server: concurrent clients mixing tenants,
inline preferences, streaming, cancellations and deadlines, for a fixed number of requests.
Prints the load held (requests, concurrency, latency percentiles); docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from harness import ServerProcess, eventually, gauges
from loramerge.v1 import inference_pb2, inference_pb2_grpc, tenants_pb2, tenants_pb2_grpc

pytestmark = pytest.mark.slow

REQUESTS = 48
CONCURRENCY = 4
TIME_BOUND = 600.0
MAX_TOKENS = 3
REQUEST_BOUND = 240.0  # RESOURCE_EXHAUSTED (the in-flight cap) is retried until then
KINDS = ("tenant", "inline", "tenant-stream", "inline-stream", "cancel-stream", "deadline")
EXPECTED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
MEMORY_GROWTH_BOUND = 2 << 30


def group_rss(server: ServerProcess) -> int:
    """Resident bytes of the server's process group (the engine core included)."""
    assert server.process is not None
    total = 0
    for pid in server.group_alive(server.process.pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_bounded_load_on_loopback(
    server: ServerProcess,
    channel: grpc.Channel,
    inference: inference_pb2_grpc.InferenceStub,
    tenants: tenants_pb2_grpc.TenantsStub,
    task_names: list[str],
) -> None:
    chooser = random.Random(2026)
    for i in range(3):
        tenants.SetTenant(
            tenants_pb2.SetTenantRequest(
                tenant=tenants_pb2.Tenant(
                    tenant_id=f"load-{i}",
                    preference={task_names[i]: 2.0, task_names[(i + 1) % len(task_names)]: 1.0},
                )
            )
        )
    inline = [  # more distinct versions than the capacity: the bound is exercised
        {task_names[i % len(task_names)]: 1.0 + i, task_names[(i + 1) % len(task_names)]: 2.0}
        for i in range(16)
    ]
    plan = [(KINDS[i % len(KINDS)], i) for i in range(REQUESTS)]
    chooser.shuffle(plan)

    capacity = gauges(server)["loramerge_resident_adapters_capacity"]
    (run_dir,) = server.run_dirs
    rss_before = group_rss(server)
    peaks = {"resident": 0.0, "rss": float(rss_before)}
    stop = threading.Event()
    lock = threading.Lock()
    backpressure = {"answers": 0}

    def sample() -> None:
        while not stop.is_set():
            resident = gauges(server)["loramerge_resident_adapters"]
            peaks["resident"] = max(peaks["resident"], resident)
            peaks["rss"] = max(peaks["rss"], group_rss(server))
            time.sleep(0.5)

    def request(kind: str, i: int) -> tuple[str, float, str]:
        tenant = f"load-{i % 3}" if kind.startswith("tenant") else ""
        message = inference_pb2.GenerateRequest(
            prompt=f"Question {i}: what is {i} plus {i}?",
            tenant_id=tenant,
            preference={} if tenant else inline[i % len(inline)],
            max_tokens=40 if kind == "deadline" else MAX_TOKENS,
        )
        began = time.monotonic()
        attempt = 0
        while time.monotonic() - began < REQUEST_BOUND:
            try:
                if kind == "deadline":
                    check(inference.Generate(message, timeout=0.5), message.max_tokens)
                elif kind == "cancel-stream":
                    stream = inference.GenerateStream(message)
                    assert next(stream).adapter_id
                    stream.cancel()
                    return kind, time.monotonic() - began, "CANCELLED"
                elif kind.endswith("stream"):
                    check_stream(list(inference.GenerateStream(message)), message.max_tokens)
                else:
                    check(inference.Generate(message, timeout=120), message.max_tokens)
                return kind, time.monotonic() - began, "OK"
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return kind, time.monotonic() - began, error.code().name
                with lock:
                    backpressure["answers"] += 1  # the server's in-flight cap: back off
                attempt += 1
                time.sleep(min(0.1 * attempt, 1.0))
        return kind, time.monotonic() - began, "RESOURCE_EXHAUSTED until the request bound"

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda item: request(*item), plan, timeout=TIME_BOUND))
    wall = time.monotonic() - began
    stop.set()
    sampler.join()

    outcomes = Counter(code for _, _, code in results)
    assert set(outcomes) <= EXPECTED, outcomes
    assert outcomes["OK"] >= REQUESTS // 2, outcomes
    assert peaks["resident"] <= capacity
    assert gauges(server)["loramerge_merged_adapter_cache_evictions_total"] > 0
    assert peaks["rss"] - rss_before < MEMORY_GROWTH_BOUND
    eventually(lambda: gauges(server)["loramerge_requests_in_flight{protocol=grpc}"] == 0)

    def settled() -> bool:  # the reaper's last pass (it runs after the leases end) is over
        now = gauges(server)
        on_disk = now["loramerge_resident_adapters"] + now["loramerge_parked_adapters"]
        return len([p for p in run_dir.iterdir() if p.name.startswith("m")]) == on_disk

    eventually(settled)  # no tmpfs growth: only the loaded and the parked versions' files
    after = gauges(server)
    assert after["loramerge_resident_adapters"] <= capacity
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert (
        dir_bytes(run_dir) - (run_dir / "owner.json").stat().st_size
        == after["loramerge_export_dir_bytes"]
    )

    latencies = sorted(seconds for _, seconds, code in results if code == "OK")
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(
        f"\nload: {REQUESTS} requests, concurrency {CONCURRENCY}, {MAX_TOKENS} tokens, "
        f"wall {wall:.1f} s, {REQUESTS / wall:.2f} req/s\n"
        f"  outcomes {dict(outcomes)}; OK latency p50 {p50:.2f} s, p99 {p99:.2f} s "
        f"(retries included; {backpressure['answers']} RESOURCE_EXHAUSTED answers retried)\n"
        f"  resident peak {peaks['resident']:.0f} of {capacity:.0f}; "
        f"RSS growth {(peaks['rss'] - rss_before) / 2**20:.0f} MiB; "
        f"merges {after.get('loramerge_merged_adapter_cache_misses_total', 0):.0f}, "
        f"evictions {after.get('loramerge_merged_adapter_cache_evictions_total', 0):.0f}"
    )


def check(reply: inference_pb2.GenerateResponse, max_tokens: int) -> None:
    assert reply.adapter_id
    assert 1 <= reply.completion_tokens <= max_tokens
    assert reply.prompt_tokens > 0
    assert reply.finish_reason in (
        inference_pb2.FINISH_REASON_STOP,
        inference_pb2.FINISH_REASON_LENGTH,
    )


def check_stream(chunks: list[inference_pb2.GenerateStreamResponse], max_tokens: int) -> None:
    assert chunks and all(c.adapter_id == chunks[0].adapter_id != "" for c in chunks)
    assert [c.finish_reason != 0 for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert 1 <= chunks[-1].completion_tokens <= max_tokens
