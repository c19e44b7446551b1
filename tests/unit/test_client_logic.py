"""loramerge_client's own logic in isolation, over a real gRPC channel to a small in-process
fake of the Tenants and Inference services (the real server is in tests/integration): which
calls are retried, what metadata is sent, how errors and their details arrive, and that a
failed export leaves nothing behind."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from loramerge_client import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    LoramergeError,
    NotFound,
    Retry,
    Unavailable,
)
from loramerge_client.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    merges_pb2,
    merges_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
)

FAST = Retry(attempts=3, initial_backoff=0.01, max_backoff=0.02)


class Fake(
    tenants_pb2_grpc.TenantsServicer,
    inference_pb2_grpc.InferenceServicer,
    merges_pb2_grpc.MergesServicer,
):
    """Fails the first `failures` calls of each method with `code`, then answers."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.export_files: list[tuple[str, bytes, str]] = []

    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls[name] <= self.failures:
            context.abort(self.code, f"{name} failed on purpose")

    def GetTenant(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("GetTenant", context)
        if request.tenant_id == "bad":
            detail = any_pb2.Any()
            detail.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="tenant_id", description="not a valid tenant id"
                        )
                    ]
                )
            )
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message="tenant_id: invalid", details=[detail]
            )
            context.abort_with_status(rpc_status.to_status(status))
        if request.tenant_id == "ghost":
            context.abort(grpc.StatusCode.NOT_FOUND, "no tenant 'ghost'")
        return tenants_pb2.GetTenantResponse(
            tenant=tenants_pb2.Tenant(tenant_id=request.tenant_id, preference={"a": 1.0}, version=3)
        )

    def SetTenant(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("SetTenant", context)
        return tenants_pb2.SetTenantResponse(tenant=request.tenant)

    def GenerateStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.calls["GenerateStream"] = self.calls.get("GenerateStream", 0) + 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls["GenerateStream"] <= self.failures:
            context.abort(self.code, "before any token")
        yield inference_pb2.GenerateStreamResponse(text="Hel", completion_tokens=1)
        if request.prompt == "break":
            context.abort(grpc.StatusCode.UNAVAILABLE, "after a token")
        yield inference_pb2.GenerateStreamResponse(
            text="lo", completion_tokens=2, finish_reason=inference_pb2.FINISH_REASON_LENGTH
        )

    def Export(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for name, data, digest in self.export_files:
            yield merges_pb2.ExportResponse(
                file=merges_pb2.FileHeader(
                    name=name, size=len(data), sha256=digest, adapter_id="m1"
                )
            )
            yield merges_pb2.ExportResponse(chunk=data)


@pytest.fixture
def fake() -> Iterator[tuple[Fake, str]]:
    servicer = Fake()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    tenants_pb2_grpc.add_TenantsServicer_to_server(servicer, server)
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    merges_pb2_grpc.add_MergesServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_reads_are_retried_on_unavailable_and_writes_are_not(fake: tuple[Fake, str]) -> None:
    servicer, target = fake
    servicer.failures = 2
    with Client(target, retry=FAST, timeout=5) as client:
        assert client.get_tenant("acme").version == 3
        assert servicer.calls["GetTenant"] == 3
        with pytest.raises(Unavailable) as raised:
            client.set_tenant("acme", {"a": 1.0})
        assert servicer.calls["SetTenant"] == 1
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_retries_stop_after_the_configured_attempts(fake: tuple[Fake, str]) -> None:
    servicer, target = fake
    servicer.failures = 5
    with Client(target, retry=FAST, timeout=5) as client, pytest.raises(Unavailable):
        client.get_tenant("acme")
    assert servicer.calls["GetTenant"] == FAST.attempts


def test_other_codes_are_not_retried(fake: tuple[Fake, str]) -> None:
    servicer, target = fake
    servicer.failures, servicer.code = 1, grpc.StatusCode.FAILED_PRECONDITION
    with Client(target, retry=FAST, timeout=5) as client, pytest.raises(FailedPrecondition):
        client.get_tenant("acme")
    assert servicer.calls["GetTenant"] == 1


def test_stream_is_retried_only_before_the_first_token(fake: tuple[Fake, str]) -> None:
    servicer, target = fake
    servicer.failures = 1
    with Client(target, retry=FAST, timeout=5) as client:
        chunks = list(client.stream("hi"))
        assert [c.text for c in chunks] == ["Hel", "lo"]
        assert chunks[-1].finish_reason == "length" and chunks[0].finish_reason == ""
        assert servicer.calls["GenerateStream"] == 2
        received = []
        with pytest.raises(Unavailable):
            for chunk in client.stream("break"):
                received.append(chunk.text)
        assert received == ["Hel"]
        assert servicer.calls["GenerateStream"] == 3  # not repeated after a token arrived


def test_errors_carry_code_message_and_field(fake: tuple[Fake, str]) -> None:
    _, target = fake
    with Client(target, retry=FAST, timeout=5) as client:
        with pytest.raises(InvalidArgument) as invalid:
            client.get_tenant("bad")
        assert invalid.value.field == "tenant_id"
        assert invalid.value.message == "tenant_id: invalid"
        with pytest.raises(NotFound) as missing:
            client.get_tenant("ghost")
        assert isinstance(missing.value, LoramergeError) and missing.value.field is None
        assert "ghost" in str(missing.value)


def test_token_and_tenant_travel_as_metadata(fake: tuple[Fake, str]) -> None:
    servicer, target = fake
    with Client(target, token="s3cret", timeout=5) as client:
        client.get_tenant("acme")
        list(client.stream("hi", tenant_id="globex"))
    assert servicer.metadata[0]["authorization"] == "Bearer s3cret"
    assert servicer.metadata[0]["x-tenant-id"] == "acme"
    assert servicer.metadata[1]["x-tenant-id"] == "globex"
    assert servicer.metadata[1]["user-agent"].startswith("loramerge-client/")
    with Client(target, timeout=5) as client:
        list(client.stream("hi"))
    assert "authorization" not in servicer.metadata[2] and "x-tenant-id" not in servicer.metadata[2]


def test_export_checks_digests_and_leaves_nothing_on_failure(
    fake: tuple[Fake, str], tmp_path: Path
) -> None:
    servicer, target = fake
    good = b'{"r": 8}'
    servicer.export_files = [("adapter_config.json", good, hashlib.sha256(good).hexdigest())]
    with Client(target, timeout=5) as client:
        out = client.export(tmp_path / "ok", preference={"a": 1.0})
        assert (out / "adapter_config.json").read_bytes() == good
        servicer.export_files.append(("adapter_model.safetensors", b"xx", "0" * 64))
        with pytest.raises(InvalidArgument, match="SHA-256"):
            client.export(tmp_path / "corrupt", preference={"a": 1.0})
        servicer.export_files = [("../escape", good, hashlib.sha256(good).hexdigest())]
        with pytest.raises(InvalidArgument, match="unsafe"):
            client.export(tmp_path / "escape", preference={"a": 1.0})
        with pytest.raises(FileExistsError):
            client.export(tmp_path / "ok", preference={"a": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no partial directories


def test_deadline_applies_to_every_call(fake: tuple[Fake, str]) -> None:
    servicer, target = fake
    servicer.failures = 100
    patient = Retry(attempts=100, initial_backoff=0.2)
    with Client(target, retry=patient, timeout=0.5) as client, pytest.raises(Unavailable):
        client.get_tenant("acme")
    assert servicer.calls["GetTenant"] < 10  # retries stop at the deadline


def test_route_options_travel_in_merge_options() -> None:
    from loramerge_client import MergeOptions, RouteOptions
    from loramerge_client._convert import merge_options, merge_options_from

    for route in (True, {"enabled": True}, RouteOptions(enabled=True)):
        message = merge_options(MergeOptions(route=route))
        assert message.route.enabled and not message.route.HasField("temperature")
    detailed = merge_options({"route": {"enabled": False, "temperature": 0.1, "min_weight": 0.2}})
    back = merge_options_from(detailed)
    assert back.route == RouteOptions(enabled=False, temperature=0.1, min_weight=0.2)
    assert merge_options_from(merge_options(MergeOptions(method="ta"))).route is None
    with pytest.raises(TypeError, match="unknown route option"):
        merge_options({"route": {"temperture": 0.1}})
