"""Every merge method (± Pico, ± SVC) against the dense fp64 reference of its formula."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import reference as ref
from factories import random_factors, write_adapter, write_statistics
from loramerge.merge_engine import AdapterPool, MergeSpec, merge
from loramerge.merge_engine.methods.regmean import RegMeanParams
from loramerge.merge_engine.methods.svd_cur import SvdCurParams

Tensor = torch.Tensor
PREFERENCE = {"code": 2.0, "finance": 0.0, "math": 1.0, "medical": 1.5}
SVD_CUR_MIX = SvdCurParams().mix
REGMEAN_ALPHA = RegMeanParams().off_diagonal


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> AdapterPool:
    """Four adapters with different ranks and scales (one rsLoRA, one alpha_pattern), and a
    shared output direction so that Pico has something to calibrate."""
    root: Path = tmp_path_factory.mktemp("pool")
    shared = torch.randn(24, 8, generator=torch.Generator().manual_seed(99)) * 0.7
    write_adapter(root / "code", random_factors(1, rank=4, shared=shared), alpha=8)
    write_adapter(root / "finance", random_factors(2, rank=4, shared=shared), alpha=16)
    write_adapter(root / "math", random_factors(3, rank=3, shared=shared), alpha=6, use_rslora=True)
    write_adapter(
        root / "medical",
        random_factors(4, rank=5, shared=shared),
        alpha=5,
        alpha_pattern={"v_proj": 10},
    )
    for seed, name in enumerate(("code", "finance", "math", "medical"), start=11):
        write_statistics(root / name, seed)
    return AdapterPool.load(sorted(root.iterdir()))


def module_inputs(pool: AdapterPool, module: str) -> tuple[list[Tensor], list[Tensor], list[str]]:
    """Raw B's and scaled A's (fp64) of the adapters with weight > 0, and their names."""
    bs, scaled_as, names = [], [], []
    for adapter in pool.adapters:
        if PREFERENCE.get(adapter.name, 0) > 0:
            part = adapter.modules[module]
            bs.append(part.lora_b.double())
            scaled_as.append(part.scale * part.lora_a.double())
            names.append(adapter.name)
    return bs, scaled_as, names


def rho_active(pool: AdapterPool) -> list[float]:
    total = sum(PREFERENCE.values())
    return [PREFERENCE[n] / total for n in pool.names if PREFERENCE.get(n, 0) > 0]


Rule = Callable[[list[Tensor], list[str], str, list[Tensor], list[Tensor]], Tensor]


def core_rule(inner: Callable[[list[Tensor], list[str], str], Tensor]) -> Rule:
    def rule(
        taus: list[Tensor], names: list[str], module: str, bs: list[Tensor], as_: list[Tensor]
    ) -> Tensor:
        u_b, v_a = ref.core_space(bs, as_)
        cores = [u_b.T @ tau @ v_a.T for tau in taus]
        return u_b @ inner(cores, names, module) @ v_a

    return rule


def reference_rules(pool: AdapterPool) -> dict[str, tuple[dict[str, object], Rule]]:
    rho = rho_active(pool)
    n = len(rho)  # the merged adapters (ρ_t > 0), not the pool size

    def elementwise(taus: list[Tensor], names: list[str], module: str, **kw: object) -> Tensor:
        kind, scaling = kw["kind"], float(kw["scaling"])  # type: ignore[arg-type]
        if kind == "ties":
            return ref.ties(taus, rho, scaling, float(kw["density"]), "total")  # type: ignore[arg-type]
        dropped = [ref.dare(t, 0.3, 7, module, name) for t, name in zip(taus, names, strict=True)]
        if kind == "dare_linear":
            return ref.ta(dropped, rho, n, scaling)
        return ref.ties_combine(dropped, rho, scaling)

    def knots(kind: str, scaling: float, density: float = 1.0) -> Rule:
        def rule(taus, names, module, bs, as_):  # type: ignore[no-untyped-def]
            u, xs = ref.knots_space(taus)
            return u @ elementwise(xs, names, module, kind=kind, scaling=scaling, density=density)

        return rule

    def regmean(scaling: float, off_diagonal: float) -> Rule:
        def rule(taus, names, module, bs, as_):  # type: ignore[no-untyped-def]
            grams = [pool.adapter(name).statistics.moment(module).double() for name in names]
            return ref.regmean(taus, rho, grams, scaling, off_diagonal)

        return rule

    return {
        "ta": ({}, lambda t, nm, m, b, a: ref.ta(t, rho, n, 1 / n)),
        "ta_scaled": ({"scaling": 0.7}, lambda t, nm, m, b, a: ref.ta(t, rho, n, 0.7)),
        "ties": (
            {"density": 0.4},
            lambda t, nm, m, b, a: elementwise(t, nm, m, kind="ties", scaling=1.0, density=0.4),
        ),
        "dare_linear": (
            {"drop_rate": 0.3, "seed": 7},
            lambda t, nm, m, b, a: elementwise(t, nm, m, kind="dare_linear", scaling=1 / n),
        ),
        "dare_ties": (
            {"drop_rate": 0.3, "seed": 7},
            lambda t, nm, m, b, a: elementwise(t, nm, m, kind="dare_ties", scaling=1.0),
        ),
        "tsvm": ({}, lambda t, nm, m, b, a: ref.tsvm(t, [1.0 * n * r for r in rho])),
        "knots_ties": ({"density": 0.5}, knots("ties", 0.5, 0.5)),
        "knots_dare_ties": ({"drop_rate": 0.3, "seed": 7}, knots("dare_ties", 0.7)),
        "core": ({}, core_rule(lambda c, nm, m: ref.ta(c, rho, n, 1 / n))),
        "core_ties": (
            {"inner": "ties", "density": 0.5},
            core_rule(
                lambda c, nm, m: elementwise(c, nm, m, kind="ties", scaling=1.0, density=0.5)
            ),
        ),
        "core_tsvm": (
            {"inner": "tsvm"},
            core_rule(lambda c, nm, m: ref.tsvm(c, [1.0 * n * r for r in rho])),
        ),
        "core_dare_ties": (
            {"inner": "dare_ties", "drop_rate": 0.3, "seed": 7},
            core_rule(lambda c, nm, m: elementwise(c, nm, m, kind="dare_ties", scaling=1.0)),
        ),
        "svd_cur": (
            {"density": 0.6, "mix": None},
            lambda t, nm, m, b, a: ref.svd_cur(t, rho, 0.5, 0.6, 5, None),
        ),
        "svd_cur_mix": (
            {"density": 0.6},
            lambda t, nm, m, b, a: ref.svd_cur(t, rho, 0.5, 0.6, 5, SVD_CUR_MIX),
        ),
        "regmean": ({}, regmean(1.0, REGMEAN_ALPHA)),
        "regmean_scaled": ({"scaling": 0.8, "off_diagonal": 1.0}, regmean(0.8, 1.0)),
    }


DENSE = {"ties", "dare_linear", "dare_ties"}
CASES = [
    "ta", "ta_scaled", "ties", "dare_linear", "dare_ties", "tsvm", "knots_ties",
    "knots_dare_ties", "core", "core_ties", "core_tsvm", "core_dare_ties", "svd_cur",
    "svd_cur_mix", "regmean", "regmean_scaled",
]  # fmt: skip


@pytest.mark.parametrize("pico", [False, True], ids=["plain", "pico"])
@pytest.mark.parametrize("case", CASES)
def test_method_matches_dense_fp64_reference(pool: AdapterPool, case: str, pico: bool) -> None:
    params, rule = reference_rules(pool)[case]
    method = case.split("_")[0] if case.startswith("core") else case.removesuffix("_scaled")
    method = method.removesuffix("_mix").removesuffix("_scaled")
    result = merge(
        pool,
        PREFERENCE,
        MergeSpec(method=method, params=params, pico=pico),
        device="cpu",
        dtype="float64",
    )
    rho = rho_active(pool)
    for module in pool.module_names:
        bs, scaled_as, names = module_inputs(pool, module)
        originals = [b @ a for b, a in zip(bs, scaled_as, strict=True)]
        taus = ref.pico_calibrate(bs, originals) if pico else originals
        calibrated_bs = ref.pico_calibrate(bs, bs) if pico else bs
        expected = rule(taus, names, module, calibrated_bs, scaled_as)
        if method in DENSE:
            d, k = expected.shape
            expected, _ = ref.truncate(expected, min(sum(b.shape[1] for b in bs), d, k))
        if pico:
            expected = ref.pico_compensate(expected, originals, rho)
        part = result.modules[module]
        actual = part.lora_b @ part.lora_a
        error = torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)
        assert error < 1e-9, f"{case} pico={pico} {module}: relative error {error:.2e}"


@pytest.mark.parametrize("method", ["ta", "ties", "knots_ties"])
def test_svc_matches_reference(pool: AdapterPool, method: str) -> None:
    params, rule = reference_rules(pool)[method]
    result = merge(
        pool,
        PREFERENCE,
        MergeSpec(method=method, params=params, pico=False, svc=True),
        device="cpu",
        dtype="float64",
    )
    for module in pool.module_names:
        bs, scaled_as, names = module_inputs(pool, module)
        taus = [b @ a for b, a in zip(bs, scaled_as, strict=True)]
        merged = rule(taus, names, module, bs, scaled_as)
        if method in DENSE:
            d, k = merged.shape
            merged, _ = ref.truncate(merged, min(sum(b.shape[1] for b in bs), d, k))
        expected = ref.svc(merged, taus)
        part = result.modules[module]
        error = torch.linalg.norm(part.lora_b @ part.lora_a - expected) / torch.linalg.norm(
            expected
        )
        assert error < 1e-9, f"svc after {method} {module}: relative error {error:.2e}"


def test_dense_methods_report_the_retained_energy_of_the_truncation(pool: AdapterPool) -> None:
    result = merge(
        pool,
        PREFERENCE,
        MergeSpec(method="ties", pico=False, rank=3),
        device="cpu",
        dtype="float64",
    )
    energies = []
    for module in pool.module_names:
        bs, scaled_as, _ = module_inputs(pool, module)
        taus = [b @ a for b, a in zip(bs, scaled_as, strict=True)]
        _, energy = ref.truncate(ref.ties(taus, rho_active(pool), 1.0, 0.2, "total"), 3)
        energies.append(energy)
    assert result.rank == 3
    assert result.report.retained_energy_min == pytest.approx(min(energies), rel=1e-9)
    assert result.report.retained_energy_mean == pytest.approx(sum(energies) / len(energies))
