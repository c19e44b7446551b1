"""Python values ↔ loramerge.v1 messages (shared by Client and AsyncClient)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC
from typing import Any

from google.protobuf.json_format import MessageToDict

from .types import (
    PARAMETERS,
    Adapter,
    Generation,
    GenerationChunk,
    MergeOptions,
    MergeOptionsLike,
    MergeReport,
    Messages,
    RegisteredAdapter,
    RouteOptions,
    Tenant,
)
from .v1 import adapters_pb2, inference_pb2, merge_pb2, merges_pb2, tenants_pb2

_FINISH = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}


def merge_options(value: MergeOptionsLike | None) -> merge_pb2.MergeOptions:
    options = MergeOptions.coerce(value)
    message = merge_pb2.MergeOptions(method=options.method or "")
    for name in ("pico", "svc", "rank", "energy_compensation"):
        if getattr(options, name) is not None:
            setattr(message, name, getattr(options, name))
    for name, parameter in options.parameters.items():
        if name not in PARAMETERS:
            raise TypeError(f"unknown merge parameter {name!r}; known: {', '.join(PARAMETERS)}")
        setattr(message.parameters, name, parameter)
    for name, value in RouteOptions.coerce(options.route).to_dict().items():
        setattr(message.route, name, value)
    return message


def merge_options_from(message: merge_pb2.MergeOptions) -> MergeOptions:
    parameters = {
        n: getattr(message.parameters, n) for n in PARAMETERS if message.parameters.HasField(n)
    }
    return MergeOptions(
        method=message.method or None,
        pico=message.pico if message.HasField("pico") else None,
        parameters=parameters,
        svc=message.svc if message.HasField("svc") else None,
        rank=message.rank if message.HasField("rank") else None,
        energy_compensation=(
            message.energy_compensation if message.HasField("energy_compensation") else None
        ),
        route=RouteOptions(
            **{
                name: getattr(message.route, name)
                for name in RouteOptions.__dataclass_fields__
                if message.route.HasField(name)
            }
        )
        if message.HasField("route")
        else None,
    )


def _messages(messages: Messages) -> list[inference_pb2.ChatMessage]:
    turns = []
    for message in messages:
        if isinstance(message, Mapping):
            turns.append(
                inference_pb2.ChatMessage(role=message["role"], content=message["content"])
            )
        else:
            role, content = message
            turns.append(inference_pb2.ChatMessage(role=role, content=content))
    return turns


def generate_request(
    prompt: str | None,
    messages: Messages | None,
    tenant_id: str | None,
    preference: Mapping[str, float] | None,
    merge: MergeOptionsLike | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    stop: Sequence[str] | str | None,
    seed: int | None,
) -> inference_pb2.GenerateRequest:
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt and messages")
    request = inference_pb2.GenerateRequest(
        prompt=prompt or "",
        messages=_messages(messages or []),
        tenant_id=tenant_id or "",
        preference=dict(preference or {}),
        merge=merge_options(merge),
        top_k=top_k or 0,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
    )
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("seed", seed)):  # fmt: skip
        if value is not None:
            setattr(request, name, value)
    return request


def generation(
    response: inference_pb2.GenerateResponse | inference_pb2.GenerateStreamResponse,
    kind: type[Generation] = Generation,
) -> Generation:
    """A `Generation` (or, with kind=GenerationChunk, a chunk) from either response."""
    return kind(
        text=response.text,
        adapter_id=response.adapter_id,
        finish_reason=_FINISH.get(response.finish_reason, ""),
        prompt_tokens=response.prompt_tokens,
        completion_tokens=response.completion_tokens,
    )


def chunk(response: inference_pb2.GenerateStreamResponse) -> GenerationChunk:
    result = generation(response, GenerationChunk)
    assert isinstance(result, GenerationChunk)
    return result


def set_tenant_request(
    tenant_id: str,
    preference: Mapping[str, float],
    merge: MergeOptionsLike | None,
    expected_version: int | None,
) -> tenants_pb2.SetTenantRequest:
    request = tenants_pb2.SetTenantRequest(
        tenant=tenants_pb2.Tenant(
            tenant_id=tenant_id, preference=dict(preference), merge=merge_options(merge)
        )
    )
    if expected_version is not None:
        request.expected_version = expected_version
    return request


def tenant(message: tenants_pb2.Tenant) -> Tenant:
    return Tenant(
        tenant_id=message.tenant_id,
        preference=dict(message.preference),
        merge=merge_options_from(message.merge),
        version=message.version,
        update_time=message.update_time.ToDatetime(tzinfo=UTC),
    )


def adapter(message: adapters_pb2.AdapterInfo) -> Adapter:
    return Adapter(
        name=message.name,
        path=message.path,
        rank=message.rank,
        target_modules=list(message.target_modules),
        fingerprint=message.fingerprint,
        base_model=message.base_model,
    )


def merge_request(
    tenant_id: str | None, preference: Mapping[str, float] | None, merge: MergeOptionsLike | None
) -> merges_pb2.MergeRequest:
    return merges_pb2.MergeRequest(
        tenant_id=tenant_id or "", preference=dict(preference or {}), merge=merge_options(merge)
    )


def merge_report(message: merges_pb2.MergeResponse) -> MergeReport:
    return MergeReport(
        adapter_id=message.adapter_id,
        cached=message.cached,
        rank=message.rank,
        retained_energy_min=message.retained_energy_min,
        retained_energy_mean=message.retained_energy_mean,
        merged_norm=message.merged_norm,
        final_norm=message.final_norm,
        phase_seconds=dict(message.phase_seconds),
        calibration_cache_hit=(
            message.calibration_cache_hit if message.HasField("calibration_cache_hit") else None
        ),
        pool_fingerprint=message.pool_fingerprint,
        method=message.method,
        preference=dict(message.preference),
    )


def diagnostics_request(
    preference: Mapping[str, float] | None, merge: MergeOptionsLike | None, per_module: bool
) -> adapters_pb2.GetDiagnosticsRequest:
    return adapters_pb2.GetDiagnosticsRequest(
        per_module=per_module, preference=dict(preference or {}), merge=merge_options(merge)
    )


def diagnostics(message: adapters_pb2.GetDiagnosticsResponse) -> dict[str, Any]:
    """The diagnostics as JSON-like data (field names as in the proto)."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def registered(message: adapters_pb2.RegisterAdapterResponse) -> RegisteredAdapter:
    return RegisteredAdapter(
        adapter=adapter(message.adapter),
        pool_fingerprint=message.pool_fingerprint,
        warnings=list(message.warnings),
    )
