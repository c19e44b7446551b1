"""Interference diagnostics of the Pico paper (§3, App. A–D).

Pool diagnostics, per module and averaged: pairwise subspace overlap of the B column spaces
and of the A row spaces, ‖Q_iᵀ Q_j‖²_F / min(r_i, r_j) ∈ [0, 1]; effective rank
exp(−Σ p log p), p = σ / Σσ, of each B and A; and the joint B-space SVD's leading components
(their energy shares c_k and each adapter's share of each). Merged-adapter diagnostics: the
spectrum of each merged ΔW (max energy share, effective rank, stable rank Σσ²/σ²_max,
condition number σ_max/σ_min over non-zero σ, Frobenius norm) without and with Pico.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .linalg import factored_svd, rank_tolerance
from .merge import MergeResult, MergeSpec, merge
from .pico import calibrate
from .pool import AdapterPool

TOP_COMPONENTS = 5


@dataclass(frozen=True)
class ModuleDiagnostics:
    """Diagnostics of one adapted module across the pool's adapters (pool order)."""

    module: str
    overlap_b: tuple[tuple[float, ...], ...]  # n × n, 1 on the diagonal
    overlap_a: tuple[tuple[float, ...], ...]  # n × n
    effective_rank_b: tuple[float, ...]  # per adapter
    effective_rank_a: tuple[float, ...]
    shared_energy: tuple[float, ...]  # c_k of the leading joint-B components
    shared_contribution: tuple[tuple[float, ...], ...]  # per component: each adapter's share


@dataclass(frozen=True)
class Summary:
    """Averages over a set of modules (all, or one module type such as q_proj)."""

    modules: int
    mean_overlap_b: float  # mean over modules and adapter pairs
    mean_overlap_a: float
    mean_effective_rank_b: float
    mean_effective_rank_a: float
    mean_shared_energy: tuple[float, ...]  # per leading component


@dataclass(frozen=True)
class PoolDiagnostics:
    adapters: tuple[str, ...]
    modules: tuple[ModuleDiagnostics, ...]
    overall: Summary
    by_module_type: Mapping[str, Summary]


@dataclass(frozen=True)
class SpectrumStats:
    max_energy_share: float
    effective_rank: float
    stable_rank: float
    condition_number: float
    frobenius_norm: float


@dataclass(frozen=True)
class MergedDiagnostics:
    """Spectrum statistics of one merged adapter, per module and averaged."""

    without_pico: Mapping[str, SpectrumStats]
    with_pico: Mapping[str, SpectrumStats]
    mean_without_pico: SpectrumStats
    mean_with_pico: SpectrumStats


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return s > rank_tolerance(s.dtype) * s.amax(dim=-1, keepdim=True).clamp_min(1e-300)


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """exp(entropy of σ / Σσ). s: [..., q] → [...]; 0 for an all-zero spectrum."""
    p = s * _nonzero(s) / s.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(dim=-1)
    return torch.where(s.amax(dim=-1) > 0, entropy.exp(), 0.0)


def spectrum_stats(s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Appendix D statistics of singular values s: [..., q] → each [...]."""
    energy = s.square()
    total = energy.sum(dim=-1)
    top = s.amax(dim=-1)
    smallest = torch.where(_nonzero(s), s, torch.inf).amin(dim=-1)
    return {
        "max_energy_share": energy.amax(dim=-1) / total.clamp_min(1e-300),
        "effective_rank": effective_rank(s),
        "stable_rank": total / top.square().clamp_min(1e-300),
        "condition_number": torch.where(top > 0, top / smallest, 0.0),
        "frobenius_norm": total.sqrt(),
    }


def _column_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the column space of x [G, m, r] (zero columns beyond its rank)
    and the rank per module [G]."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    keep = _nonzero(s)
    return u * keep[..., None, :], keep.sum(dim=-1)


def _overlaps(bases: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Pairwise ‖Q_iᵀ Q_j‖²_F / min(r_i, r_j). → [G, n, n]."""
    n = len(bases)
    out = torch.zeros(bases[0][0].shape[0], n, n, dtype=bases[0][0].dtype)
    for i, (qi, ri) in enumerate(bases):
        for j, (qj, rj) in enumerate(bases):
            smaller = torch.minimum(ri, rj).to(qi.dtype)
            value = (qi.mT @ qj).square().sum(dim=(-2, -1)) / smaller.clamp_min(1)
            out[:, i, j] = value.cpu()
    return out


def pool_diagnostics(
    pool: AdapterPool, *, device: torch.device | None = None, dtype: torch.dtype = torch.float64
) -> PoolDiagnostics:
    """Overlap, effective rank and shared-component diagnostics of every module of `pool`."""
    device = device or torch.device("cpu")
    results: list[ModuleDiagnostics] = []
    for group in pool.groups(device, dtype):
        overlap_b = _overlaps([_column_basis(b) for b in group.lora_b])
        overlap_a = _overlaps([_column_basis(a.mT) for a in group.lora_a])
        erank_b = torch.stack([effective_rank(torch.linalg.svdvals(b)) for b in group.lora_b], 1)
        erank_a = torch.stack([effective_rank(torch.linalg.svdvals(a)) for a in group.lora_a], 1)
        joint = calibrate(group.lora_b)
        top = min(TOP_COMPONENTS, int(joint.sharing.shape[-1]))
        per_adapter = torch.stack(
            [(joint.basis[..., :top].mT @ b).square().sum(dim=-1) for b in group.lora_b], -1
        )  # [G, top, n]
        contribution = per_adapter / per_adapter.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        for g, module in enumerate(group.modules):
            results.append(
                ModuleDiagnostics(
                    module=module,
                    overlap_b=_rows(overlap_b[g]),
                    overlap_a=_rows(overlap_a[g]),
                    effective_rank_b=tuple(erank_b[g].tolist()),
                    effective_rank_a=tuple(erank_a[g].tolist()),
                    shared_energy=tuple(joint.sharing[g, :top].tolist()),
                    shared_contribution=_rows(contribution[g]),
                )
            )
    order = {name: i for i, name in enumerate(pool.module_names)}
    results.sort(key=lambda d: order[d.module])
    kinds: dict[str, list[ModuleDiagnostics]] = {}
    for item in results:
        kinds.setdefault(item.module.rsplit(".", 1)[-1], []).append(item)
    return PoolDiagnostics(
        adapters=pool.names,
        modules=tuple(results),
        overall=_summarize(results),
        by_module_type={kind: _summarize(items) for kind, items in sorted(kinds.items())},
    )


def _rows(matrix: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(row) for row in matrix.tolist())


def _summarize(items: Sequence[ModuleDiagnostics]) -> Summary:
    def pair_mean(matrices: list[tuple[tuple[float, ...], ...]]) -> float:
        values = [m[i][j] for m in matrices for i in range(len(m)) for j in range(len(m)) if i < j]
        return sum(values) / len(values) if values else 0.0

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    width = min(len(d.shared_energy) for d in items)
    return Summary(
        modules=len(items),
        mean_overlap_b=pair_mean([d.overlap_b for d in items]),
        mean_overlap_a=pair_mean([d.overlap_a for d in items]),
        mean_effective_rank_b=mean([v for d in items for v in d.effective_rank_b]),
        mean_effective_rank_a=mean([v for d in items for v in d.effective_rank_a]),
        mean_shared_energy=tuple(mean([d.shared_energy[k] for d in items]) for k in range(width)),
    )


def merged_spectrum(result: MergeResult) -> dict[str, SpectrumStats]:
    """Spectrum statistics of every module of a merged adapter (computed on its factors)."""
    out: dict[str, SpectrumStats] = {}
    for module, factors in result.modules.items():
        _, s, _ = factored_svd(factors.lora_b[None], factors.lora_a[None])
        stats = spectrum_stats(s[0])
        out[module] = SpectrumStats(**{key: float(value) for key, value in stats.items()})
    return out


def merged_diagnostics(
    pool: AdapterPool,
    preference: Mapping[str, float],
    spec: MergeSpec | None = None,
    *,
    device: str | torch.device | None = "auto",
) -> MergedDiagnostics:
    """Spectrum statistics of the merge `spec` describes, without and with Pico."""
    spec = spec or MergeSpec()
    stats = {
        pico: merged_spectrum(
            merge(pool, preference, dataclasses.replace(spec, pico=pico), device=device)
        )
        for pico in (False, True)
    }
    return MergedDiagnostics(
        without_pico=stats[False],
        with_pico=stats[True],
        mean_without_pico=_mean_stats(stats[False].values()),
        mean_with_pico=_mean_stats(stats[True].values()),
    )


def _mean_stats(items: Iterable[SpectrumStats]) -> SpectrumStats:
    rows = list(items)
    fields = [f.name for f in dataclasses.fields(SpectrumStats)]
    return SpectrumStats(**{f: sum(getattr(r, f) for r in rows) / len(rows) for f in fields})
