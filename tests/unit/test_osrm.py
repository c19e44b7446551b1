"""OSRM's A-initialisation and post-hoc projection against the dense fp64 reference of the
paper's formulas, and the properties the method promises (orthonormal rows, minimal
interference, exact when nothing is lost)."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from loramerge.merge_engine import InputStatistics, InvalidArgumentError, LoraModule
from loramerge.merge_engine.osrm import (
    cross_talk,
    kept_energy,
    orthonormal_rows,
    osrm_basis,
    other_tasks_moment,
    procrustes_distance,
    project,
    project_modules,
    relative_interference,
)
from loramerge.merge_engine.statistics import statistics_from_sums

IN, OUT, RANK = 20, 12, 4
MODULES = ("layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj")
SITES = {"layers.0.q_proj": 0, "layers.0.v_proj": 0, "layers.1.q_proj": 1}


def task_features(seed: int, tokens: int) -> list[torch.Tensor]:
    """Per site: `tokens` correlated feature rows [tokens, IN] with a task-specific mean."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        mixing = torch.randn(IN, IN, generator=generator, dtype=torch.float64)
        shift = 2 * torch.randn(IN, generator=generator, dtype=torch.float64)
        out.append(
            torch.randn(tokens, IN, generator=generator, dtype=torch.float64) @ mixing + shift
        )
    return out


def statistics(features: list[torch.Tensor]) -> InputStatistics:
    tokens = int(features[0].shape[0])
    return statistics_from_sums(
        SITES, [h.T @ h for h in features], [h.sum(dim=0) for h in features], tokens, 1
    )


TOKENS = {"a": 30, "b": 50, "c": 80, "d": 45}
FEATURES = {name: task_features(seed, n) for seed, (name, n) in enumerate(TOKENS.items())}
STATISTICS = {name: statistics(f) for name, f in FEATURES.items()}
RANKS = dict.fromkeys(MODULES, RANK)


def projector(rows: torch.Tensor) -> torch.Tensor:
    return rows.double().T @ torch.linalg.pinv(rows.double().T)


def random_module(seed: int, scale: float = 0.5) -> LoraModule:
    generator = torch.Generator().manual_seed(seed)
    return LoraModule(
        lora_a=torch.randn(RANK, IN, generator=generator),
        lora_b=torch.randn(OUT, RANK, generator=generator),
        scale=scale,
    )


def dense(module: LoraModule) -> torch.Tensor:
    return module.scale * module.lora_b.double() @ module.lora_a.double()


@pytest.mark.parametrize("weighting", ["token", "task"])
def test_init_spans_the_reference_subspace(weighting: str) -> None:
    """Token weighting is the paper's concatenation of the other tasks' features; task
    weighting gives each task's features 1/k_j (rows scaled by 1/√k_j)."""
    basis = osrm_basis(STATISTICS, "b", RANKS, weighting=weighting)  # type: ignore[arg-type]
    for module in MODULES:
        site = SITES[module]
        rows = [FEATURES[t][site] for t in TOKENS if t != "b"]
        if weighting == "task":
            rows = [h / h.shape[0] ** 0.5 for h in rows]
        expected = ref.osrm_init(rows, RANK)
        assert torch.allclose(projector(basis.a[module]), projector(expected), atol=1e-5)


def test_init_rows_are_orthonormal_and_q_v_share_a_site() -> None:
    basis = osrm_basis(STATISTICS, "a", RANKS)
    for module in MODULES:
        a = basis.a[module].double()
        assert a.shape == (RANK, IN)
        assert torch.allclose(a @ a.T, torch.eye(RANK, dtype=torch.float64), atol=1e-6)
    assert torch.equal(basis.a["layers.0.q_proj"], basis.a["layers.0.v_proj"])
    assert not torch.allclose(basis.a["layers.0.q_proj"], basis.a["layers.1.q_proj"])


def test_init_has_the_smallest_interference_of_any_orthonormal_rows() -> None:
    """tr(Ã S_¬t Ãᵀ) ≤ tr(Q S_¬t Qᵀ) for Q the orthonormalised rows of another A (Ky Fan)."""
    basis = osrm_basis(STATISTICS, "c", RANKS)
    for module in MODULES:
        moment = other_tasks_moment(STATISTICS, "c", module)
        tilde = basis.a[module].double()
        best = torch.trace(tilde @ moment @ tilde.T)
        for seed in range(5):
            q = orthonormal_rows(random_module(seed).lora_a)
            assert best <= torch.trace(q @ moment @ q.T) + 1e-9
        assert basis.interference[module] == pytest.approx(relative_interference(tilde, moment))
        assert basis.interference[module] < 1.0  # better than a random subspace


def test_mean_row_variant_is_orthogonal_to_the_other_tasks_means() -> None:
    """Eq. 4: one mean row per other task; with 3 rows in 20 dimensions Ã lies in their null
    space (an arbitrary basis of it)."""
    basis = osrm_basis(STATISTICS, "d", RANKS, features="mean")
    for module in MODULES:
        means = torch.stack([STATISTICS[t].means[SITES[module]].double() for t in "abc"])
        assert torch.allclose(
            means @ basis.a[module].double().T, torch.zeros(3, RANK, dtype=torch.float64), atol=1e-4
        )


def test_projection_matches_the_least_squares_reference() -> None:
    basis = osrm_basis(STATISTICS, "a", RANKS)
    module = random_module(1)
    for key in MODULES:
        projected = project(module, basis.a[key])
        assert projected.scale == 1.0 and projected.rank == RANK
        expected = ref.osrm_project(dense(module), basis.a[key].double())
        assert torch.allclose(dense(projected), expected, atol=1e-5)
        kept = float(expected.square().sum() / dense(module).square().sum())
        assert kept_energy(module, basis.a[key]) == pytest.approx(kept, rel=1e-5)


def test_projection_onto_the_adapters_own_row_space_is_exact() -> None:
    module = random_module(2)
    rotation, _ = torch.linalg.qr(
        torch.randn(RANK, RANK, generator=torch.Generator().manual_seed(3))
    )
    own = (rotation.double() @ orthonormal_rows(module.lora_a)).float()  # any basis of rowspace(A)
    projected = project(module, own)
    assert torch.allclose(dense(projected), dense(module), atol=1e-5)
    assert kept_energy(module, own) == pytest.approx(1.0, abs=1e-6)


def test_project_modules_needs_a_basis_for_every_module() -> None:
    basis = osrm_basis(STATISTICS, "a", RANKS)
    modules = {key: random_module(i) for i, key in enumerate(MODULES)}
    assert set(project_modules(modules, basis.a)) == set(MODULES)
    with pytest.raises(InvalidArgumentError, match="no OSRM basis for 1 module"):
        project_modules({**modules, "layers.9.q_proj": random_module(9)}, basis.a)
    with pytest.raises(InvalidArgumentError, match=r"\[rank, 20\]"):
        project(random_module(1), torch.zeros(RANK, IN + 1))


def test_cross_talk_is_the_ratio_of_output_energies() -> None:
    module = random_module(4)
    own, others = FEATURES["a"][0], torch.cat([FEATURES[t][0] for t in "bcd"])
    delta = dense(module)
    expected = float(
        (others @ delta.T).square().sum() / others.shape[0]
        / ((own @ delta.T).square().sum() / own.shape[0])
    )  # fmt: skip
    own_moment = STATISTICS["a"].moment(MODULES[0])
    other_moment = other_tasks_moment(STATISTICS, "a", MODULES[0], weighting="token")
    assert cross_talk(module, own_moment, other_moment) == pytest.approx(expected, rel=1e-5)


def test_procrustes_distance_ignores_rotations_and_measures_change() -> None:
    a = orthonormal_rows(random_module(5).lora_a)
    rotation, _ = torch.linalg.qr(
        torch.randn(RANK, RANK, generator=torch.Generator().manual_seed(6))
    )
    assert procrustes_distance(rotation.double() @ a, a) == pytest.approx(0.0, abs=1e-6)
    moved = a + 0.1 * random_module(7).lora_a.double()
    distance = procrustes_distance(moved, a)
    assert 0 < distance <= float((moved - a).norm() / a.norm()) + 1e-12  # Ω = I is a candidate


def test_errors_name_the_field() -> None:
    with pytest.raises(InvalidArgumentError, match="at least one task other than 'a'"):
        osrm_basis({"a": STATISTICS["a"]}, "a", RANKS)
    with pytest.raises(InvalidArgumentError, match=r"statistics\['b'\].*'layers.7.v_proj'"):
        osrm_basis(STATISTICS, "a", {"layers.7.v_proj": RANK})
    with pytest.raises(InvalidArgumentError, match="rank: must be between 1 and 20"):
        osrm_basis(STATISTICS, "a", {MODULES[0]: IN + 1})
    with pytest.raises(InvalidArgumentError, match="features"):
        osrm_basis(STATISTICS, "a", RANKS, features="median")  # type: ignore[arg-type]
