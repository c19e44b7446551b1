"""Which merged adapter serves a request: tenant, inline preference and overrides resolved
against the server's defaults."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from loramerge.merge_engine import (
    METHODS,
    AdapterPool,
    InvalidArgumentError,
    MergeSpec,
    normalize_preference,
)

from .config import Settings
from .domain import MergeChoice, validate_tenant_id
from .errors import ConfigError, ConflictError, InvalidRequestError
from .registry import AdapterRegistry
from .store import Store
from .tuning import PhiCache, apply_tuned

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """A resolved merge: the pool, the spec, ρ (pool order) and the hot tenant to pin for."""

    pool: AdapterPool
    spec: MergeSpec
    rho: tuple[float, ...]
    pin_for: str | None
    fallback_for: tuple[str, ...] = ()
    """Adapters without input statistics that made the default method fall back (else ())."""


def default_choice(settings: Settings) -> MergeChoice:
    merge = settings.merge
    return MergeChoice(
        method=merge.method,
        pico=merge.pico,
        params=MappingProxyType(dict(merge.params)),
        svc=merge.svc,
        energy_compensation=True,
    )


def spec_for(choice: MergeChoice, max_rank: int) -> MergeSpec:
    """A validated MergeSpec with its parameters resolved once (the version key and the merge
    reuse them); the rank is capped by the engine's max LoRA rank."""
    spec = MergeSpec(
        method=choice.method or "ta",
        params=dict(choice.params),
        pico=bool(choice.pico),
        energy_compensation=choice.energy_compensation is not False,
        svc=bool(choice.svc),
        rank=min(choice.rank or max_rank, max_rank),
    )
    # raises InvalidParameterError naming the field
    return dataclasses.replace(spec, params=spec.resolved_params())


class Selector:
    def __init__(self, settings: Settings, store: Store, registry: AdapterRegistry) -> None:
        self._settings = settings
        self._store = store
        self._registry = registry
        self.phis = PhiCache(store)  # tenants' TARA weights, by digest
        self._defaults = default_choice(settings)
        self._fallback = MergeChoice(
            method=settings.merge.fallback_method,
            pico=settings.merge.fallback_pico,
            energy_compensation=True,
        )
        self._hot = frozenset(settings.merge.hot_tenants)
        self._warned: set[str] = set()  # pool fingerprints whose fallback was logged
        self._check_settings()

    def _check_settings(self) -> None:
        """The server's own merge settings fail at start, not later as a client's error."""
        for choice, method_field in (
            (self._defaults, "merge.method"),
            (self._fallback, "merge.fallback_method"),
        ):
            try:
                spec_for(choice, self._settings.engine.max_lora_rank)
            except InvalidArgumentError as err:
                name = str(err.field).removeprefix("params.")
                field = method_field if name == "method" else f"merge.params.{name}"
                raise ConfigError(f"invalid server setting: {err}", field) from None
        for index, tenant_id in enumerate(self._settings.merge.hot_tenants):
            try:
                validate_tenant_id(tenant_id, f"merge.hot_tenants[{index}]")
            except InvalidRequestError as err:
                raise ConfigError(f"invalid server setting: {err}", err.field) from None

    def require_pool(self) -> AdapterPool:
        pool = self._registry.pool
        if pool is None:
            raise ConflictError("no adapters are registered: register one first", "preference")
        return pool

    def validate(self, preference: Mapping[str, float], choice: MergeChoice) -> None:
        """Check a preference and options as a tenant would store them."""
        if preference:
            normalize_preference(preference, self.require_pool().names)
        spec_for(choice.over(self._defaults), self._settings.engine.max_lora_rank)

    async def select(
        self, tenant_id: str, preference: Mapping[str, float], overrides: MergeChoice
    ) -> Selection | None:
        """The merge serving a request; None for the base model (no preference anywhere)."""
        stored = MergeChoice()
        record = None
        inline = bool(preference)
        if tenant_id:
            validate_tenant_id(tenant_id)
            record = await asyncio.to_thread(self._store.get_tenant, tenant_id)
            stored = record.merge
            preference = preference or record.preference
        choice = overrides.over(stored).over(self._defaults)
        spec = spec_for(choice, self._settings.engine.max_lora_rank)  # even for the base model
        if not preference:
            return None
        pool = self.require_pool()
        rho = normalize_preference(preference, pool.names)
        lacking: tuple[str, ...] = ()
        if overrides.method is None and stored.method is None:
            spec, lacking = self._fall_back(spec, pool, rho)
        if record is not None:  # the tenant's TARA weights, where they apply (server/tuning.py)
            spec = await apply_tuned(self.phis, record, pool, spec, inline)
        return Selection(pool, spec, rho, tenant_id if tenant_id in self._hot else None, lacking)

    def _fall_back(
        self, spec: MergeSpec, pool: AdapterPool, rho: tuple[float, ...]
    ) -> tuple[MergeSpec, tuple[str, ...]]:
        """The default `spec`, or the fallback's when the default method needs input statistics
        that an adapter taking part lacks; with the adapters that lack them."""
        if not METHODS.get(spec.method).needs_statistics:
            return spec, ()
        taking_part = (a for a, w in zip(pool.adapters, rho, strict=True) if w > 0)
        lacking = tuple(a.name for a in taking_part if a.statistics is None)
        if not lacking:
            return spec, ()
        fallback = spec_for(self._fallback, self._settings.engine.max_lora_rank)
        if pool.fingerprint not in self._warned:
            self._warned.add(pool.fingerprint)
            logger.warning(
                "the default merge method %s needs input statistics that adapters %s lack "
                "(write them with `loramerge stats`); merges including them use %s%s",
                spec.method,
                ", ".join(lacking),
                fallback.method,
                " + pico" if fallback.pico else "",
            )
        return fallback, lacking
