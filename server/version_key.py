"""What makes two merged adapters the same: the version key.

A key is (pool fingerprint, canonical merge spec — with the digest of TARA's φ when there is
one —, quantised preference). Preferences are rounded
to units of the preference step so that nearby preferences share one merged version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from loramerge.merge_engine import AdapterPool, MergeSpec


@dataclass(frozen=True)
class VersionKey:
    """What makes two merged adapters the same."""

    pool_fingerprint: str
    spec: str  # canonical JSON of the method, resolved parameters and stages
    preference: tuple[int, ...]  # ρ in units of the preference step, pool order

    def digest(self) -> str:
        text = f"{self.pool_fingerprint}|{self.spec}|{self.preference}"
        return hashlib.sha256(text.encode()).hexdigest()

    def simplex(self) -> tuple[float, ...]:
        """The quantised preference as weights that sum to 1."""
        total = sum(self.preference)
        return tuple(units / total for units in self.preference)


def quantize_preference(rho: tuple[float, ...], step: float) -> tuple[int, ...]:
    """Round ρ (on the simplex) to whole units of `step` by largest remainders.

    The units always sum to T = max(round(1/step), number of non-zero weights), so the result
    stays on the simplex, and every non-zero weight keeps at least one unit (a weight too small
    for one unit takes it from the most over-rounded weight). Zero weights stay zero. Ties go to
    the lower index, so the result is a function of ρ alone.
    """
    nonzero = [i for i, weight in enumerate(rho) if weight > 0]
    if not nonzero:
        raise ValueError("the preference has no positive weight")
    total = max(round(1 / step), len(nonzero))
    mass = sum(rho[i] for i in nonzero)
    quotas = [weight / mass * total if weight > 0 else 0.0 for weight in rho]
    units = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(nonzero, key=lambda i: (-(quotas[i] - units[i]), i))
    for i in by_remainder[: total - sum(units)]:
        units[i] += 1
    for starved in (i for i in nonzero if units[i] == 0):
        donor = max((i for i in nonzero if units[i] > 1), key=lambda i: (units[i] - quotas[i], -i))
        units[donor] -= 1
        units[starved] = 1
    return tuple(units)


def version_key(
    pool: AdapterPool, spec: MergeSpec, rho: tuple[float, ...], step: float
) -> VersionKey:
    """The key of merging `pool` with `spec` at preference ρ (pool order)."""
    params = dataclasses.asdict(spec.resolved_params())
    canonical = {
        "method": spec.method,
        "params": params,
        "pico": spec.pico,
        "energy_compensation": spec.energy_compensation,
        "svc": spec.svc,
        "svc_alpha": spec.svc_alpha,
        "rank": spec.rank,
    }
    if spec.phi is not None:  # TARA's tuned weights, by content
        canonical["phi"] = spec.phi.digest
    return VersionKey(
        pool.fingerprint, json.dumps(canonical, sort_keys=True), quantize_preference(rho, step)
    )
