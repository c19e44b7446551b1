"""One merge, end to end: preference → (Pico) → rule → (SVC) → (truncate) → (compensation)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .adapter import LoraModule
from .device import resolve_device, resolve_dtype
from .errors import InvalidParameterError
from .linalg import LowRank, compact, frobenius_sq, pad_rank
from .methods.base import (
    MethodParams,
    SiteMoments,
    TaskSet,
    TaskStatistics,
    check_finite,
    check_positive_int,
)
from .methods.registry import METHODS
from .methods.tara import TaraPhi, basis_size, check_phi, stack_phi
from .pico import CalibrationCache, compensation
from .pool import AdapterPool, GroupStatistics
from .preference import normalize_preference
from .svc import svc

Progress = Callable[[int, int], None]  # (modules groups done, total)


@dataclass(frozen=True)
class MergeSpec:
    """What to merge with: a method, its parameters and the optional stages.

    `rank` is the target rank of methods that truncate a dense update (default: the summed
    rank of the merged adapters) and a cap for every method (the excess is truncated and the
    retained energy reported). `params` maps parameter names to values (or is the method's
    parameter dataclass). `phi` is TARA's tuned φ (method `tara` only): one [n, R] matrix per
    module, rows for the merged adapters in pool order; checked against the pool by `merge`.
    """

    method: str = "ta"
    params: Mapping[str, Any] | MethodParams = field(default_factory=dict)
    pico: bool = True
    energy_compensation: bool = True
    svc: bool = False
    svc_alpha: float = 1.0
    rank: int | None = None
    phi: TaraPhi | None = None

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        check_finite("svc_alpha", self.svc_alpha)
        if self.phi is not None and not isinstance(self.phi, TaraPhi):
            raise InvalidParameterError("phi", f"must be a TaraPhi, got {type(self.phi).__name__}")
        if self.phi is not None and not METHODS.get(self.method).takes_phi:
            raise InvalidParameterError(
                "phi", f"method {self.method!r} takes no φ (only tara does)"
            )

    def resolved_params(self) -> MethodParams:
        method = METHODS.get(self.method)
        if isinstance(self.params, MethodParams):
            given: MethodParams = self.params
            expected: type[MethodParams] = method.params_type
            if not isinstance(given, expected):
                raise InvalidParameterError(
                    "params", f"{type(given).__name__} are not parameters of {self.method!r}"
                )
            return given
        params: MethodParams = method.parse_params(self.params)
        return params


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: choices, resulting rank and energy, norms and phase timings."""

    method: str
    params: MethodParams
    pico: bool
    energy_compensation: bool
    svc: bool
    preference: Mapping[str, float]  # ρ, normalised
    rank: int
    retained_energy_min: float  # worst module's kept share of ‖ΔW‖² under truncation
    retained_energy_mean: float
    merged_norm: float  # ‖ΔW‖_F over all modules before energy compensation
    final_norm: float  # ‖ΔW‖_F over all modules as exported
    timings: Mapping[str, float]  # phase → seconds
    calibration_cache_hit: bool | None  # None without Pico
    device: str
    dtype: str
    phi: str | None = None  # digest of TARA's tuned φ when one was given

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON): nested dataclasses and mappings become dicts."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(
            params=dataclasses.asdict(self.params),
            preference=dict(self.preference),
            timings=dict(self.timings),
        )
        return data


@dataclass(frozen=True)
class MergeResult:
    """A merged adapter (scale folded: ΔW = lora_b @ lora_a, one rank for every module)."""

    pool_fingerprint: str
    base_model: str | None
    target_modules: tuple[str, ...]
    modules: Mapping[str, LoraModule]
    report: MergeReport

    @property
    def rank(self) -> int:
        return self.report.rank


class _PhaseTimer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def phi_sizes(pool: AdapterPool, active: tuple[int, ...]) -> dict[str, int]:
    """Module key → q, the size of TARA's shared basis when the adapters `active` (pool
    indices) are merged: the largest R a φ may give."""
    sizes = {}
    for module in pool.module_names:
        parts = [pool.adapters[i].modules[module] for i in active]
        sizes[module] = basis_size(
            parts[0].out_features, parts[0].in_features, [p.rank for p in parts]
        )
    return sizes


def task_statistics(
    stacks: tuple[GroupStatistics, ...], active: tuple[int, ...]
) -> tuple[TaskStatistics, ...]:
    """Per module group, the statistics of the adapters `active` (pool indices). Groups that
    share the pool's site stack share one `SiteMoments`: per-site work is done once a merge."""
    shared: dict[int, SiteMoments] = {}
    out = []
    for group in stacks:
        if id(group.moments) not in shared:
            shared[id(group.moments)] = SiteMoments(tuple(group.moments[i] for i in active))
        products = tuple(group.products[i] for i in active)
        sites = shared[id(group.moments)]
        out.append(TaskStatistics(sites, group.sites, group.in_order, products))
    return tuple(out)


def merge(
    pool: AdapterPool,
    preference: Mapping[str, float],
    spec: MergeSpec | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "float32",
    cache: CalibrationCache | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge `pool` for `preference` (adapter name → weight ≥ 0) as `spec` says.

    Runs on `device` ("auto": CUDA when available) in `dtype` (float32 or float64); Pico
    calibrations come from `cache` when given. Deterministic for the same inputs and device.
    """
    spec = spec or MergeSpec()
    params = spec.resolved_params()
    method = METHODS.get(spec.method)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    rho = normalize_preference(preference, pool.names)
    active = tuple(i for i, weight in enumerate(rho) if weight > 0)
    rho_active = torch.tensor([rho[i] for i in active], device=device, dtype=dtype)
    timer = _PhaseTimer(device)
    start = time.perf_counter()

    groups = pool.groups(device, dtype)
    statistics = (
        task_statistics(pool.statistics(device, dtype, active), active)
        if method.needs_statistics
        else None
    )
    if spec.phi is not None:
        check_phi(spec.phi, [pool.names[i] for i in active], phi_sizes(pool, active))
    hit: bool | None = None
    if spec.pico:
        with timer("calibrate"):
            source = cache if cache is not None else CalibrationCache(1)
            calibrations, hit = source.get(pool, active, device, dtype)

    outputs: list[LowRank] = []
    merged_sq = torch.zeros((), device=device, dtype=dtype)
    final_sq = torch.zeros((), device=device, dtype=dtype)
    for index, group in enumerate(groups):
        tasks = TaskSet(
            names=tuple(pool.names[i] for i in active),
            modules=group.modules,
            b=calibrations[index].lora_b if spec.pico else tuple(group.lora_b[i] for i in active),
            a=tuple(group.scaled_a[i] for i in active),
            rho=rho_active,
            statistics=None if statistics is None else statistics[index],
            phi=None if spec.phi is None else stack_phi(spec.phi, group.modules).to(device, dtype),
        )
        target_rank = min(spec.rank or tasks.total_rank, tasks.out_features, tasks.in_features)
        with timer("merge"):
            update = method.merge(tasks, params, target_rank)
        if spec.svc:
            with timer("svc"):
                update = svc(update, tasks, spec.svc_alpha)
        if spec.rank is not None and update.rank > spec.rank:
            with timer("truncate"):
                update = compact(update, spec.rank)
        norm = frobenius_sq(update.b, update.a).sqrt()  # [G]
        merged_sq = merged_sq + norm.square().sum()
        if spec.pico and spec.energy_compensation:
            with timer("compensate"):
                # the ρ-weighted mean norm of the ORIGINAL (uncalibrated) updates
                target = group.norms[:, list(active)] @ rho_active  # [G]
                factor = compensation(norm, target)
                update = update.with_factors(update.b * factor[:, None, None], update.a)
                norm = norm * factor
        final_sq = final_sq + norm.square().sum()
        outputs.append(update)
        if progress is not None:
            progress(index + 1, len(groups))

    rank = max(update.rank for update in outputs)
    modules: dict[str, LoraModule] = {}
    energies = []
    for group, update in zip(groups, outputs, strict=True):
        padded = pad_rank(update, rank)
        energies.append(update.retained_energy)
        for g, module in enumerate(group.modules):
            modules[module] = LoraModule(lora_a=padded.a[g], lora_b=padded.b[g], scale=1.0)
    energy = torch.cat(energies)
    timings = dict(timer.seconds, total=time.perf_counter() - start)
    report = MergeReport(
        method=spec.method,
        params=params,
        pico=spec.pico,
        energy_compensation=spec.pico and spec.energy_compensation,
        svc=spec.svc,
        preference=MappingProxyType(dict(zip(pool.names, rho, strict=True))),
        rank=rank,
        retained_energy_min=float(energy.min()),
        retained_energy_mean=float(energy.mean()),
        merged_norm=float(merged_sq.sqrt()),
        final_norm=float(final_sq.sqrt()),
        timings=MappingProxyType(timings),
        calibration_cache_hit=hit,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        phi=spec.phi.digest if spec.phi is not None else None,
    )
    return MergeResult(
        pool_fingerprint=pool.fingerprint,
        base_model=pool.base_model,
        target_modules=pool.target_modules,
        modules=MappingProxyType({name: modules[name] for name in pool.module_names}),
        report=report,
    )
