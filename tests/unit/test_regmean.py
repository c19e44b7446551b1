"""RegMean's cached statistics: the products E[x xᵀ] Aᵀ are stacked once per pool and serve
every preference and off-diagonal weight; modules that read the same input are factorised once."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import reference as ref
from factories import random_factors, write_adapter, write_statistics
from loramerge.merge_engine import STATISTICS_FILE, AdapterPool, MergeResult, MergeSpec, merge
from loramerge.merge_engine.pool import ModuleGroup

CPU = torch.device("cpu")


def regmean(pool: AdapterPool, preference: Mapping[str, float], alpha: float) -> MergeResult:
    spec = MergeSpec("regmean", params={"off_diagonal": alpha}, pico=False)
    return merge(pool, preference, spec, device="cpu", dtype="float64")


def assert_matches_reference(
    pool: AdapterPool, preference: Mapping[str, float], alpha: float, result: MergeResult
) -> None:
    """Every module against the dense fp64 formula on the adapters' own statistics."""
    names = [name for name in pool.names if preference.get(name, 0) > 0]
    rho = [preference[name] / sum(preference.values()) for name in names]
    for module in pool.module_names:
        parts = [pool.adapter(name).modules[module] for name in names]
        taus = [p.lora_b.double() @ (p.scale * p.lora_a.double()) for p in parts]
        grams = [pool.adapter(n).statistics.moment(module).double() for n in names]  # type: ignore[union-attr]
        expected = ref.regmean(taus, rho, grams, 1.0, alpha)
        actual = result.modules[module].lora_b @ result.modules[module].lora_a
        error = torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)
        assert error < 1e-9, f"{module} ρ={rho} α={alpha}: relative error {error:.2e}"


def test_cached_products_serve_every_preference_and_weight(
    pool3: AdapterPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    stackings = []  # (device, dtype) of every time the pool stacks its statistics
    stack = AdapterPool._stack_statistics

    def counted(pool: AdapterPool, groups: tuple[ModuleGroup, ...], *key: object) -> object:
        stackings.append(key)
        return stack(pool, groups, *key)  # type: ignore[arg-type]

    monkeypatch.setattr(AdapterPool, "_stack_statistics", counted)
    runs = [
        ({"code": 1, "finance": 2, "math": 3}, 0.7),
        ({"code": 3, "finance": 1, "math": 1}, 0.7),  # another ρ
        ({"code": 3, "finance": 1, "math": 1}, 0.2),  # another α
        ({"code": 1, "math": 2}, 0.7),  # another active set
    ]
    results = []
    for preference, alpha in runs:
        results.append(regmean(pool3, preference, alpha))
        assert_matches_reference(pool3, preference, alpha, results[-1])
    assert stackings == [(CPU, torch.float64)]  # stacked by the first merge, then reused
    module = pool3.module_names[0]
    assert not torch.allclose(results[1].modules[module].lora_a, results[2].modules[module].lora_a)

    held = pool3.cached_bytes()
    merge(pool3, {"code": 1, "math": 1}, MergeSpec("regmean", pico=False), device="cpu")
    assert stackings[-1] == (CPU, torch.float32)  # another dtype has its own stacks
    float32 = pool3.cached_bytes() - held
    assert pool3.drop_groups(keep=(CPU, torch.float64)) == float32 > 0
    assert pool3.drop_groups() == held and pool3.cached_bytes() == 0


def test_one_site_stack_serves_both_groups(pool3: AdapterPool) -> None:
    """q_proj and v_proj (two groups: their output sizes differ) read one input per layer."""
    groups = pool3.groups(CPU, torch.float64)
    statistics = pool3.statistics(CPU, torch.float64, range(len(pool3)))
    assert len(groups) == 2 and statistics[0].moments is statistics[1].moments
    assert [tuple(s.moments[0].shape) for s in statistics] == [(3, 24, 24)] * 2
    for group, stack in zip(groups, statistics, strict=True):
        moment = pool3.adapters[1].statistics.moment(group.modules[2])  # type: ignore[union-attr]
        assert torch.equal(stack.moments[1][stack.sites[2]], moment.double())
        assert torch.allclose(stack.products[1][2], moment.double() @ group.scaled_a[1][2].mT)
    site_bytes = sum(m.numel() * m.element_size() for m in statistics[0].moments)  # once
    per_group = [t.numel() * t.element_size() for s in statistics for t in (s.sites, *s.products)]
    assert pool3.cached_bytes() == sum(g.nbytes for g in groups) + site_bytes + sum(per_group)


def pool_with_statistics(root: Path, per_module: tuple[bool, bool]) -> AdapterPool:
    paths = [write_adapter(root / name, random_factors(seed)) for seed, name in enumerate("ab")]
    for seed, (path, separate) in enumerate(zip(paths, per_module, strict=True)):
        write_statistics(path, seed + 30, per_module=separate)
    return AdapterPool.load(paths)


def site_rows(pool: AdapterPool) -> list[int]:
    return [int(s.moments[0].shape[0]) for s in pool.statistics(CPU, torch.float64, (0, 1))]


def test_shared_sites_give_the_per_module_result(tmp_path: Path) -> None:
    """Files that store each module's moment apart (same values) are factorised per module."""
    shared = pool_with_statistics(tmp_path / "shared", (False, False))
    separate = pool_with_statistics(tmp_path / "separate", (True, True))
    assert site_rows(shared) == [3, 3] and site_rows(separate) == [6, 6]
    preference = {"a": 1.0, "b": 2.0}
    expected, actual = regmean(shared, preference, 0.7), regmean(separate, preference, 0.7)
    for module in shared.module_names:
        e, a = expected.modules[module], actual.modules[module]
        assert torch.allclose(e.lora_b @ e.lora_a, a.lora_b @ a.lora_a, rtol=1e-12, atol=1e-14)


def test_sites_are_shared_only_where_every_file_shares(tmp_path: Path) -> None:
    pool = pool_with_statistics(tmp_path, (False, True))
    path = pool.adapter("b").path / STATISTICS_FILE  # v_proj's moments made to differ
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    tensors = load_file(path)
    for site in range(1, 6, 2):
        tensors[f"site.{site}.moment"] = 2 * tensors[f"site.{site}.moment"]
    save_file(tensors, path, metadata=metadata)
    pool = AdapterPool.load([pool.adapter("a").path, pool.adapter("b").path])
    assert site_rows(pool) == [6, 6]
    assert_matches_reference(pool, {"a": 1.0, "b": 2.0}, 0.7, regmean(pool, {"a": 1, "b": 2}, 0.7))
