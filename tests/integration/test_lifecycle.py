"""The process's life with the real engine: client cancellation and deadlines, SIGTERM to the
whole process group, the engine dying, and a start after kill -9. Each test that ends the
server starts it again for the tests after it."""

from __future__ import annotations

import os
import re
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import INFERENCE, ServerProcess, eventually, gauges
from loramerge.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow
# Not a performance goal: well below the ~56 s hang on a dead engine that this guards against,
# well above an exit on a 2-core machine shared by other work (grace 10 s + engine shutdown).
HANG = 45.0


def test_cancel_and_deadline_abort_the_engine_request(
    server: ServerProcess, inference: inference_pb2_grpc.InferenceStub, task_names: list[str]
) -> None:
    request = inference_pb2.GenerateRequest(
        prompt="Count from one to five hundred:",
        preference={task_names[0]: 1.0, task_names[1]: 1.0},
        max_tokens=400,
        temperature=0.0,
    )
    with pytest.raises(grpc.RpcError) as info:
        inference.Generate(request, timeout=1.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = inference.GenerateStream(request)
    assert next(stream).adapter_id  # generating
    stream.cancel()

    def released() -> bool:
        values = gauges(server)
        return (
            values.get("loramerge_requests_in_flight{protocol=grpc}") == 0
            and values.get("vllm:num_requests_running", 0) == 0
            and values.get("vllm:num_requests_waiting", 0) == 0
        )

    eventually(released)  # vLLM aborted both requests; our in-flight count is back to 0


def test_sigterm_to_the_process_group_drains_and_exits_cleanly(
    server: ServerProcess, inference: inference_pb2_grpc.InferenceStub, task_names: list[str]
) -> None:
    """What Ctrl-C on `make serve` or a supervisor's group kill does: vLLM's engine core dies at
    the same moment. No hang on the dead engine, no traceback, the run directory is gone."""
    inference.Generate(  # a merged version is resident
        inference_pb2.GenerateRequest(prompt="Hi", preference={task_names[2]: 1.0}, max_tokens=1)
    )
    (run_dir,) = server.run_dirs
    assert any(run_dir.iterdir())
    assert server.process is not None
    pgid = server.process.pid
    log_start = server.log_path.stat().st_size
    began = time.monotonic()
    server.signal_group(signal.SIGTERM)
    code = server.wait(timeout=60)
    seconds = time.monotonic() - began
    log = server.log_path.read_text(errors="replace")[log_start:]
    assert code == 0, log
    assert seconds < HANG, f"took {seconds:.0f} s to exit"
    print(f"\nSIGTERM to the process group: exit 0 after {seconds:.1f} s")
    assert server.run_dirs == []
    assert "Traceback" not in log and "EngineDeadError" not in log, log
    eventually(lambda: server.group_alive(pgid) == [], 10)
    server.start()


def test_the_engine_dying_makes_the_process_exit_for_a_restart(server: ServerProcess) -> None:
    assert server.process is not None
    pgid = server.process.pid
    engine_cores = [pid for pid in server.group_alive(pgid) if pid != pgid]
    assert engine_cores, "no engine core process found"
    (run_dir,) = server.run_dirs
    for pid in engine_cores:
        os.kill(pid, signal.SIGKILL)
    seen: set[str] = set()
    began = time.monotonic()
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        generate = inference_pb2_grpc.InferenceStub(channel).Generate
        while server.process.poll() is None and time.monotonic() - began < 30:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=INFERENCE), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    seen.add("NOT_SERVING")
                generate(inference_pb2.GenerateRequest(prompt="Hi", max_tokens=1), timeout=2)
            except grpc.RpcError as error:
                seen.add(error.code().name)
            time.sleep(0.1)
    code = server.wait(timeout=30)
    seconds = time.monotonic() - began
    print(f"\nengine core killed: {sorted(seen)} seen, exit {code} after {seconds:.1f} s")
    assert code != 0
    assert seconds < HANG
    assert "OK" not in seen and seen & {"UNAVAILABLE", "NOT_SERVING"}, seen
    assert not run_dir.exists()
    assert re.search(r"vLLM engine (has stopped|died)", server.log_path.read_text())
    eventually(lambda: server.group_alive(pgid) == [], 10)
    server.sweep_shm()  # the killed engine core's shared-memory queues
    server.start()


def test_a_start_after_kill_9_sweeps_the_dead_run_directory(
    server: ServerProcess, inference: inference_pb2_grpc.InferenceStub, task_names: list[str]
) -> None:
    inference.Generate(
        inference_pb2.GenerateRequest(prompt="Hi", preference={task_names[1]: 1.0}, max_tokens=1)
    )
    (left_behind,) = server.run_dirs
    assert server.process is not None
    pgid = server.process.pid
    server.signal_group(signal.SIGKILL)
    assert server.wait(timeout=30) == -signal.SIGKILL
    eventually(lambda: server.group_alive(pgid) == [], 10)
    assert left_behind.exists()  # nothing could clean up
    server.sweep_shm()  # nor unlink vLLM's shared-memory queues
    server.start()
    (current,) = server.run_dirs
    assert current != left_behind and not left_behind.exists()
