"""Preferences: adapter name → non-negative weight, normalised to the simplex."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .errors import InvalidPreferenceError


def normalize_preference(
    preference: Mapping[str, float], names: Sequence[str], field: str = "preference"
) -> tuple[float, ...]:
    """Validate `preference` against the pool's adapter `names`; return ρ in pool order.

    Missing names weigh 0. Raises `InvalidPreferenceError` naming the entry for an unknown
    name, a negative, NaN or infinite weight, or when every weight is 0. The result sums to 1.
    """
    if not preference:
        raise InvalidPreferenceError(field, "is empty: give at least one adapter a weight > 0")
    known = set(names)
    unknown = sorted(name for name in preference if name not in known)
    if unknown:
        raise InvalidPreferenceError(
            f"{field}[{unknown[0]!r}]",
            f"unknown adapter (unknown: {', '.join(unknown)}; the pool has: {', '.join(names)})",
        )
    for name, weight in preference.items():
        entry = f"{field}[{name!r}]"
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidPreferenceError(entry, f"weight must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise InvalidPreferenceError(entry, f"weight must be finite, got {weight!r}")
        if weight < 0:
            raise InvalidPreferenceError(entry, f"weight must be ≥ 0, got {weight!r}")
    largest = max(float(w) for w in preference.values())
    if largest <= 0:
        raise InvalidPreferenceError(field, "all weights are 0: give at least one weight > 0")
    relative = [float(preference.get(name, 0.0)) / largest for name in names]  # no overflow
    total = math.fsum(relative)
    return tuple(w / total for w in relative)
