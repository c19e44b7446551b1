"""Two real loramerge servers (two vLLM engines) on one real PostgreSQL, behind a real nginx with
the shipped tenant-affinity config (deploy/nginx/loramerge.conf): each sees the other's tenant
changes, every request of a tenant lands on one replica, and the tenants spread over both.
Also checks that the vLLM metrics deploy/ queries exist on a real server's /metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import ServerProcess, free_port
from loramerge.server.defaults.model import ensure_default_model
from loramerge.server.healthcheck import main as healthcheck
from loramerge.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    merge_pb2,
    tenants_pb2,
    tenants_pb2_grpc,
)
from metric_names import VLLM_METRICS
from pgserver import PostgresServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TENANTS = [f"tenant-{i:02d}" for i in range(16)]
CALLS_EACH = 3


@pytest.fixture(scope="module")
def replicas(
    postgres: PostgresServer, default_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    """Two servers sharing one PostgreSQL database, started together: the embedded base model
    without adapters (routing and the store need none), each with the default 1 GiB KV cache on
    the CPU (a fraction of memory, as `gpu_memory_utilization`, must also fit the weights, which
    are float32 where the CPU has no native bfloat16)."""
    model = ensure_default_model(default_cache_dir, progress=print)
    url = postgres.create_database()
    servers = []
    for name in ("a", "b"):
        servers.append(
            ServerProcess(
                tmp_path_factory.mktemp(f"replica-{name}"),
                {
                    "cache_dir": str(default_cache_dir),
                    "engine": {
                        "model": str(model),
                        "max_model_len": 256,
                    },
                    "adapters": {"use_default_pool": False},
                    "metrics": {"tenant_labels": True},
                    "merge": {"export_dir": f"/dev/shm/loramerge-test-{uuid.uuid4().hex[:8]}"},
                    "store": {"url": url},
                },
                # two engines starting at once on a small shared machine
                start_timeout=900,
            )
        )
    errors: list[BaseException] = []

    def start(server: ServerProcess) -> None:
        try:
            server.start()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=(server,)) for server in servers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        yield servers
    finally:
        for server in servers:
            server.cleanup()


def _tenants(server: ServerProcess) -> tuple[grpc.Channel, tenants_pb2_grpc.TenantsStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, tenants_pb2_grpc.TenantsStub(channel)


def test_replicas_see_each_others_tenant_changes(replicas: list[ServerProcess]) -> None:
    (a_channel, a), (b_channel, b) = (_tenants(server) for server in replicas)
    try:
        a.SetTenant(
            tenants_pb2.SetTenantRequest(tenant=tenants_pb2.Tenant(tenant_id="shared")),
            timeout=30,
        )
        assert b.GetTenant(tenants_pb2.GetTenantRequest(tenant_id="shared")).tenant.version == 1

        # b updates under a precondition that only holds if it read a's write
        b.SetTenant(
            tenants_pb2.SetTenantRequest(
                tenant=tenants_pb2.Tenant(
                    tenant_id="shared", merge=merge_pb2.MergeOptions(method="ties")
                ),
                expected_version=1,
            ),
            timeout=30,
        )
        seen = a.GetTenant(tenants_pb2.GetTenantRequest(tenant_id="shared")).tenant
        assert (seen.version, seen.merge.method) == (2, "ties")
        with pytest.raises(grpc.RpcError) as stale:
            a.SetTenant(
                tenants_pb2.SetTenantRequest(
                    tenant=tenants_pb2.Tenant(tenant_id="shared"), expected_version=1
                ),
                timeout=30,
            )
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        a.DeleteTenant(tenants_pb2.DeleteTenantRequest(tenant_id="shared"), timeout=30)
        with pytest.raises(grpc.RpcError) as gone:
            b.GetTenant(tenants_pb2.GetTenantRequest(tenant_id="shared"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        a_channel.close()
        b_channel.close()


@pytest.fixture(scope="module")
def nginx(replicas: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The real nginx with deploy/nginx/loramerge.conf, its replica addresses and listen ports
    replaced by the test's; yields its gRPC port."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    root = tmp_path_factory.mktemp("nginx")
    grpc_port = free_port()
    shipped = (ROOT / "deploy" / "nginx" / "loramerge.conf").read_text()
    config = _with_backends(shipped, [s.grpc_port for s in replicas], grpc_port, free_port())
    (root / "loramerge.conf").write_text(config)
    (root / "nginx.conf").write_text(
        f"""
        worker_processes 1;
        pid {root}/nginx.pid;
        error_log {root}/error.log info;
        events {{ worker_connections 256; }}
        http {{
            log_format upstream '$http_x_tenant_id $upstream_addr $status';
            access_log {root}/access.log upstream;
            client_body_temp_path {root}/body;
            proxy_temp_path {root}/proxy;
            fastcgi_temp_path {root}/fastcgi;
            uwsgi_temp_path {root}/uwsgi;
            scgi_temp_path {root}/scgi;
            include {root}/loramerge.conf;
        }}
        """
    )
    process = subprocess.Popen(
        [binary, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{grpc_port}")).result(
                    timeout=1
                )
                break
            except grpc.FutureTimeoutError:
                continue
        yield grpc_port
    finally:
        process.terminate()
        process.wait(timeout=30)


def _with_backends(config: str, backend_ports: list[int], grpc_port: int, http_port: int) -> str:
    """The shipped config with our replicas in the gRPC upstream and free listen ports."""
    servers = "".join(
        f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;\n" for port in backend_ports
    )
    config, count = re.subn(
        r"(upstream loramerge_grpc \{\n    hash \$http_x_tenant_id consistent;\n)"
        r"(    server .*\n)+",
        lambda match: match.group(1) + servers,
        config,
    )
    assert count == 1, "the shipped config has no gRPC upstream hashing x-tenant-id"
    config = config.replace("listen 50051 http2;", f"listen 127.0.0.1:{grpc_port} http2;")
    return config.replace("listen 8000;", f"listen 127.0.0.1:{http_port};")


def _tenant_requests(server: ServerProcess) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == "loramerge_tenant_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["tenant"]] = sample.value
    return counts


def test_nginx_keeps_each_tenant_on_one_replica_and_spreads_tenants(
    replicas: list[ServerProcess], nginx: int
) -> None:
    with grpc.insecure_channel(replicas[0].address) as direct:
        tenants = tenants_pb2_grpc.TenantsStub(direct)
        for tenant_id in TENANTS:  # no preference: the base model, fast on the CPU
            tenants.SetTenant(
                tenants_pb2.SetTenantRequest(tenant=tenants_pb2.Tenant(tenant_id=tenant_id)),
                timeout=30,
            )
    with grpc.insecure_channel(f"127.0.0.1:{nginx}") as proxied:
        inference = inference_pb2_grpc.InferenceStub(proxied)
        for _ in range(CALLS_EACH):
            for tenant_id in TENANTS:
                response = inference.Generate(
                    inference_pb2.GenerateRequest(prompt="Hi", tenant_id=tenant_id, max_tokens=1),
                    metadata=(("x-tenant-id", tenant_id),),
                    timeout=120,
                )
                assert response.text is not None

    served = [_tenant_requests(server) for server in replicas]
    for tenant_id in TENANTS:
        counts = [s.get(tenant_id, 0.0) for s in served]
        assert sorted(counts) == [0.0, CALLS_EACH], f"{tenant_id} served {counts}"
    per_replica = [sum(1 for t in TENANTS if s.get(t)) for s in served]
    assert min(per_replica) >= 1, f"tenants per replica: {per_replica}"


def test_the_vllm_metrics_deploy_queries_exist(replicas: list[ServerProcess]) -> None:
    text = urllib.request.urlopen(replicas[0].metrics_url, timeout=10).read().decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert names >= VLLM_METRICS, sorted(VLLM_METRICS - names)


def test_the_image_healthcheck_follows_grpc_health(replicas: list[ServerProcess]) -> None:
    """The Dockerfile's HEALTHCHECK command: healthy when the server is SERVING, not when
    nothing listens."""
    assert healthcheck([replicas[0].address]) == 0
    assert healthcheck([replicas[0].address, "loramerge.v1.Inference"]) == 0
    assert healthcheck([f"127.0.0.1:{free_port()}"]) == 1
