"""Python values ↔ loramerge.v1 messages (shared by Client and AsyncClient)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from .tuning import read_phi_file
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
    Tuning,
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


TunedLike = str | Path | Mapping[str, Any]
"""TARA weights: a phi.json path, or its content as a dict."""


def set_tenant_request(
    tenant_id: str,
    preference: Mapping[str, float] | None,
    merge: MergeOptionsLike | None,
    expected_version: int | None,
    tuned: TunedLike | None = None,
) -> tenants_pb2.SetTenantRequest:
    request = tenants_pb2.SetTenantRequest(
        tenant=tenants_pb2.Tenant(
            tenant_id=tenant_id, preference=dict(preference or {}), merge=merge_options(merge)
        )
    )
    if expected_version is not None:
        request.expected_version = expected_version
    if tuned is not None:
        request.tuned.CopyFrom(tuned_weights(tuned))
    return request


def tuned_weights(value: TunedLike) -> tenants_pb2.TunedWeights:
    """The TunedWeights message of a phi.json (path or content)."""
    data = read_phi_file(value) if isinstance(value, str | Path) else value
    message = tenants_pb2.TunedWeights(
        adapters=list(data["adapters"]),
        adapter_fingerprints=list(data["adapter_fingerprints"]),
        preference={k: float(v) for k, v in data["preference"].items()},
        pool_fingerprint=str(data.get("pool_fingerprint", "")),
    )
    for key, rows in data["modules"].items():
        components = len(rows[0]) if rows else 0
        message.modules.add(
            module=key, components=components, values=[float(v) for row in rows for v in row]
        )
    return message


def tuning(message: tenants_pb2.Tuning) -> Tuning:
    state = tenants_pb2.Tuning.State.Name(message.state).removeprefix("STATE_").lower()
    return Tuning(
        state=state,
        phi_digest=message.phi_digest,
        message=message.message,
        source=message.source,
        adapters=list(message.adapters),
        steps_done=message.steps_done,
        steps_total=message.steps_total,
    )


def tenant(message: tenants_pb2.Tenant) -> Tenant:
    return Tenant(
        tenant_id=message.tenant_id,
        preference=dict(message.preference),
        merge=merge_options_from(message.merge),
        version=message.version,
        update_time=message.update_time.ToDatetime(tzinfo=UTC),
        tuning=tuning(message.tuning) if message.HasField("tuning") else None,
    )


PromptLike = str | tuple[str, str | None] | Mapping[str, Any]
"""A tuning prompt: its text, (text, task), or {"prompt": ..., "task": ...}."""


def tune_tenant_request(
    tenant_id: str,
    prompts: Sequence[PromptLike],
    steps: int | None,
    learning_rate: float | None,
) -> tenants_pb2.TuneTenantRequest:
    request = tenants_pb2.TuneTenantRequest(tenant_id=tenant_id)
    for item in prompts:
        if isinstance(item, str):
            text, task = item, None
        elif isinstance(item, Mapping):
            text, task = item["prompt"], item.get("task")
        else:
            text, task = item
        request.prompts.add(prompt=text, task=task or "")
    if steps is not None:
        request.steps = steps
    if learning_rate is not None:
        request.learning_rate = learning_rate
    return request


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
        phi_digest=message.phi_digest,
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
