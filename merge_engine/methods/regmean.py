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


def shrunk_times(moment: torch.Tensor, a: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """G̃ Aᵀ = α G Aᵀ + (1 − α) diag(G) Aᵀ for G [G, in, in] and A [G, r, in]: [G, in, r]."""
    diagonal = torch.diagonal(moment, dim1=-2, dim2=-1)
    return torch.baddbmm(
        (1.0 - off_diagonal) * diagonal[:, :, None] * a.mT, moment, a.mT, alpha=off_diagonal
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
        if tasks.moments is None:
            raise ValueError("regmean needs the tasks' input moments")
        scaling = params.resolved_scaling(1.0)
        if tasks.count == 1:  # the regression solution is the adapter itself (ε only guards)
            return LowRank.exact(tasks.b[0], scaling * tasks.a[0])
        total = merged_gram(tasks.moments, tasks.rho, params.off_diagonal)
        # A_t' = λ ρ_t A_t G̃_t M⁻¹ = λ ρ_t (M⁻¹ G̃_t A_tᵀ)ᵀ (M and G̃_t are symmetric)
        rhs = torch.cat(
            [
                shrunk_times(m, a, params.off_diagonal)
                for m, a in zip(tasks.moments, tasks.a, strict=True)
            ],
            dim=-1,
        )
        factor, failed = torch.linalg.cholesky_ex(total)  # M is symmetric positive definite
        if bool(failed.any()):  # only if rounding broke definiteness: the general solver
            solved = torch.linalg.solve(total, rhs).mT  # [G, R, in]
        else:
            solved = torch.cholesky_solve(rhs, factor).mT
        weights = torch.cat(
            [w.expand(int(a.shape[-2])) for w, a in zip(tasks.rho, tasks.a, strict=True)]
        )
        return LowRank.exact(torch.cat(tasks.b, dim=-1), scaling * weights[:, None] * solved)
