"""The server's domain values, independent of protobuf and of storage."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from loramerge.merge_engine import TaraPhi

from .errors import InvalidRequestError, shown

_TENANT_ID = re.compile(r"[A-Za-z0-9._@:-]{1,128}")
ROLES = ("admin", "tenant")


def validate_tenant_id(tenant_id: str, field_name: str = "tenant_id") -> str:
    if not _TENANT_ID.fullmatch(tenant_id):
        raise InvalidRequestError(
            field_name,
            f"{shown(tenant_id)} is not a valid tenant id (1–128 of letters, digits, '._-@:')",
        )
    return tenant_id


@dataclass(frozen=True)
class RouteChoice:
    """Routing options (preference from the prompt, server/router.py) as a tenant or a request
    states them: None means "not said"."""

    enabled: bool | None = None
    temperature: float | None = None
    min_weight: float | None = None

    def over(self, base: RouteChoice) -> RouteChoice:
        """These options where said, else `base`'s."""
        return RouteChoice(
            enabled=self.enabled if self.enabled is not None else base.enabled,
            temperature=self.temperature if self.temperature is not None else base.temperature,
            min_weight=self.min_weight if self.min_weight is not None else base.min_weight,
        )

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass(frozen=True)
class MergeChoice:
    """Merge options as a tenant or a request states them: None means "not said"."""

    method: str | None = None
    pico: bool | None = None
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    svc: bool | None = None
    rank: int | None = None
    energy_compensation: bool | None = None
    route: RouteChoice = field(default_factory=RouteChoice)

    def over(self, base: MergeChoice) -> MergeChoice:
        """These options where said, else `base`'s. Parameters only carry over when the
        method stays the same (another method's parameters would not apply)."""
        method = self.method if self.method is not None else base.method
        params = dict(base.params) if method == base.method else {}
        params.update(self.params)
        return MergeChoice(
            method=method,
            pico=self.pico if self.pico is not None else base.pico,
            params=MappingProxyType(params),
            svc=self.svc if self.svc is not None else base.svc,
            rank=self.rank if self.rank is not None else base.rank,
            energy_compensation=(
                self.energy_compensation
                if self.energy_compensation is not None
                else base.energy_compensation
            ),
            route=self.route.over(base.route),
        )

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["params"] = dict(self.params)
        data["route"] = self.route.to_json()
        return {key: value for key, value in data.items() if value not in (None, {})}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MergeChoice:
        values = dict(data)
        values["params"] = MappingProxyType(dict(values.get("params", {})))
        values["route"] = RouteChoice(**values.get("route", {}))
        return cls(**values)


TUNED_SOURCES = ("file", "prompts")


@dataclass(frozen=True)
class TunedSummary:
    """What a tenant version's TARA weights φ were tuned for. φ itself is stored apart, by
    `digest` (a tenant's records stay small; φ is read only to merge)."""

    digest: str  # TaraPhi.digest
    adapters: tuple[str, ...]  # φ's rows: the merged adapters, pool order
    adapter_fingerprints: tuple[str, ...]  # their content fingerprints, same order
    preference: Mapping[str, float]  # normalised, the adapters of the pool when tuned
    pool_fingerprint: str  # informational
    source: str  # "file" or "prompts"

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(
            adapters=list(self.adapters),
            adapter_fingerprints=list(self.adapter_fingerprints),
            preference=dict(self.preference),
        )
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TunedSummary:
        return cls(
            digest=str(data["digest"]),
            adapters=tuple(data["adapters"]),
            adapter_fingerprints=tuple(data["adapter_fingerprints"]),
            preference=MappingProxyType({k: float(v) for k, v in data["preference"].items()}),
            pool_fingerprint=str(data["pool_fingerprint"]),
            source=str(data["source"]),
        )


@dataclass(frozen=True)
class TunedWeights:
    """A tenant's TARA weights with what they were tuned for."""

    summary: TunedSummary
    phi: TaraPhi


@dataclass(frozen=True)
class TenantRecord:
    """One stored version of a tenant."""

    tenant_id: str
    preference: Mapping[str, float]
    merge: MergeChoice
    version: int
    updated_at: datetime  # timezone-aware UTC
    tuned: TunedSummary | None = None  # TARA φ of this version, if it has one


@dataclass(frozen=True)
class AdapterRegistration:
    """An adapter registered through the API (persisted so it survives restarts)."""

    name: str
    path: Path
    registered_at: datetime


@dataclass(frozen=True)
class ApiKey:
    """A stored API key: never the key itself, only `secret_hash` (see `server/auth.py`).
    `role` is "admin" or "tenant"; a tenant key acts only as `tenant_id`, and sends inline
    preferences or merge options only if `allow_inline`."""

    key_id: str
    secret_hash: str
    role: str
    tenant_id: str | None
    allow_inline: bool
    created_at: datetime  # timezone-aware UTC
    revoked_at: datetime | None = None
