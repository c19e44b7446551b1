"""Pico's calibration, its cache and the energy compensation."""

from __future__ import annotations

import pytest
import torch

from conftest import delta
from loramerge.merge_engine import AdapterPool, CalibrationCache, MergeSpec, merge
from loramerge.merge_engine.pico import calibrate


def test_coefficients_lie_between_one_over_n_and_one() -> None:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(1, 32, 1, generator=generator) * 5
    bs = [torch.randn(2, 32, 4, generator=generator) + shared for _ in range(3)]
    calibration = calibrate(bs)
    assert torch.allclose(calibration.sharing.sum(dim=-1), torch.ones(2))
    assert (calibration.coefficients >= 1 / 3 - 1e-6).all()
    assert (calibration.coefficients <= 1 + 1e-6).all()
    # the dominant (shared) component is shrunk the most
    assert calibration.coefficients[:, 0].max() < calibration.coefficients[:, -1].min()
    for b, b_new in zip(bs, calibration.lora_b, strict=True):
        change = b_new - b  # lies in the span of the basis
        inside = calibration.basis @ (calibration.basis.mT @ change)
        assert torch.allclose(inside, change, atol=1e-5)


def test_single_adapter_is_unchanged() -> None:
    b = torch.randn(1, 16, 4)
    assert torch.equal(calibrate([b]).lora_b[0], b)


def test_cache_hits_for_new_preferences_over_the_same_adapters(pool3: AdapterPool) -> None:
    cache = CalibrationCache(max_entries=2)
    first = merge(pool3, {"code": 1, "math": 1}, cache=cache)
    second = merge(pool3, {"code": 3, "math": 1}, MergeSpec(method="ties"), cache=cache)
    other_subset = merge(pool3, {"code": 1, "finance": 1}, cache=cache)
    assert first.report.calibration_cache_hit is False
    assert second.report.calibration_cache_hit is True
    assert other_subset.report.calibration_cache_hit is False
    assert (cache.hits, cache.misses) == (1, 2)
    merge(pool3, {"code": 1, "math": 1, "finance": 1}, cache=cache)  # evicts the oldest
    assert len(cache) == 2
    assert merge(pool3, {"code": 1, "math": 2}, cache=cache).report.calibration_cache_hit is False
    no_pico = merge(pool3, {"code": 1}, MergeSpec(pico=False), cache=cache)
    assert no_pico.report.calibration_cache_hit is None


def test_energy_compensation_restores_the_weighted_mean_norm(pool3: AdapterPool) -> None:
    preference = {"code": 1.0, "finance": 1.0, "math": 2.0}
    on = merge(pool3, preference, MergeSpec(method="ties"), dtype="float64")
    off = merge(
        pool3, preference, MergeSpec(method="ties", energy_compensation=False), dtype="float64"
    )
    rho = {"code": 0.25, "finance": 0.25, "math": 0.5}
    for module in pool3.module_names:
        target = sum(
            w * float(torch.linalg.norm(
                pool3.adapter(n).modules[module].scale
                * pool3.adapter(n).modules[module].lora_b.double()
                @ pool3.adapter(n).modules[module].lora_a.double()
            ))
            for n, w in rho.items()
        )  # fmt: skip
        assert float(torch.linalg.norm(delta(on.modules[module]))) == pytest.approx(
            target, rel=1e-10
        )
        direction_on = delta(on.modules[module]) / torch.linalg.norm(delta(on.modules[module]))
        direction_off = delta(off.modules[module]) / torch.linalg.norm(delta(off.modules[module]))
        assert torch.allclose(direction_on, direction_off, atol=1e-10)
    assert not off.report.energy_compensation


def test_calibration_lowers_the_share_of_the_dominant_shared_direction(pool3: AdapterPool) -> None:
    for group in pool3.groups(torch.device("cpu"), torch.float64):
        before = calibrate(group.lora_b)
        after = calibrate(before.lora_b)
        assert (after.sharing[:, 0] < before.sharing[:, 0]).all()
