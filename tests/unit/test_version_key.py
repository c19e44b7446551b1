"""Preference quantisation: largest remainders on the simplex, non-zero weights kept."""

from __future__ import annotations

import random

import pytest

from loramerge.server.version_key import quantize_preference


def test_examples() -> None:
    assert quantize_preference((0.333, 0.667), 0.01) == (33, 67)
    assert quantize_preference((1 / 3, 1 / 3, 1 / 3), 0.01) == (34, 33, 33)  # ties: lower index
    assert quantize_preference((0.004, 0.996), 0.01) == (1, 99)  # was (0, 100): a weight lost
    assert quantize_preference((0.002, 0.003, 0.995), 0.5) == (1, 1, 1)  # T = 3 > 1/step
    assert quantize_preference((0.0, 0.25, 0.75), 0.1) == (0, 3, 7)  # was 2 + 8 rounding up


@pytest.mark.parametrize("step", [0.5, 0.1, 0.03, 0.01, 0.001])
def test_random_preferences_stay_on_the_simplex_and_keep_their_support(step: float) -> None:
    chooser = random.Random(11)
    for _ in range(500):
        n = chooser.randint(1, 40)
        weights = [
            chooser.choice([0.0, chooser.random(), chooser.random() * 1e-4]) for _ in range(n)
        ]
        if not any(weights):
            weights[0] = 1.0
        total = sum(weights)
        rho = tuple(w / total for w in weights)
        units = quantize_preference(rho, step)
        nonzero = sum(w > 0 for w in rho)
        slots = max(round(1 / step), nonzero)
        assert sum(units) == slots
        assert all((u > 0) == (w > 0) for u, w in zip(units, rho, strict=True))
        # within one unit of the exact share, plus one for each unit given to a tiny weight
        tiny = sum(0 < w * slots < 1 for w in rho)
        assert all(abs(u - w * slots) < 1 + tiny for u, w in zip(units, rho, strict=True))
        if not tiny:  # no donations: plain largest remainders
            assert all(abs(u - w * slots) < 1 for u, w in zip(units, rho, strict=True))


def test_no_positive_weight_is_an_error() -> None:
    with pytest.raises(ValueError):
        quantize_preference((0.0, 0.0), 0.01)
