"""Health per service, server reflection, and a real scrape of /metrics after traffic."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from harness import ServerProcess, free_port
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merges_pb2, merges_pb2_grpc

pytestmark = pytest.mark.slow
SERVICES = [
    "loramerge.v1.Inference",
    "loramerge.v1.Merges",
    "loramerge.v1.Tenants",
    "loramerge.v1.Adapters",
]


def test_every_service_is_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", *SERVICES]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert set(SERVICES) <= names and "grpc.health.v1.Health" in names


def scrape(server: ServerProcess) -> dict[str, list]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if labels.items() <= s.labels.items())


def test_metrics_after_traffic(
    server: ServerProcess,
    inference: inference_pb2_grpc.InferenceStub,
    merges: merges_pb2_grpc.MergesStub,
    task_names: list[str],
) -> None:
    before = scrape(server)
    inference.Generate(inference_pb2.GenerateRequest(prompt="Hello", max_tokens=3))
    preference = {task_names[1]: 1.0, task_names[3]: 2.0}
    merges.Merge(merges_pb2.MergeRequest(preference=preference))
    inference.Generate(
        inference_pb2.GenerateRequest(prompt="Hello", max_tokens=2, preference=preference)
    )
    pico = {"method": "ties", "pico": True}  # calibrates: a hit or a miss of that cache
    merges.Merge(merges_pb2.MergeRequest(preference=preference, merge=pico))
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("loramerge_requests_total", rpc="Inference.Generate", code="OK") == 2
    assert grew("loramerge_request_duration_seconds_count", rpc="Inference.Generate") == 2
    assert grew("loramerge_generated_tokens_total") == 5
    assert grew("loramerge_time_to_first_token_seconds_count") == 2
    assert grew("loramerge_merged_adapter_cache_misses_total") >= 1
    assert grew("loramerge_merged_adapter_cache_hits_total") >= 1  # the Generate after Merge
    assert grew("loramerge_merge_duration_seconds_count", method="regmean", phase="total") >= 1
    assert grew("loramerge_adapter_load_duration_seconds_count") >= 1
    assert value(after, "loramerge_resident_adapters") >= 1
    assert (
        grew("loramerge_calibration_cache_hits_total")
        + grew("loramerge_calibration_cache_misses_total")
        == 1
    )
    assert value(after, "vllm:num_requests_running") == 0  # vLLM's own metrics are there too
    assert any(name.startswith("vllm:") for name in after)
    assert "vllm:lora_requests_info" not in after  # unbounded labels are not exposed
    labels = {key for samples in after.values() for s in samples for key in s.labels}
    assert "tenant" not in labels and "tenant_id" not in labels


def test_a_real_prometheus_scrapes_the_endpoint(
    server: ServerProcess, inference: inference_pb2_grpc.InferenceStub, tmp_path: Path
) -> None:
    """Prometheus (the real server) scrapes /metrics; its query API then sees our series, and
    promtool finds nothing to lint in our families."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool, "prometheus is not installed (make test installs it)"
    inference.Generate(inference_pb2.GenerateRequest(prompt="Hello", max_tokens=2))
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = f"127.0.0.1:{server.metrics_port}"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: loramerge, static_configs: [{{targets: ['{target}']}}]}}\n"
    )
    process = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        query = urllib.parse.quote('sum(loramerge_requests_total{rpc="Inference.Generate"})')
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline and not result:
            time.sleep(1)
            try:
                url = f"http://127.0.0.1:{port}/api/v1/query?query={query}"
                result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
            except OSError:
                continue
        assert result, "Prometheus never scraped loramerge_requests_total"
        assert float(result[0]["value"][1]) >= 1
        up = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query=up"))
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        process.terminate()
        process.wait(timeout=30)
    ours = "\n".join(
        line
        for line in urllib.request.urlopen(server.metrics_url).read().decode().splitlines()
        if "loramerge_" in line
    )
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=ours + "\n", text=True, capture_output=True
    )
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
