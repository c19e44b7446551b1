"""A catalogue of hostile requests against the real server, for every RPC: each is answered with
its documented code and a message naming the field, its status stays far below gRPC's header
limit whatever was sent, and nothing changes (tenants, adapters, resident merged versions).

Most cases fail before any generation; none runs a LoRA generation."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ServerProcess
from loramerge.v1 import (
    adapters_pb2,
    inference_pb2,
    merge_pb2,
    merges_pb2,
    tenants_pb2,
)

pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
MAX_STATUS_BYTES = 8 * 1024  # all trailers of a failed call together
USER = "t-hostile-user"  # a tenant whose preference uses the first adapter

# RPC path → response type (requests are sent as raw bytes, so any bytes can be sent).
RPCS: dict[str, type[Message]] = {
    "/loramerge.v1.Tenants/SetTenant": tenants_pb2.SetTenantResponse,
    "/loramerge.v1.Tenants/GetTenant": tenants_pb2.GetTenantResponse,
    "/loramerge.v1.Tenants/ListTenants": tenants_pb2.ListTenantsResponse,
    "/loramerge.v1.Tenants/DeleteTenant": tenants_pb2.DeleteTenantResponse,
    "/loramerge.v1.Tenants/TuneTenant": tenants_pb2.TuneTenantResponse,
    "/loramerge.v1.Adapters/RegisterAdapter": adapters_pb2.RegisterAdapterResponse,
    "/loramerge.v1.Adapters/RemoveAdapter": adapters_pb2.RemoveAdapterResponse,
    "/loramerge.v1.Adapters/ListAdapters": adapters_pb2.ListAdaptersResponse,
    "/loramerge.v1.Adapters/GetDiagnostics": adapters_pb2.GetDiagnosticsResponse,
    "/loramerge.v1.Inference/Generate": inference_pb2.GenerateResponse,
    "/loramerge.v1.Inference/GenerateStream": inference_pb2.GenerateStreamResponse,
    "/loramerge.v1.Merges/Merge": merges_pb2.MergeResponse,
    "/loramerge.v1.Merges/Export": merges_pb2.ExportResponse,
}
STREAMING = ("/loramerge.v1.Inference/GenerateStream", "/loramerge.v1.Merges/Export")


def call(channel: grpc.Channel, path: str, request: bytes | Message, timeout: float = 60) -> Any:
    """Send `request` (a message or raw bytes) to `path`; the response(s)."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    kind = channel.unary_stream if path in STREAMING else channel.unary_unary
    method = kind(path, request_serializer=None, response_deserializer=RPCS[path].FromString)
    result = method(data, timeout=timeout)
    return list(result) if path in STREAMING else result


def failure(channel: grpc.Channel, path: str, request: bytes | Message) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(channel, path, request)
    return info.value


def status_bytes(error: grpc.RpcError) -> int:
    trailers = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    return len((error.details() or "").encode()) + sum(len(k) + len(v) for k, v in trailers)


def resident_versions(server: ServerProcess) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("loramerge_resident_adapters "):
            return float(line.split()[1])
    raise AssertionError("loramerge_resident_adapters is not exported")


def snapshot(channel: grpc.Channel, server: ServerProcess) -> tuple[Any, ...]:
    """What a rejected request must not change."""
    tenants = call(channel, "/loramerge.v1.Tenants/ListTenants", tenants_pb2.ListTenantsRequest())
    pool = call(channel, "/loramerge.v1.Adapters/ListAdapters", adapters_pb2.ListAdaptersRequest())
    return tenants.SerializeToString(), pool.pool_fingerprint, resident_versions(server)


# --- requests ---------------------------------------------------------------------------------

LONG = "x" * 100_000
U64 = 2**64 - 1


def _tenant(**fields: Any) -> tenants_pb2.SetTenantRequest:
    tenant = tenants_pb2.Tenant(**{"tenant_id": "t-hostile", **fields})
    return tenants_pb2.SetTenantRequest(tenant=tenant)


def _generate(**fields: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(**{"prompt": "hi", "max_tokens": 1, **fields})


def _tuned(first: str, values: list[float] | None = None, **fields: Any) -> Any:
    """SetTenant with TARA weights φ for `first` alone (one module, 2 components)."""
    module = tenants_pb2.ModuleWeights(
        module="base_model.model.model.layers.0.self_attn.q_proj",
        components=2,
        values=[0.5, 0.5] if values is None else values,
    )
    weights = {
        "adapters": [first],
        "adapter_fingerprints": ["f" * 64],
        "preference": {first: 1.0},
        "modules": [module],
        **fields,
    }
    return tenants_pb2.SetTenantRequest(
        tenant=_tenant().tenant, tuned=tenants_pb2.TunedWeights(**weights)
    )


def _tune(**fields: Any) -> tenants_pb2.TuneTenantRequest:
    prompts = [tenants_pb2.TuningPrompt(prompt="What is 1 + 2?")]
    return tenants_pb2.TuneTenantRequest(**{"tenant_id": USER, "prompts": prompts, **fields})


def _merge(**fields: Any) -> merges_pb2.MergeRequest:
    return merges_pb2.MergeRequest(**fields)


def _params(**values: Any) -> merge_pb2.MergeOptions:
    return merge_pb2.MergeOptions(method="ties", parameters=merge_pb2.MergeParameters(**values))


def _route(**values: Any) -> merge_pb2.MergeOptions:
    return merge_pb2.MergeOptions(route=merge_pb2.RouteOptions(**{"enabled": True, **values}))


_TENANTS, _ADAPTERS = "/loramerge.v1.Tenants/", "/loramerge.v1.Adapters/"
SET, GET, LIST, DELETE, TUNE = (
    _TENANTS + n for n in ("SetTenant", "GetTenant", "ListTenants", "DeleteTenant", "TuneTenant")
)
REGISTER, REMOVE, DIAGNOSE = (
    _ADAPTERS + n for n in ("RegisterAdapter", "RemoveAdapter", "GetDiagnostics")
)
GENERATE, STREAM = "/loramerge.v1.Inference/Generate", "/loramerge.v1.Inference/GenerateStream"
MERGE, EXPORT = "/loramerge.v1.Merges/Merge", "/loramerge.v1.Merges/Export"


def catalogue(first: str, root: Path) -> list[tuple[str, str, Any, grpc.StatusCode, str]]:
    """(case id, RPC, request, code, text the message must contain). `first` is a pool adapter,
    `root` the allowed root with broken adapters prepared by `hostile_adapters`."""
    ok = {first: 1.0}
    many = {f"a{i}": 1.0 for i in range(65)}
    cases: list[tuple[str, str, Any, grpc.StatusCode, str]] = [
        # Tenants
        ("set-empty-id", SET, _tenant(tenant_id=""), INVALID, "tenant.tenant_id"),
        ("set-id-newline", SET, _tenant(tenant_id="acme\n"), INVALID, "tenant.tenant_id"),
        ("set-id-100k", SET, _tenant(tenant_id=LONG), INVALID, "tenant.tenant_id"),
        ("set-id-space", SET, _tenant(tenant_id="a b"), INVALID, "tenant.tenant_id"),
        ("set-id-unicode", SET, _tenant(tenant_id="é"), INVALID, "tenant.tenant_id"),
        ("set-id-nul", SET, _tenant(tenant_id="a\x00"), INVALID, "tenant.tenant_id"),
        ("set-unknown-adapter", SET, _tenant(preference={"nope": 1.0}), INVALID, "nope"),
        ("set-nan", SET, _tenant(preference={first: float("nan")}), INVALID, "preference"),
        ("set-inf", SET, _tenant(preference={first: float("inf")}), INVALID, "preference"),
        ("set-negative", SET, _tenant(preference={first: -1.0}), INVALID, "preference"),
        ("set-zero", SET, _tenant(preference={first: 0.0}), INVALID, "preference"),
        ("set-65-entries", SET, _tenant(preference=many), INVALID, "at most 64"),
        ("set-adapter-100k", SET, _tenant(preference={LONG: 1.0}), INVALID, "preference"),
        ("set-method", SET, _tenant(preference=ok, merge={"method": "magic"}), INVALID, "method"),
        ("set-method-10k", SET, _tenant(merge={"method": "m" * 10_000}), INVALID, "method"),
        ("set-density", SET, _tenant(preference=ok, merge=_params(density=2)), INVALID, "density"),
        ("set-scaling", SET, _tenant(merge=_params(scaling=1e38)), INVALID, "scaling"),
        ("set-seed", SET, _tenant(merge=_params(seed=U64)), INVALID, "seed"),
        ("set-sign", SET, _tenant(merge=_params(majority_sign="z" * 500)), INVALID, "majority"),
        (
            "set-expected-2^63",
            SET,
            tenants_pb2.SetTenantRequest(tenant=_tenant().tenant, expected_version=2**63),
            INVALID,
            "expected_version",
        ),
        (
            "set-expected-999",
            SET,
            tenants_pb2.SetTenantRequest(tenant=_tenant().tenant, expected_version=999),
            PRECONDITION,
            "expected_version",
        ),
        # TARA weights φ (SetTenant.tuned): bounds, shapes and the pool, nothing stored
        ("tuned-nan", SET, _tuned(first, [0.5, float("nan")]), INVALID, "tuned.modules[0].values"),
        ("tuned-inf", SET, _tuned(first, [float("inf"), 0.5]), INVALID, "tuned.modules[0].values"),
        ("tuned-huge", SET, _tuned(first, [1e30, 0.5]), INVALID, "tuned.modules[0].values"),
        ("tuned-too-few", SET, _tuned(first, [0.5]), INVALID, "tuned.modules[0].values"),
        ("tuned-too-many", SET, _tuned(first, [0.5] * 3), INVALID, "tuned.modules[0].values"),
        (
            "tuned-100k-values",
            SET,
            _tuned(first, [0.5] * 100_000),
            INVALID,
            "tuned.modules[0].values",
        ),
        (
            "tuned-components-0",
            SET,
            _tuned(first, [], modules=[tenants_pb2.ModuleWeights(module="m", components=0)]),
            INVALID,
            "tuned.modules[0].components",
        ),
        ("tuned-no-adapters", SET, _tuned(first, adapters=[]), INVALID, "tuned.adapters"),
        ("tuned-bad-adapter", SET, _tuned(first, adapters=["a b"]), INVALID, "tuned.adapters[0]"),
        (
            "tuned-fingerprints",
            SET,
            _tuned(first, adapter_fingerprints=[]),
            INVALID,
            "tuned.adapter_fingerprints",
        ),
        ("tuned-no-modules", SET, _tuned(first, modules=[]), INVALID, "tuned.modules"),
        ("tuned-no-preference", SET, _tuned(first, preference={}), INVALID, "tuned.preference"),
        (
            "tuned-preference-nan",
            SET,
            _tuned(first, preference={first: float("nan")}),
            INVALID,
            "tuned.preference",
        ),
        ("tuned-wrong-pool", SET, _tuned(first), INVALID, "tuned.adapter_fingerprints[0]"),
        (
            "tuned-unknown-adapter",
            SET,
            _tuned(first, adapters=["nope"], preference={"nope": 1.0}),
            INVALID,
            "tuned.adapters[0]",
        ),
        (
            "tuned-method-ties",
            SET,
            tenants_pb2.SetTenantRequest(
                tenant=_tenant(merge={"method": "ties"}).tenant, tuned=_tuned(first).tuned
            ),
            INVALID,
            "tenant.merge.method",
        ),
        # TuneTenant: prompts and settings are checked before anything runs
        ("tune-no-prompts", TUNE, _tune(prompts=[]), INVALID, "prompts"),
        (
            "tune-4097-prompts",
            TUNE,
            _tune(prompts=[tenants_pb2.TuningPrompt(prompt="hi")] * 4097),
            INVALID,
            "prompts",
        ),
        (
            "tune-prompt-100k",
            TUNE,
            _tune(prompts=[tenants_pb2.TuningPrompt(prompt=LONG)]),
            INVALID,
            "prompts[0].prompt",
        ),
        (
            "tune-prompt-blank",
            TUNE,
            _tune(prompts=[tenants_pb2.TuningPrompt(prompt="  ")]),
            INVALID,
            "prompts[0].prompt",
        ),
        (
            "tune-task-unknown",
            TUNE,
            _tune(prompts=[tenants_pb2.TuningPrompt(prompt="hi", task="nope")]),
            INVALID,
            "prompts[0].task",
        ),
        (
            "tune-task-invalid",
            TUNE,
            _tune(prompts=[tenants_pb2.TuningPrompt(prompt="hi", task="a b")]),
            INVALID,
            "prompts[0].task",
        ),
        ("tune-steps-0", TUNE, _tune(steps=0), INVALID, "steps"),
        ("tune-steps-huge", TUNE, _tune(steps=2**32 - 1), INVALID, "steps"),
        ("tune-lr-nan", TUNE, _tune(learning_rate=float("nan")), INVALID, "learning_rate"),
        ("tune-lr-big", TUNE, _tune(learning_rate=5.0), INVALID, "learning_rate"),
        ("tune-lr-0", TUNE, _tune(learning_rate=0.0), INVALID, "learning_rate"),
        ("tune-id", TUNE, _tune(tenant_id="a b"), INVALID, "tenant_id"),
        ("tune-unknown", TUNE, _tune(tenant_id="t-nobody"), NOT_FOUND, "tenant_id"),
        (
            "get-version-2^63",
            GET,
            tenants_pb2.GetTenantRequest(tenant_id=USER, version=2**63),
            INVALID,
            "version",
        ),
        (
            "get-version-max",
            GET,
            tenants_pb2.GetTenantRequest(tenant_id=USER, version=U64),
            INVALID,
            "version",
        ),
        (
            "get-version-0",
            GET,
            tenants_pb2.GetTenantRequest(tenant_id=USER, version=0),
            INVALID,
            "version",
        ),
        (
            "get-version-absent",
            GET,
            tenants_pb2.GetTenantRequest(tenant_id=USER, version=99),
            NOT_FOUND,
            "version",
        ),
        (
            "get-unknown",
            GET,
            tenants_pb2.GetTenantRequest(tenant_id="t-nobody"),
            NOT_FOUND,
            "tenant_id",
        ),
        ("get-id-nul", GET, tenants_pb2.GetTenantRequest(tenant_id="x\x00"), INVALID, "tenant_id"),
        ("get-id-100k", GET, tenants_pb2.GetTenantRequest(tenant_id=LONG), INVALID, "tenant_id"),
        (
            "list-page-size",
            LIST,
            tenants_pb2.ListTenantsRequest(page_size=1001),
            INVALID,
            "page_size",
        ),
        (
            "list-page-max",
            LIST,
            tenants_pb2.ListTenantsRequest(page_size=2**32 - 1),
            INVALID,
            "page_size",
        ),
        (
            "list-token",
            LIST,
            tenants_pb2.ListTenantsRequest(page_token="a\n"),
            INVALID,
            "page_token",
        ),
        (
            "list-token-100k",
            LIST,
            tenants_pb2.ListTenantsRequest(page_token=LONG),
            INVALID,
            "page_token",
        ),
        (
            "delete-unknown",
            DELETE,
            tenants_pb2.DeleteTenantRequest(tenant_id="t-nobody"),
            NOT_FOUND,
            "tenant_id",
        ),
        (
            "delete-empty",
            DELETE,
            tenants_pb2.DeleteTenantRequest(tenant_id=""),
            INVALID,
            "tenant_id",
        ),
        (
            "delete-newline",
            DELETE,
            tenants_pb2.DeleteTenantRequest(tenant_id=f"{USER}\n"),
            INVALID,
            "tenant_id",
        ),
        # Adapters
        (
            "register-empty-name",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="", path=str(root / "copy")),
            INVALID,
            "name",
        ),
        (
            "register-name-newline",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="a\n", path=str(root / "copy")),
            INVALID,
            "name",
        ),
        (
            "register-name-64k",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="n" * 65536, path=str(root / "copy")),
            INVALID,
            "name",
        ),
        (
            "register-name-taken",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name=first, path=str(root / "copy")),
            grpc.StatusCode.ALREADY_EXISTS,
            "name",
        ),
        (
            "register-empty-path",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=""),
            INVALID,
            "path",
        ),
        (
            "register-nul-path",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=f"{root}/\x00x"),
            INVALID,
            "path",
        ),
        (
            "register-tilde-user",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path="~nosuchuser/x"),
            INVALID,
            "path",
        ),
        (
            "register-relative",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path="x/y"),
            INVALID,
            "path",
        ),
        (
            "register-path-100k",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path="/" + LONG),
            INVALID,
            "path",
        ),
        (
            "register-etc",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path="/etc"),
            DENIED,
            "path",
        ),
        (
            "register-dotdot",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=f"{root}/../.."),
            DENIED,
            "path",
        ),
        (
            "register-symlinked-files",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=str(root / "symlinked")),
            DENIED,
            "allowed root",
        ),
        (
            "register-missing",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=str(root / "missing")),
            NOT_FOUND,
            "does not exist",
        ),
        (
            "register-empty-dir",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=str(root / "empty")),
            NOT_FOUND,
            "adapter_config.json",
        ),
        (
            "register-nested-json",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=str(root / "nested")),
            INVALID,
            "nested too deeply",
        ),
        (
            "register-huge-config",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=str(root / "huge")),
            INVALID,
            "limit",
        ),
        (
            "register-garbage-weights",
            REGISTER,
            adapters_pb2.RegisterAdapterRequest(name="h1", path=str(root / "garbage")),
            INVALID,
            "safetensors",
        ),
        ("remove-empty", REMOVE, adapters_pb2.RemoveAdapterRequest(name=""), INVALID, "name"),
        (
            "remove-newline",
            REMOVE,
            adapters_pb2.RemoveAdapterRequest(name=f"{first}\n"),
            INVALID,
            "name",
        ),
        (
            "remove-unknown",
            REMOVE,
            adapters_pb2.RemoveAdapterRequest(name="nope"),
            NOT_FOUND,
            "name",
        ),
        (
            "remove-in-use",
            REMOVE,
            adapters_pb2.RemoveAdapterRequest(name=first),
            PRECONDITION,
            USER,
        ),
        (
            "diagnose-scaling",
            DIAGNOSE,
            adapters_pb2.GetDiagnosticsRequest(preference=ok, merge=_params(scaling=1e38)),
            INVALID,
            "scaling",
        ),
        (
            "diagnose-unknown",
            DIAGNOSE,
            adapters_pb2.GetDiagnosticsRequest(preference={"nope": 1}),
            INVALID,
            "nope",
        ),
        (
            "diagnose-method",
            DIAGNOSE,
            adapters_pb2.GetDiagnosticsRequest(preference=ok, merge={"method": "x"}),
            INVALID,
            "method",
        ),
        # Inference
        ("generate-temperature-3", GENERATE, _generate(temperature=3.0), INVALID, "temperature"),
        (
            "generate-temperature-nan",
            GENERATE,
            _generate(temperature=float("nan")),
            INVALID,
            "temperature",
        ),
        ("generate-top-p-0", GENERATE, _generate(top_p=0.0), INVALID, "top_p"),
        ("generate-top-p-1.5", GENERATE, _generate(top_p=1.5), INVALID, "top_p"),
        ("generate-max-tokens-0", GENERATE, _generate(max_tokens=0), INVALID, "max_tokens"),
        (
            "generate-max-tokens-max",
            GENERATE,
            _generate(max_tokens=2**32 - 1),
            INVALID,
            "max_tokens",
        ),
        ("generate-seed-max", GENERATE, _generate(seed=U64), INVALID, "seed"),
        ("generate-top-k-max", GENERATE, _generate(top_k=2**32 - 1), INVALID, "top_k"),
        ("generate-17-stops", GENERATE, _generate(stop=["s"] * 17), INVALID, "stop"),
        ("generate-empty-stop", GENERATE, _generate(stop=[""]), INVALID, "stop"),
        ("generate-long-stop", GENERATE, _generate(stop=["s" * 1000]), INVALID, "stop"),
        ("generate-prompt-1mb", GENERATE, _generate(prompt="word " * 200_000), INVALID, "prompt"),
        (
            "generate-300-messages",
            GENERATE,
            _generate(prompt="", messages=[{"role": "user", "content": "x"}] * 300),
            INVALID,
            "messages",
        ),
        (
            "generate-big-messages",
            GENERATE,
            _generate(prompt="", messages=[{"role": "user", "content": "y" * 200_000}]),
            INVALID,
            "messages",
        ),
        (
            "generate-role",
            GENERATE,
            _generate(prompt="", messages=[{"role": "robot", "content": "x"}]),
            INVALID,
            "messages[0].role",
        ),
        (
            "generate-both",
            GENERATE,
            _generate(messages=[{"role": "user", "content": "x"}]),
            INVALID,
            "prompt",
        ),
        ("generate-neither", GENERATE, _generate(prompt=""), INVALID, "prompt"),
        (
            "generate-tenant-newline",
            GENERATE,
            _generate(tenant_id=f"{USER}\n"),
            INVALID,
            "tenant_id",
        ),
        ("generate-tenant-100k", GENERATE, _generate(tenant_id=LONG), INVALID, "tenant_id"),
        (
            "generate-tenant-unknown",
            GENERATE,
            _generate(tenant_id="t-nobody"),
            NOT_FOUND,
            "tenant_id",
        ),
        (
            "generate-method-no-preference",
            GENERATE,
            _generate(merge={"method": "bogus"}),
            INVALID,
            "method",
        ),
        ("generate-65-entries", GENERATE, _generate(preference=many), INVALID, "at most 64"),
        (
            "generate-weight-inf",
            GENERATE,
            _generate(preference={first: float("inf")}),
            INVALID,
            "preference",
        ),
        ("stream-temperature-3", STREAM, _generate(temperature=3.0), INVALID, "temperature"),
        # The router (preference from the prompt)
        (
            "route-temperature-negative",
            GENERATE,
            _generate(merge=_route(temperature=-0.1)),
            INVALID,
            "merge.route.temperature",
        ),
        (
            "route-temperature-11",
            STREAM,
            _generate(merge=_route(temperature=11.0)),
            INVALID,
            "merge.route.temperature",
        ),
        (
            "route-temperature-nan",
            GENERATE,
            _generate(merge=_route(temperature=float("nan"))),
            INVALID,
            "merge.route.temperature",
        ),
        (
            "route-min-weight-0.9",
            GENERATE,
            _generate(merge=_route(min_weight=0.9)),
            INVALID,
            "merge.route.min_weight",
        ),
        (
            "route-min-weight-inf",
            GENERATE,
            _generate(merge=_route(min_weight=float("inf"))),
            INVALID,
            "merge.route.min_weight",
        ),
        (
            "route-unknown-prior",
            GENERATE,
            _generate(preference={"nope": 1.0}, merge=_route()),
            INVALID,
            "nope",
        ),
        (
            "set-route-temperature",
            SET,
            _tenant(preference=ok, merge=_route(temperature=1e9)),
            INVALID,
            "merge.route.temperature",
        ),
        ("merge-route", MERGE, _merge(preference=ok, merge=_route()), INVALID, "needs a prompt"),
        (
            "export-route",
            EXPORT,
            merges_pb2.ExportRequest(merge=_merge(preference=ok, merge=_route())),
            INVALID,
            "needs a prompt",
        ),
        ("stream-prompt-1mb", STREAM, _generate(prompt="é" * 500_000), INVALID, "prompt"),
        # Merges
        ("merge-nothing", MERGE, _merge(), INVALID, "preference"),
        (
            "merge-scaling",
            MERGE,
            _merge(preference=ok, merge=_params(scaling=1e38)),
            INVALID,
            "scaling",
        ),
        (
            "merge-method",
            MERGE,
            _merge(preference=ok, merge={"method": "bogus"}),
            INVALID,
            "method",
        ),
        (
            "merge-branch-rank",
            MERGE,
            _merge(preference=ok, merge=_params(branch_rank=2**32 - 1)),
            INVALID,
            "branch_rank",
        ),
        ("merge-tenant-unknown", MERGE, _merge(tenant_id="t-nobody"), NOT_FOUND, "tenant_id"),
        ("export-nothing", EXPORT, merges_pb2.ExportRequest(), INVALID, "preference"),
        (
            "export-tenant-newline",
            EXPORT,
            merges_pb2.ExportRequest(merge=_merge(tenant_id="a\n")),
            INVALID,
            "tenant_id",
        ),
    ]
    # Bytes that are not a valid message of the RPC: truncated, and a string that is not UTF-8.
    for path in RPCS:
        name = path.rsplit("/", 1)[1]
        cases.append((f"{name}-truncated", path, b"\x0a\xff", INVALID, "request"))
        if path in NOT_UTF8:
            cases.append((f"{name}-not-utf8", path, NOT_UTF8[path], INVALID, "request"))
    return cases


_BAD = b"\x02\xff\xfe"  # a length-2 string that is not UTF-8
NOT_UTF8 = {  # a string field of each request (ListAdaptersRequest has none), nested if need be
    SET: b"\x0a\x04\x0a" + _BAD,  # tenant.tenant_id
    GET: b"\x0a" + _BAD,
    LIST: b"\x12" + _BAD,  # page_token
    DELETE: b"\x0a" + _BAD,
    TUNE: b"\x0a" + _BAD,
    REGISTER: b"\x0a" + _BAD,
    REMOVE: b"\x0a" + _BAD,
    DIAGNOSE: b"\x1a\x04\x0a" + _BAD,  # merge.method
    GENERATE: b"\x0a" + _BAD,
    STREAM: b"\x0a" + _BAD,
    MERGE: b"\x0a" + _BAD,
    EXPORT: b"\x0a\x04\x0a" + _BAD,  # merge.tenant_id
}


@pytest.fixture(scope="module")
def hostile_adapters(allowed_root: Path, default_assets: Any, task_names: list[str]) -> Path:
    """Broken adapters inside the allowed root, and a valid copy of a pool adapter."""
    source = Path(default_assets.adapters[task_names[0]])
    root = allowed_root / "hostile"
    shutil.copytree(source, root / "copy", dirs_exist_ok=True)
    symlinked = root / "symlinked"  # a directory inside the root whose files point outside
    symlinked.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (symlinked / name).is_symlink():
            os.symlink(source / name, symlinked / name)
    (root / "empty").mkdir(exist_ok=True)
    weights = (source / "adapter_model.safetensors").read_bytes()
    for name, config in (
        ("nested", "[" * 100_000 + "]" * 100_000),
        ("huge", json.dumps({"r": 8, "padding": "p" * (2 << 20)})),
        ("garbage", json.dumps({"r": 8, "peft_type": "LORA", "target_modules": ["q_proj"]})),
    ):
        (root / name).mkdir(exist_ok=True)
        (root / name / "adapter_config.json").write_text(config)
        (root / name / "adapter_model.safetensors").write_bytes(
            b"not safetensors" if name == "garbage" else weights
        )
    return root


@pytest.fixture(scope="module")
def adapter_user(channel: grpc.Channel, task_names: list[str]) -> str:
    call(channel, SET, _tenant(tenant_id=USER, preference={task_names[0]: 1.0}))
    return USER


CASES = catalogue("FIRST", Path("/ROOT"))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0] for case in CASES])
def test_hostile_request(
    index: int,
    channel: grpc.Channel,
    server: ServerProcess,
    task_names: list[str],
    hostile_adapters: Path,
    adapter_user: str,
) -> None:
    _, path, request, code, text = catalogue(task_names[0], hostile_adapters)[index]
    before = snapshot(channel, server)
    error = failure(channel, path, request)
    assert error.code() == code, error.details()
    assert text in (error.details() or ""), error.details()
    assert status_bytes(error) < MAX_STATUS_BYTES
    assert snapshot(channel, server) == before
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_catalogue_is_large_and_covers_every_rpc() -> None:
    assert len(CASES) >= 60
    assert {case[1] for case in CASES} == set(RPCS)


def test_remove_with_force_removes_an_adapter_tenants_use(
    channel: grpc.Channel, allowed_root: Path, default_assets: Any, task_names: list[str]
) -> None:
    source = Path(default_assets.adapters[task_names[0]])
    shutil.copytree(source, allowed_root / "forced", dirs_exist_ok=True)
    register = adapters_pb2.RegisterAdapterRequest(name="forced", path=str(allowed_root / "forced"))
    call(channel, REGISTER, register)
    call(channel, SET, _tenant(tenant_id="t-forced", preference={"forced": 1.0}))
    error = failure(channel, REMOVE, adapters_pb2.RemoveAdapterRequest(name="forced"))
    assert error.code() == PRECONDITION and "t-forced" in (error.details() or "")
    call(channel, REMOVE, adapters_pb2.RemoveAdapterRequest(name="forced", force=True))
    pool = call(channel, "/loramerge.v1.Adapters/ListAdapters", adapters_pb2.ListAdaptersRequest())
    assert "forced" not in [a.name for a in pool.adapters]
    later = failure(channel, MERGE, _merge(tenant_id="t-forced"))  # the tenant is left to fix
    assert later.code() == INVALID and "forced" in (later.details() or "")
    call(channel, DELETE, tenants_pb2.DeleteTenantRequest(tenant_id="t-forced"))
