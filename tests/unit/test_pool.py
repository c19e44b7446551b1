"""Pools: compatibility is checked once, with every violation listed; fingerprints track content."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from factories import module_names, random_factors, write_adapter
from loramerge.merge_engine import AdapterPool, IncompatiblePoolError, load_adapter


def test_pool_orders_by_name_and_groups_equal_shapes(tmp_path: Path) -> None:
    paths = [write_adapter(tmp_path / n, random_factors(i)) for i, n in enumerate("cab")]
    pool = AdapterPool.load(paths)
    assert pool.names == ("a", "b", "c")
    assert pool.module_names == tuple(module_names())
    assert pool.target_modules == ("q_proj", "v_proj")
    groups = pool.groups(torch.device("cpu"), torch.float64)
    assert sorted(len(g.modules) for g in groups) == [3, 3]  # q_proj ×3, v_proj ×3
    q = next(g for g in groups if g.out_features == 24)
    assert q.lora_b[0].shape == (3, 24, 4) and q.lora_a[0].shape == (3, 4, 24)
    assert q.scales.shape == (3, 3)
    assert pool.groups(torch.device("cpu"), torch.float64) is groups  # cached


def test_fingerprint_changes_with_any_adapter_and_ignores_load_order(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", random_factors(0))
    b = write_adapter(tmp_path / "b", random_factors(1))
    first = AdapterPool.load([a, b]).fingerprint
    assert AdapterPool.load([b, a]).fingerprint == first
    write_adapter(tmp_path / "b", random_factors(2))
    assert AdapterPool.load([a, b]).fingerprint != first
    assert AdapterPool.load({"x": a, "b": b}).fingerprint != AdapterPool.load([a, b]).fingerprint


def test_incompatible_pool_lists_every_violation(tmp_path: Path) -> None:
    good = write_adapter(tmp_path / "good", random_factors(0))
    fewer = write_adapter(tmp_path / "fewer", random_factors(1, layers=2))
    factors = random_factors(2)
    name = module_names()[0]
    factors[name] = (torch.randn(4, 20), torch.randn(24, 4))  # in_features 20, not 24
    wrong_shape = write_adapter(tmp_path / "shape", factors)
    with pytest.raises(IncompatiblePoolError) as info:
        AdapterPool.load([good, fewer, wrong_shape])
    violations = info.value.violations
    assert len(violations) == 2
    assert any("'fewer'" in v and "lacks modules" in v and "layers.2" in v for v in violations)
    assert any("shape: 24x20" in v and "good: 24x24" in v for v in violations)


def test_many_shape_mismatches_are_summarised(tmp_path: Path) -> None:
    good = write_adapter(tmp_path / "good", random_factors(0))
    other = {n: (torch.randn(4, 20), b) for n, (_, b) in random_factors(1).items()}
    with pytest.raises(IncompatiblePoolError) as info:
        AdapterPool.load([good, write_adapter(tmp_path / "other", other)])
    assert len(info.value.violations) == 4  # three spelled out, the rest counted
    assert info.value.violations[-1] == "... and 3 more modules with different shapes"


def test_duplicate_names_and_empty_pool_are_errors(tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a", random_factors(0))
    with pytest.raises(IncompatiblePoolError, match="used twice"):
        AdapterPool([load_adapter(path), load_adapter(path)])
    with pytest.raises(IncompatiblePoolError, match="empty"):
        AdapterPool([])


def test_base_model_mismatch_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = write_adapter(tmp_path / "a", random_factors(0), base_model_name_or_path="llama-a")
    b = write_adapter(tmp_path / "b", random_factors(1), base_model_name_or_path="llama-b")
    with caplog.at_level(logging.WARNING):
        pool = AdapterPool.load([a, b])
    assert len(pool.warnings) == 1 and "llama-a" in pool.warnings[0]
    assert "different base models" in caplog.text


def test_with_and_without_make_new_pools(tmp_path: Path) -> None:
    a = load_adapter(write_adapter(tmp_path / "a", random_factors(0)))
    b = load_adapter(write_adapter(tmp_path / "b", random_factors(1)))
    pool = AdapterPool([a])
    bigger = pool.with_adapter(b)
    assert bigger.names == ("a", "b") and pool.names == ("a",)
    assert bigger.without("a").fingerprint == AdapterPool([b]).fingerprint
