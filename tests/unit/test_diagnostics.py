"""The Pico paper's diagnostics on pools with known structure."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from factories import module_names, write_adapter
from loramerge.merge_engine import AdapterPool, merged_diagnostics, pool_diagnostics
from loramerge.merge_engine.diagnostics import effective_rank, spectrum_stats


def test_spectrum_statistics_of_known_singular_values() -> None:
    stats = spectrum_stats(torch.tensor([4.0, 3.0, 0.0], dtype=torch.float64))
    assert float(stats["max_energy_share"]) == pytest.approx(16 / 25)
    assert float(stats["stable_rank"]) == pytest.approx(25 / 16)
    assert float(stats["condition_number"]) == pytest.approx(4 / 3)
    assert float(stats["frobenius_norm"]) == pytest.approx(5.0)
    p = torch.tensor([4 / 7, 3 / 7], dtype=torch.float64)
    assert float(stats["effective_rank"]) == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert float(effective_rank(torch.ones(5, dtype=torch.float64))) == pytest.approx(5.0)
    assert float(effective_rank(torch.zeros(3, dtype=torch.float64))) == 0.0


def write_structured(path: Path, b_columns: slice, a_rows: slice) -> Path:
    """Rank-2 adapter whose B uses output coordinates `b_columns`, A input coordinates `a_rows`."""
    factors = {}
    for name in module_names():
        d = 24 if name.endswith("q_proj") else 8
        b = torch.zeros(d, 2)
        b[b_columns, :] = torch.eye(2) * torch.tensor([3.0, 1.0])
        a = torch.zeros(2, 16)
        a[:, a_rows] = torch.eye(2)
        factors[name] = (a, b)
    return write_adapter(path, factors)


def test_overlap_effective_rank_and_shared_energy(tmp_path: Path) -> None:
    pool = AdapterPool.load(
        [
            write_structured(tmp_path / "x", slice(0, 2), slice(0, 2)),
            write_structured(tmp_path / "y", slice(0, 2), slice(2, 4)),  # same B space, other A
            write_structured(tmp_path / "z", slice(2, 4), slice(2, 4)),
        ]
    )
    diagnostics = pool_diagnostics(pool)
    module = diagnostics.modules[0]
    assert module.overlap_b[0] == pytest.approx((1.0, 1.0, 0.0))
    assert module.overlap_a[0] == pytest.approx((1.0, 0.0, 0.0))
    assert module.overlap_a[1] == pytest.approx((0.0, 1.0, 1.0))
    expected_erank = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert module.effective_rank_b == pytest.approx((expected_erank,) * 3)
    # joint B energies: x and y stack on coordinates 0..1 (9+9, 1+1), z alone (9, 1)
    assert module.shared_energy[:2] == pytest.approx((18 / 30, 9 / 30))
    assert module.shared_contribution[0] == pytest.approx((0.5, 0.5, 0.0))
    assert diagnostics.overall.modules == 6
    assert diagnostics.overall.mean_overlap_b == pytest.approx(1 / 3)
    assert set(diagnostics.by_module_type) == {"q_proj", "v_proj"}


def test_merged_diagnostics_compare_with_and_without_pico(pool3: AdapterPool) -> None:
    report = merged_diagnostics(pool3, {"code": 1, "finance": 1, "math": 1}, device="cpu")
    assert set(report.with_pico) == set(pool3.module_names)
    for stats in (report.mean_with_pico, report.mean_without_pico):
        assert 0 < stats.max_energy_share <= 1
        assert 1 <= stats.effective_rank <= 12 and 1 <= stats.stable_rank <= 12
        assert stats.condition_number >= 1 and stats.frobenius_norm > 0
    assert report.mean_with_pico != report.mean_without_pico
