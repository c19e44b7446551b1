"""Protobuf ↔ domain translation: the only module that knows both."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from google.protobuf.timestamp_pb2 import Timestamp

from loramerge.merge_engine import (
    LoraAdapter,
    MergedDiagnostics,
    PoolDiagnostics,
    TaraPhi,
    validate_adapter_name,
)
from loramerge.merge_engine.diagnostics import ModuleDiagnostics, SpectrumStats, Summary
from loramerge.merge_engine.methods.parameters import PARAMETERS
from loramerge.v1 import adapters_pb2, inference_pb2, merge_pb2, merges_pb2, tenants_pb2

from .domain import MergeChoice, RouteChoice, TenantRecord, TunedSummary, TunedWeights
from .errors import InvalidRequestError, shown
from .tuning import TuningStatus
from .versions import Version

_PARAMETERS = tuple(PARAMETERS)
MAX_PREFERENCE_ENTRIES = 64
MAX_NAME = 64  # method names and string parameters
MAX_PARAMETER = 1e3  # |scaling|, |mix|, ...: larger only overflows the merge
MAX_SEED = 2**63 - 1
MAX_RANK = 512  # vLLM's largest max_lora_rank
MAX_PHI = 1e3  # |φ|: TARA weights beyond it only blow the merge up
MAX_MODULES = 4096  # modules of one φ
MAX_COMPONENTS = MAX_PREFERENCE_ENTRIES * MAX_RANK  # the largest shared basis
MAX_MODULE_KEY = 512
MAX_FINGERPRINT = 128
_TUNING_STATES = {
    "active": tenants_pb2.Tuning.STATE_ACTIVE,
    "stale": tenants_pb2.Tuning.STATE_STALE,
    "running": tenants_pb2.Tuning.STATE_RUNNING,
    "failed": tenants_pb2.Tuning.STATE_FAILED,
}
_FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "abort": inference_pb2.FINISH_REASON_ABORT,
}


def preference_from_proto(values: Mapping[str, float], field: str) -> dict[str, float]:
    """Copy a proto preference map, rejecting too many entries and NaN, infinite and negative
    weights early."""
    if len(values) > MAX_PREFERENCE_ENTRIES:
        raise InvalidRequestError(
            field, f"at most {MAX_PREFERENCE_ENTRIES} entries, got {len(values)}"
        )
    for name, weight in values.items():
        if not math.isfinite(weight) or weight < 0:
            raise InvalidRequestError(
                f"{field}[{shown(name)}]", f"weight must be finite and ≥ 0, got {weight}"
            )
    return dict(values)


def merge_choice_from_proto(options: merge_pb2.MergeOptions) -> MergeChoice:
    """The options a message states; unset fields stay None. Numbers are checked against
    bounds that keep every method's arithmetic finite (the methods check their own ranges)."""
    parameters = options.parameters
    params: dict[str, Any] = {
        name: getattr(parameters, name) for name in _PARAMETERS if parameters.HasField(name)
    }
    for name, value in params.items():
        _check_parameter(f"merge.parameters.{name}", value)
    if len(options.method) > MAX_NAME:
        raise InvalidRequestError("merge.method", f"{shown(options.method)} is not a method")
    return MergeChoice(
        method=options.method or None,
        pico=options.pico if options.HasField("pico") else None,
        params=MappingProxyType(params),
        svc=options.svc if options.HasField("svc") else None,
        rank=options.rank if options.HasField("rank") else None,
        energy_compensation=(
            options.energy_compensation if options.HasField("energy_compensation") else None
        ),
        route=route_choice_from_proto(options.route),
    )


def route_choice_from_proto(options: merge_pb2.RouteOptions) -> RouteChoice:
    """The routing options a message states (ranges are checked where they are resolved,
    `selection.route_params`, for every transport alike); numbers must be finite."""
    values: dict[str, Any] = {}
    for name in ("enabled", "temperature", "min_weight"):
        if options.HasField(name):
            value = getattr(options, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequestError(f"merge.route.{name}", f"must be finite, got {value}")
            values[name] = value
    return RouteChoice(**values)


def _check_parameter(field: str, value: Any) -> None:
    if isinstance(value, str):
        if len(value) > MAX_NAME:
            raise InvalidRequestError(field, f"{shown(value)} is not a valid value")
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_PARAMETER:
            raise InvalidRequestError(
                field, f"must be finite, |x| ≤ {MAX_PARAMETER:g}; got {value}"
            )
    elif field.endswith(".seed") and value > MAX_SEED:
        raise InvalidRequestError(field, f"must be ≤ {MAX_SEED} (2^63 - 1), got {value}")
    elif field.endswith(".branch_rank") and value > MAX_RANK:
        raise InvalidRequestError(field, f"must be ≤ {MAX_RANK}, got {value}")


def merge_choice_to_proto(choice: MergeChoice) -> merge_pb2.MergeOptions:
    options = merge_pb2.MergeOptions(method=choice.method or "")
    for name in ("pico", "svc", "rank", "energy_compensation"):
        value = getattr(choice, name)
        if value is not None:
            setattr(options, name, value)
    for name, value in choice.params.items():
        setattr(options.parameters, name, value)
    for name, value in choice.route.to_json().items():
        setattr(options.route, name, value)
    return options


def tenant_to_proto(record: TenantRecord, tuning: TuningStatus | None = None) -> tenants_pb2.Tenant:
    stamp = Timestamp()
    stamp.FromDatetime(record.updated_at)
    tenant = tenants_pb2.Tenant(
        tenant_id=record.tenant_id,
        preference=dict(record.preference),
        merge=merge_choice_to_proto(record.merge),
        version=record.version,
        update_time=stamp,
    )
    if tuning is not None:
        tenant.tuning.CopyFrom(tuning_to_proto(tuning))
    return tenant


def tuning_to_proto(status: TuningStatus) -> tenants_pb2.Tuning:
    return tenants_pb2.Tuning(
        state=_TUNING_STATES[status.state],
        phi_digest=status.digest,
        message=status.message,
        source=status.source,
        adapters=list(status.adapters),
        steps_done=status.steps_done,
        steps_total=status.steps_total,
    )


def tuned_from_proto(message: tenants_pb2.TunedWeights, field: str) -> TunedWeights:
    """TARA weights as a client sent them, checked for shape and bounds (every value finite,
    |φ| ≤ MAX_PHI, one row per adapter); the pool checks come later (`tuning.check_tuned`)."""
    adapters = list(message.adapters)
    if not 1 <= len(adapters) <= MAX_PREFERENCE_ENTRIES:
        raise InvalidRequestError(
            f"{field}.adapters", f"needs 1–{MAX_PREFERENCE_ENTRIES} names, got {len(adapters)}"
        )
    for index, name in enumerate(adapters):
        validate_adapter_name(name, f"{field}.adapters[{index}]")
    if len(set(adapters)) != len(adapters):
        raise InvalidRequestError(f"{field}.adapters", "names an adapter twice")
    fingerprints = list(message.adapter_fingerprints)
    if len(fingerprints) != len(adapters):
        raise InvalidRequestError(
            f"{field}.adapter_fingerprints",
            f"needs one per adapter ({len(adapters)}), got {len(fingerprints)}",
        )
    for index, fingerprint in enumerate(fingerprints):
        if not fingerprint or len(fingerprint) > MAX_FINGERPRINT:
            raise InvalidRequestError(
                f"{field}.adapter_fingerprints[{index}]", f"{shown(fingerprint)} is no fingerprint"
            )
    if len(message.pool_fingerprint) > MAX_FINGERPRINT:
        raise InvalidRequestError(f"{field}.pool_fingerprint", "is too long")
    preference = preference_from_proto(message.preference, f"{field}.preference")
    if not preference:
        raise InvalidRequestError(f"{field}.preference", "is empty: say what φ was tuned for")
    if not 1 <= len(message.modules) <= MAX_MODULES:
        raise InvalidRequestError(
            f"{field}.modules", f"needs 1–{MAX_MODULES} modules, got {len(message.modules)}"
        )
    modules: dict[str, torch.Tensor] = {}
    for index, module in enumerate(message.modules):
        where = f"{field}.modules[{index}]"
        if not module.module or len(module.module) > MAX_MODULE_KEY:
            raise InvalidRequestError(f"{where}.module", f"{shown(module.module)} is no module")
        if module.module in modules:
            raise InvalidRequestError(f"{where}.module", f"{module.module!r} is given twice")
        if not 1 <= module.components <= MAX_COMPONENTS:
            raise InvalidRequestError(
                f"{where}.components", f"must be in [1, {MAX_COMPONENTS}], got {module.components}"
            )
        expected = len(adapters) * module.components
        if len(module.values) != expected:
            raise InvalidRequestError(
                f"{where}.values",
                f"needs adapters × components = {len(adapters)} × {module.components} = "
                f"{expected} values, got {len(module.values)}",
            )
        values = torch.tensor(list(module.values), dtype=torch.float32)
        if not bool(torch.isfinite(values).all()) or float(values.abs().max()) > MAX_PHI:
            bad = next(v for v in module.values if not math.isfinite(v) or abs(v) > MAX_PHI)
            raise InvalidRequestError(
                f"{where}.values", f"every weight must be finite, |φ| ≤ {MAX_PHI:g}; got {bad}"
            )
        modules[module.module] = values.reshape(len(adapters), module.components)
    phi = TaraPhi(adapters, modules)
    summary = TunedSummary(
        digest=phi.digest,
        adapters=phi.adapters,
        adapter_fingerprints=tuple(fingerprints),
        preference=MappingProxyType(preference),
        pool_fingerprint=message.pool_fingerprint,
        source="file",
    )
    return TunedWeights(summary, phi)


def finish_reason(reason: str | None) -> int:
    return int(_FINISH.get(reason or "", inference_pb2.FINISH_REASON_UNSPECIFIED))


def adapter_to_proto(adapter: LoraAdapter) -> adapters_pb2.AdapterInfo:
    return adapters_pb2.AdapterInfo(
        name=adapter.name,
        path=str(adapter.path),
        rank=max(module.rank for module in adapter.modules.values()),
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in adapter.modules}),
        fingerprint=adapter.fingerprint,
        base_model=adapter.base_model or "",
    )


def merge_response(version: Version, cached: bool) -> merges_pb2.MergeResponse:
    report = version.report
    response = merges_pb2.MergeResponse(
        adapter_id=version.adapter_id,
        cached=cached,
        rank=report.rank,
        retained_energy_min=report.retained_energy_min,
        retained_energy_mean=report.retained_energy_mean,
        merged_norm=report.merged_norm,
        final_norm=report.final_norm,
        phase_seconds=dict(version.phase_seconds),
        pool_fingerprint=version.key.pool_fingerprint,
        method=report.method,
        preference=dict(report.preference),
        phi_digest=report.phi or "",
    )
    if report.calibration_cache_hit is not None:
        response.calibration_cache_hit = report.calibration_cache_hit
    return response


def _summary(summary: Summary) -> adapters_pb2.DiagnosticsSummary:
    return adapters_pb2.DiagnosticsSummary(
        modules=summary.modules,
        mean_overlap_b=summary.mean_overlap_b,
        mean_overlap_a=summary.mean_overlap_a,
        mean_effective_rank_b=summary.mean_effective_rank_b,
        mean_effective_rank_a=summary.mean_effective_rank_a,
        mean_shared_energy=list(summary.mean_shared_energy),
    )


def _matrix(rows: tuple[tuple[float, ...], ...]) -> adapters_pb2.Matrix:
    return adapters_pb2.Matrix(size=len(rows), values=[v for row in rows for v in row])


def _module(item: ModuleDiagnostics) -> adapters_pb2.ModuleDiagnostics:
    return adapters_pb2.ModuleDiagnostics(
        module=item.module,
        overlap_b=_matrix(item.overlap_b),
        overlap_a=_matrix(item.overlap_a),
        effective_rank_b=list(item.effective_rank_b),
        effective_rank_a=list(item.effective_rank_a),
        shared_energy=list(item.shared_energy),
        shared_contribution=[v for row in item.shared_contribution for v in row],
    )


def _spectrum(stats: SpectrumStats) -> adapters_pb2.SpectrumStats:
    return adapters_pb2.SpectrumStats(
        max_energy_share=stats.max_energy_share,
        effective_rank=stats.effective_rank,
        stable_rank=stats.stable_rank,
        condition_number=stats.condition_number,
        frobenius_norm=stats.frobenius_norm,
    )


def diagnostics_response(
    pool: PoolDiagnostics, merged: MergedDiagnostics | None, per_module: bool
) -> adapters_pb2.GetDiagnosticsResponse:
    response = adapters_pb2.GetDiagnosticsResponse(
        adapters=list(pool.adapters),
        overall=_summary(pool.overall),
        by_module_type={kind: _summary(s) for kind, s in pool.by_module_type.items()},
        modules=[_module(m) for m in pool.modules] if per_module else [],
    )
    if merged is not None:
        response.merged_without_pico.CopyFrom(_spectrum(merged.mean_without_pico))
        response.merged_with_pico.CopyFrom(_spectrum(merged.mean_with_pico))
    return response
