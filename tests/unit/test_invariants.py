"""Properties every user relies on: one-hot preferences reproduce the adapter, core TA is TA,
DARE keeps the mean, seeds determine results, zero weights exclude adapters, inputs are never
modified, fp32 agrees with fp64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import delta
from factories import random_factors, write_adapter, write_statistics
from loramerge.merge_engine import AdapterPool, MergeSpec, merge


def adapter_delta(pool: AdapterPool, name: str, module: str) -> torch.Tensor:
    part = pool.adapter(name).modules[module]
    return part.scale * part.lora_b.double() @ part.lora_a.double()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("pico", [False, True])
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ta", {}),
        ("ties", {"density": 1.0, "scaling": 1.0}),
        ("core", {}),
        ("dare_ties", {"drop_rate": 0.0}),
        ("regmean", {}),
    ],
)
def test_one_hot_preference_reproduces_the_adapter(
    pool3: AdapterPool, method: str, params: dict, pico: bool
) -> None:
    result = merge(
        pool3, {"math": 1.0}, MergeSpec(method=method, params=params, pico=pico), dtype="float64"
    )
    for module in pool3.module_names:
        assert relative(delta(result.modules[module]), adapter_delta(pool3, "math", module)) < 1e-10


def test_one_hot_with_pico_reproduces_the_adapter_for_every_method(pool3: AdapterPool) -> None:
    """Pico's compensation restores the norm: even rules with λ·N amplification give the adapter."""
    for method in ("tsvm", "knots_ties", "svd_cur"):
        result = merge(pool3, {"code": 5.0}, MergeSpec(method=method), dtype="float64")
        module = pool3.module_names[0]
        assert relative(delta(result.modules[module]), adapter_delta(pool3, "code", module)) < 1e-10


def test_core_space_ta_equals_full_space_ta(pool3: AdapterPool) -> None:
    preference = {"code": 1.0, "finance": 2.0, "math": 0.5}
    ta = merge(pool3, preference, MergeSpec(method="ta", pico=False), dtype="float64")
    core = merge(pool3, preference, MergeSpec(method="core", pico=False), dtype="float64")
    for module in pool3.module_names:
        assert relative(delta(core.modules[module]), delta(ta.modules[module])) < 1e-12


def test_dare_keeps_the_mean(pool3: AdapterPool) -> None:
    preference = {"code": 1.0, "finance": 1.0, "math": 1.0}
    module = pool3.module_names[0]
    expected = delta(
        merge(pool3, preference, MergeSpec(pico=False, rank=12), dtype="float64").modules[module]
    )
    spec = lambda seed: MergeSpec(  # noqa: E731
        method="dare_linear", params={"drop_rate": 0.5, "seed": seed}, pico=False, rank=12
    )

    def mean_over(seeds: range) -> torch.Tensor:
        runs = [
            delta(merge(pool3, preference, spec(s), dtype="float64").modules[module]) for s in seeds
        ]
        return torch.stack(runs).mean(dim=0)

    few, many = relative(mean_over(range(4)), expected), relative(mean_over(range(64)), expected)
    assert many < 0.2
    assert many < few / 2  # the error shrinks like 1/√runs


def test_seed_determines_random_methods(pool3: AdapterPool) -> None:
    preference = {"code": 1.0, "math": 1.0}
    run = lambda seed: merge(  # noqa: E731
        pool3, preference, MergeSpec(method="dare_ties", params={"seed": seed}), dtype="float64"
    )
    module = pool3.module_names[0]
    first, again, other = run(3), run(3), run(4)
    assert torch.equal(first.modules[module].lora_b, again.modules[module].lora_b)
    assert not torch.allclose(delta(first.modules[module]), delta(other.modules[module]))


def test_zero_weight_adapters_take_no_part(tmp_path: Path) -> None:
    """Adding a zero-weight adapter to the pool changes nothing (Pico, rule or DARE draws)."""
    shared = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    paths = [
        write_statistics(write_adapter(tmp_path / n, random_factors(i, shared=shared)), i).parent
        for i, n in enumerate("abc")
    ]
    small = AdapterPool.load(paths[:2])
    large = AdapterPool.load(paths)
    for method in ("ta", "dare_linear", "tsvm", "ties", "knots_ties", "svd_cur", "core", "regmean"):
        for pico in (False, True):
            spec = MergeSpec(method, pico=pico)
            left = merge(small, {"a": 1, "b": 2}, spec, dtype="float64")
            right = merge(large, {"a": 1, "b": 2, "c": 0}, spec, dtype="float64")
            for module in small.module_names:
                error = relative(delta(right.modules[module]), delta(left.modules[module]))
                assert error < 1e-10, (method, pico, module)


def test_rank_cap_truncates_and_reports_energy(pool3: AdapterPool) -> None:
    preference = {"code": 1.0, "finance": 1.0, "math": 1.0}
    full = merge(pool3, preference, MergeSpec(pico=False), dtype="float64")
    capped = merge(pool3, preference, MergeSpec(pico=False, rank=2), dtype="float64")
    assert full.rank == 12 and full.report.retained_energy_min == pytest.approx(1.0)
    assert capped.rank == 2
    module = pool3.module_names[0]
    s = torch.linalg.svdvals(delta(full.modules[module]))
    kept = float((s[:2] ** 2).sum() / (s**2).sum())
    assert relative(delta(capped.modules[module]), delta(full.modules[module])) == pytest.approx(
        (1 - kept) ** 0.5, rel=1e-6
    )
    assert capped.report.retained_energy_min <= kept + 1e-12


def test_merging_never_modifies_the_pool(pool3: AdapterPool) -> None:
    before = {
        (a.name, m): (p.lora_a.clone(), p.lora_b.clone())
        for a in pool3.adapters
        for m, p in a.modules.items()
    }
    groups = pool3.groups(torch.device("cpu"), torch.float32)
    stacked = [b.clone() for g in groups for b in g.lora_b]
    for method in ("ta", "ties", "dare_ties", "tsvm", "knots_ties", "core", "svd_cur", "regmean"):
        merge(pool3, {"code": 1, "math": 2}, MergeSpec(method=method, svc=True), device="cpu")
    for (name, module), (a, b) in before.items():
        part = pool3.adapter(name).modules[module]
        assert torch.equal(part.lora_a, a) and torch.equal(part.lora_b, b)
    assert all(
        torch.equal(x, y)
        for x, y in zip(stacked, [b for g in groups for b in g.lora_b], strict=True)
    )


@pytest.mark.parametrize("method", ["ta", "tsvm", "knots_ties", "core", "svd_cur", "regmean"])
def test_float32_agrees_with_float64(pool3: AdapterPool, method: str) -> None:
    preference = {"code": 1.0, "finance": 2.0, "math": 3.0}
    low = merge(pool3, preference, MergeSpec(method=method), dtype="float32")
    high = merge(pool3, preference, MergeSpec(method=method), dtype="float64")
    assert low.report.dtype == "float32" and high.report.dtype == "float64"
    for module in pool3.module_names:
        assert relative(delta(low.modules[module]), delta(high.modules[module])) < 1e-4


def test_report_describes_the_merge(pool3: AdapterPool) -> None:
    result = merge(pool3, {"code": 1, "math": 3}, MergeSpec(method="ties"), device="auto")
    report = result.report
    assert report.method == "ties" and report.pico and report.energy_compensation
    assert report.preference == {"code": 0.25, "finance": 0.0, "math": 0.75}
    assert report.params.density == 0.2  # type: ignore[attr-defined]
    assert {"calibrate", "merge", "compensate", "total"} <= set(report.timings)
    assert report.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert 0 < report.retained_energy_min <= report.retained_energy_mean <= 1
    assert report.final_norm > 0 and report.merged_norm > 0
