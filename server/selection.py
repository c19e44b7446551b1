"""Which merged adapter serves a request: tenant, inline preference and overrides resolved
against the server's defaults, and — for requests that opt in — the preference routed from the
prompt (server/router.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
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

from .config import RouterSettings, Settings
from .domain import MergeChoice, RouteChoice, validate_tenant_id
from .errors import ConfigError, ConflictError, InvalidRequestError
from .logs import annotate
from .metrics import Metrics
from .registry import AdapterRegistry
from .router import MAX_MIN_WEIGHT, MAX_TEMPERATURE, Route, RouteParams, Router, RouterError
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
    route: Route | None = None  # the routing decision, for routed requests


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


def route_params(route: RouteChoice, settings: RouterSettings) -> RouteParams:
    """The routing parameters of a request: its (or its tenant's) values, else the server's;
    out-of-range values are INVALID_ARGUMENT naming the field."""
    temperature = settings.temperature if route.temperature is None else route.temperature
    if not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequestError(
            "merge.route.temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {temperature}"
        )
    min_weight = settings.min_weight if route.min_weight is None else route.min_weight
    if not math.isfinite(min_weight) or not 0 <= min_weight <= MAX_MIN_WEIGHT:
        raise InvalidRequestError(
            "merge.route.min_weight", f"must be in [0, {MAX_MIN_WEIGHT:g}], got {min_weight}"
        )
    return RouteParams(temperature, min_weight, settings.preference_step)


class Selector:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: AdapterRegistry,
        router: Router | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`router`: None when routing is not offered (settings.router.enabled off)."""
        self._settings = settings
        self._store = store
        self._registry = registry
        self.phis = PhiCache(store)  # tenants' TARA weights, by digest
        self._router = router
        self._metrics = metrics
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
        route_params(choice.route, self._settings.router)

    async def select(
        self,
        tenant_id: str,
        preference: Mapping[str, float],
        overrides: MergeChoice,
        text: str | None = None,
    ) -> Selection | None:
        """The merge serving a request; None for the base model (no preference anywhere and no
        routing). `text`: the prompt to route by, None for requests without one (Merge,
        Export), which get the static preference."""
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
        params = route_params(choice.route, self._settings.router)
        default_method = overrides.method is None and stored.method is None
        if choice.route.enabled:
            routed = await self._route(text, preference, overrides.route.enabled is True, params)
            if routed is not None:  # not pinned: a routed tenant has one version per route
                pool, rho, route = routed
                spec, lacking = self._fall_back(spec, pool, rho) if default_method else (spec, ())
                return Selection(pool, spec, rho, None, lacking, route)
        if not preference:
            return None
        pool = self.require_pool()
        rho = normalize_preference(preference, pool.names)
        lacking: tuple[str, ...] = ()
        if default_method:
            spec, lacking = self._fall_back(spec, pool, rho)
        if record is not None:  # the tenant's TARA weights, where they apply (server/tuning.py)
            spec = await apply_tuned(self.phis, record, pool, spec, inline)
        return Selection(pool, spec, rho, tenant_id if tenant_id in self._hot else None, lacking)

    async def _route(
        self,
        text: str | None,
        preference: Mapping[str, float],
        asked: bool,
        params: RouteParams,
    ) -> tuple[AdapterPool, tuple[float, ...], Route] | None:
        """The routed preference, or None to serve the static one: the request has no prompt,
        or the router cannot route and the request did not ask for routing itself (only its
        tenant stored it). A request that asks itself gets an error instead."""
        if text is None:
            if asked:
                raise InvalidRequestError(
                    "merge.route.enabled",
                    "routing needs a prompt: Merge, Export and diagnostics use the preference",
                )
            return None
        if self._router is None:
            if asked:
                raise ConflictError("routing is not enabled on this server", "merge.route")
            self._count("unavailable")
            return None
        pool = self.require_pool()
        prior = normalize_preference(preference, pool.names) if preference else None
        start = time.perf_counter()
        try:
            route = await asyncio.to_thread(self._router.route, pool, text, prior, params)
        except RouterError as err:
            if asked:
                raise ConflictError(f"cannot route: {err}", "merge.route") from None
            self._count("unavailable")
            return None
        rho = route.rho
        if rho is None:  # the preference gives no routable adapter a weight
            self._count("prior_only")
            return None
        self._count("routed", rho, time.perf_counter() - start)
        top = max(range(len(rho)), key=lambda i: rho[i])
        annotate(route_top=pool.names[top], route_weight=round(rho[top], 4))
        return pool, rho, route

    def _count(
        self, outcome: str, rho: tuple[float, ...] | None = None, seconds: float = 0.0
    ) -> None:
        if self._metrics is None:
            return
        self._metrics.route_decisions.labels(outcome=outcome).inc()
        if rho is not None:
            self._metrics.route_duration.observe(seconds)
            self._metrics.route_top_weight.observe(max(rho))
            self._metrics.route_adapters.observe(sum(1 for w in rho if w > 0))

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
