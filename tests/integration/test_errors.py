"""Errors come back with the documented status codes, a message naming the field, and
structured details (google.rpc ErrorInfo / BadRequest)."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from harness import ServerProcess
from loramerge.v1 import inference_pb2, inference_pb2_grpc, merges_pb2, merges_pb2_grpc

pytestmark = pytest.mark.slow


def failure(call: object, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)  # type: ignore[operator]
    return info.value


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
ADD = {"add": 1.0}
GENERATE_ERRORS = [
    ({"prompt": "x", "preference": {"nope": 1.0}}, INVALID, "preference['nope']"),
    ({"prompt": "x", "preference": {"add": -1.0}}, INVALID, "preference['add']"),
    ({"prompt": "x", "preference": {"add": 0.0}}, INVALID, "preference"),
    ({"prompt": "x", "preference": ADD, "merge": {"method": "magic"}}, INVALID, "method"),
    (
        {
            "prompt": "x",
            "preference": ADD,
            "merge": {"method": "ties", "parameters": {"density": 2}},
        },
        INVALID,
        "density",
    ),
    (
        {"prompt": "x", "preference": ADD, "merge": {"method": "ta", "parameters": {"density": 1}}},
        INVALID,
        "params.density",
    ),
    ({"prompt": "x", "temperature": -1.0}, INVALID, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, INVALID, "max_tokens"),
    ({"messages": [{"role": "robot", "content": "x"}]}, INVALID, "messages[0].role"),
    ({}, INVALID, "prompt"),
    ({"prompt": "x", "tenant_id": "nobody-here"}, NOT_FOUND, "tenant_id"),
]


@pytest.mark.parametrize(("request_fields", "code", "field"), GENERATE_ERRORS)
def test_generate_errors(
    inference: inference_pb2_grpc.InferenceStub,
    request_fields: dict,
    code: grpc.StatusCode,
    field: str,
) -> None:
    error = failure(inference.Generate, inference_pb2.GenerateRequest(**request_fields))
    assert error.code() == code
    assert error.details().startswith(field)
    status = rpc_status.from_call(error)
    assert status is not None
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert infos, "ErrorInfo detail missing"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == "loramerge.v1"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = error_details_pb2.BadRequest()
        next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
        assert bad.field_violations[0].field.startswith(field.split("[")[0].split(".")[0])


def test_merge_without_anything_to_merge_is_invalid(merges: merges_pb2_grpc.MergesStub) -> None:
    error = failure(merges.Merge, merges_pb2.MergeRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_overload_is_resource_exhausted(inference: inference_pb2_grpc.InferenceStub) -> None:
    """More concurrent Generate calls than grpc.max_concurrent_requests (3 in these tests)."""
    request = inference_pb2.GenerateRequest(prompt="Tell me a long story", max_tokens=48)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(inference.Generate.future(request).exception) for _ in range(8)]
        errors = [f.result() for f in futures]
    codes = [e.code() for e in errors if e is not None]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert len(codes) < 8  # the ones within the limit succeeded
    assert all(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c in codes)


def test_unavailable_while_the_engine_starts(server: ServerProcess) -> None:
    """Observed during start-up: NOT_SERVING and UNAVAILABLE before SERVING."""
    observations = [what for _, what in server.startup]
    assert observations[-1] == "SERVING"
    assert "NOT_SERVING" in observations
    assert "Generate UNAVAILABLE" in observations
    assert "Generate OK" not in observations
