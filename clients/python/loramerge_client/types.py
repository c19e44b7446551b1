"""The client's values: plain dataclasses (preferences are `dict[str, float]`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias

PARAMETERS = ("scaling", "density", "drop_rate", "majority_sign", "seed", "inner", "branch_rank",
              "mix", "off_diagonal")  # fmt: skip


@dataclass(frozen=True)
class RouteOptions:
    """Preference from the prompt: route each generation request to the adapters by its text
    (the server's docs/router.md). Unset fields: the tenant's value, then the server's."""

    enabled: bool | None = None
    temperature: float | None = None  # in [0, 10]; 0: the nearest adapter only
    min_weight: float | None = None  # in [0, 0.5]: smaller routed weights are dropped

    @classmethod
    def coerce(cls, value: RouteOptions | Mapping[str, Any] | bool | None) -> RouteOptions:
        """A RouteOptions from itself, a dict with the same keys, a bool (`enabled`) or None."""
        if value is None:
            return cls()
        if isinstance(value, RouteOptions):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        unknown = set(value) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise TypeError(f"unknown route option(s): {', '.join(sorted(unknown))}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {k: v for k, v in data.items() if v is not None}


@dataclass(frozen=True)
class MergeOptions:
    """How to merge the pool; every field is optional (unset: the tenant's value, then the
    server's default). `parameters` holds the method's parameters by name: scaling, density,
    drop_rate, majority_sign, seed, inner, branch_rank, mix, off_diagonal. `route` (a
    RouteOptions, a dict or True) routes generation requests by their prompt."""

    method: str | None = None
    pico: bool | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    svc: bool | None = None
    rank: int | None = None
    energy_compensation: bool | None = None
    route: RouteOptions | Mapping[str, Any] | bool | None = None

    @classmethod
    def coerce(cls, value: MergeOptionsLike | None) -> MergeOptions:
        """A MergeOptions from itself, a dict with the same keys, or None."""
        if value is None:
            return cls()
        if isinstance(value, MergeOptions):
            return value
        unknown = set(value) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise TypeError(f"unknown merge option(s): {', '.join(sorted(unknown))}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """The options that are set, as JSON-friendly values."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["parameters"] = dict(self.parameters)
        data["route"] = RouteOptions.coerce(self.route).to_dict()
        return {k: v for k, v in data.items() if v is not None and v != {}}


MergeOptionsLike: TypeAlias = "MergeOptions | Mapping[str, Any]"
Messages: TypeAlias = "list[dict[str, str]] | list[tuple[str, str]]"


@dataclass(frozen=True)
class Generation:
    """A finished completion. `adapter_id` is the merged version that served it ("" for the
    base model); `finish_reason` is "stop", "length" or "abort"."""

    text: str
    adapter_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationChunk(Generation):
    """A streamed piece, with the same fields: `text` is the delta since the previous chunk;
    `finish_reason` is set on the last chunk only (else ""); token counts are totals."""


@dataclass(frozen=True)
class Tuning:
    """A tenant's TARA tuning. `state`: "active" (φ serves the tenant's merges), "stale" (φ no
    longer fits the pool: the untuned merge serves; `message` says why), "running" (a tuning
    from prompts, `steps_done` of `steps_total`) or "failed" (`message` says why)."""

    state: str
    phi_digest: str
    message: str
    source: str  # "file" or "prompts"
    adapters: list[str]
    steps_done: int
    steps_total: int


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    preference: dict[str, float]
    merge: MergeOptions
    version: int
    update_time: datetime
    tuning: Tuning | None = None


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    rank: int
    target_modules: list[str]
    fingerprint: str
    base_model: str


@dataclass(frozen=True)
class RegisteredAdapter:
    adapter: Adapter
    pool_fingerprint: str
    warnings: list[str]


@dataclass(frozen=True)
class MergeReport:
    """What Merge did: the version id, whether it was cached, its rank, the energy kept by
    truncations, norms before/after compensation, seconds per phase."""

    adapter_id: str
    cached: bool
    rank: int
    retained_energy_min: float
    retained_energy_mean: float
    merged_norm: float
    final_norm: float
    phase_seconds: dict[str, float]
    calibration_cache_hit: bool | None
    pool_fingerprint: str
    method: str
    preference: dict[str, float]
    phi_digest: str = ""  # TARA weights merged with (a tuned tenant's), else ""
