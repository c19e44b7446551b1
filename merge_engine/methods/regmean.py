"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"): the update that best reproduces every task's outputs on that task's inputs.

Per module, with G_t = E[x xᵀ] of the module's input on task t's prompts (the adapter's input
statistics), the merge solves min_ΔW Σ_t ρ_t ‖ΔW X_t − ΔW_t X_t‖², i.e.

    ΔW = λ · (Σ_t ρ_t ΔW_t G̃_t) (Σ_t ρ_t G̃_t + εI)⁻¹,   G̃_t = α G_t + (1 − α) diag(G_t)

where α (`off_diagonal`) shrinks the off-diagonal entries as the paper does (α = 1 is plain
RegMean, whose Gram sums are often ill-conditioned; α = 0 weighs each input feature on its own)
and ε = 1e-6 · tr(M)/in guards zero-variance features. Exact on the factors: ΔW_t G̃_t M⁻¹ =
B_t (A_t G̃_t M⁻¹), so the result is the rank-R LoRA [B_1 | … | B_n] [A_1'; …; A_n'] and only
in × in systems are solved, never an out × in matrix. A one-hot preference returns the adapter
(× λ) exactly; a zero-weight adapter takes no part.

Per merge, M is formed and factorised once per input *site*: modules that read the same input
(q_proj and v_proj of one layer) have the same G_t, also across module groups. G_t A_tᵀ depends
on neither ρ nor α and comes with the pool's cached statistics (`TaskStatistics.products`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import LowRank
from .base import MergeMethod, MethodParams, TaskSet, check_fraction

RIDGE = 1e-6
"""ε relative to the mean diagonal of the merged Gram matrix."""


@dataclass(frozen=True)
class RegMeanParams(MethodParams):
    """`scaling` λ (default 1: the regression solution itself); `off_diagonal` α."""

    off_diagonal: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("off_diagonal", self.off_diagonal, low_open=False, high_open=False)


def merged_gram(
    moments: tuple[torch.Tensor, ...], rho: torch.Tensor, off_diagonal: float
) -> torch.Tensor:
    """M = Σ_t ρ_t G̃_t + εI for per-task Gram stacks [G, in, in], in one new tensor.

    Σ_t ρ_t G̃_t = α S + (1 − α) diag(S) with S = Σ_t ρ_t G_t: S's off-diagonal entries times α,
    its diagonal kept. Accumulated in place (no per-task temporaries: these stacks are the
    merge's largest tensors, and allocating them costs more than the arithmetic).
    """
    weights: list[float] = rho.tolist()
    total = moments[0] * weights[0]
    for weight, moment in zip(weights[1:], moments[1:], strict=True):
        total.add_(moment, alpha=weight)
    diagonal = torch.diagonal(total, dim1=-2, dim2=-1)
    kept = diagonal.clone()
    total.mul_(off_diagonal)
    ridge = (RIDGE * kept.mean(-1)).clamp_min(1e-12)
    diagonal.copy_(kept + ridge[:, None])
    return total


def factorised_gram(
    moments: tuple[torch.Tensor, ...], rho: torch.Tensor, off_diagonal: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """M = `merged_gram` [S, in, in] and its Cholesky factor [S, in, in] (M is symmetric positive
    definite; None if rounding broke that anywhere, and M must be solved in general)."""
    total = merged_gram(moments, rho, off_diagonal)
    factor, failed = torch.linalg.cholesky_ex(total)
    return total, None if bool(failed.any()) else factor


def shrunk_times(
    product: torch.Tensor, diagonal: torch.Tensor, a: torch.Tensor, off_diagonal: float
) -> torch.Tensor:
    """G̃ Aᵀ = α G Aᵀ + (1 − α) diag(G) Aᵀ from G Aᵀ [G, in, r], diag(G) [G, in] and A [G, r, in]:
    [G, in, r]."""
    return torch.add(
        (1.0 - off_diagonal) * diagonal[:, :, None] * a.mT, product, alpha=off_diagonal
    )


class RegMean(MergeMethod[RegMeanParams]):
    name = "regmean"
    summary = (
        "RegMean: the least-squares merge on each adapter's input statistics, exact on the "
        "factors (needs input_statistics.safetensors per adapter)"
    )
    exact_low_rank = True
    needs_statistics = True
    params_type = RegMeanParams

    def merge(self, tasks: TaskSet, params: RegMeanParams, target_rank: int) -> LowRank:
        if tasks.statistics is None:
            raise ValueError("regmean needs the tasks' input statistics")
        scaling = params.resolved_scaling(1.0)
        if tasks.count == 1:  # the regression solution is the adapter itself (ε only guards)
            return LowRank.exact(tasks.b[0], scaling * tasks.a[0])
        alpha, statistics = params.off_diagonal, tasks.statistics
        sites = statistics.sites
        total, factor = sites.derive(  # once per input site and merge, for every module group
            ("regmean", alpha, tuple(tasks.rho.tolist())),
            lambda: factorised_gram(sites.moments, tasks.rho, alpha),
        )
        # A_t' = λ ρ_t A_t G̃_t M⁻¹ = λ ρ_t (M⁻¹ G̃_t A_tᵀ)ᵀ (M and G̃_t are symmetric)
        diagonals = [statistics.rows(torch.diagonal(m, dim1=-2, dim2=-1)) for m in sites.moments]
        rhs = torch.cat(
            [
                shrunk_times(p, d, a, alpha)
                for p, d, a in zip(statistics.products, diagonals, tasks.a, strict=True)
            ],
            dim=-1,
        )
        if factor is None:
            solved = torch.linalg.solve(statistics.rows(total), rhs).mT  # [G, R, in]
        else:
            solved = torch.cholesky_solve(rhs, statistics.rows(factor)).mT
        weights = torch.cat(
            [w.expand(int(a.shape[-2])) for w, a in zip(tasks.rho, tasks.a, strict=True)]
        )
        return LowRank.exact(torch.cat(tasks.b, dim=-1), scaling * weights[:, None] * solved)
