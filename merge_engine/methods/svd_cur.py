"""The SVD + CUR hybrid (representation-geometry paper, §4, eq. 29–34).

SVD branch: KnOTS-TIES in the shared SVD basis truncated to its leading `branch_rank`
components. CUR branch: the `branch_rank` columns of [ΔW_1 | … | ΔW_n] with the largest ℓ2
norms, orthonormalised by QR into C; task coefficients X_t = Cᵀ ΔW_t (= C⁺ ΔW_t), merged by the
same TIES; ΔW_CUR = C X_merged. Mix ΔW = α ΔW_SVD + (1 − α) ΔW_CUR with α = M_SVD / (M_SVD +
M_CUR) (eq. 33), M = √(residual energy) = the part of Σ_t ‖ΔW_t‖² a branch's basis does not
capture (eq. 15), per module; α = ½ when both residuals are 0. Everything stays factored: the
result is the LoRA [α U | (1 − α) C] [X_SVD; X_CUR] of rank ≤ 2 · branch_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import LowRank, block_diagonal, frobenius_sq, rank_tolerance
from .base import MergeMethod, TaskSet, check_fraction, check_positive_int
from .knots import shared_basis
from .rules import TiesParams, merge_elementwise


@dataclass(frozen=True)
class SvdCurParams(TiesParams):
    """TIES inside both branches (defaults as KnOTS-TIES: density 1.0, λ 0.5).

    `branch_rank`: SVD components and CUR columns kept (None: the largest adapter rank).
    `mix`: the weight α in [0, 1] of the SVD branch; 0.8 was best on validation with and
    without Pico (docs/quality.md); None: the residual rule of eq. 33 as the paper writes it.
    """

    density: float = 1.0
    branch_rank: int | None = None
    mix: float | None = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("branch_rank", self.branch_rank)
        if self.mix is not None:
            check_fraction("mix", self.mix, low_open=False, high_open=False)


def cur_columns(tasks: TaskSet, count: int) -> torch.Tensor:
    """Orthonormalised top-`count` columns (by ℓ2 norm) of [ΔW_1 | … | ΔW_n]. → C [G, out, c].

    Columns are orthonormalised in order (Gram–Schmidt, the QR of the paper); a column that
    depends on the ones before it is zeroed (its coefficient row is then 0 and still counts
    among the entries TIES's density applies to).

    Column j of task t is B_cat z with z the t-th block of blockdiag(a_1, …, a_n) (R × n·in), so
    norms and columns come from R-sized vectors, never from the dense updates.
    """
    b_cat = torch.cat(tasks.b, dim=-1)  # [G, out, R]
    coefficients = block_diagonal(tasks.a)  # [G, R, n·in]
    gram = b_cat.mT @ b_cat  # [G, R, R]
    norms = ((gram @ coefficients) * coefficients).sum(dim=-2)  # [G, n·in] squared norms
    top = norms.topk(min(count, int(norms.shape[-1])), dim=-1).indices  # [G, c]
    chosen = coefficients.gather(-1, top[:, None, :].expand(-1, coefficients.shape[-2], -1))
    return gram_schmidt(b_cat @ chosen)


def gram_schmidt(columns: torch.Tensor) -> torch.Tensor:
    """Orthonormalise columns [G, out, c] in order; a column that depends on the earlier ones
    (residual ≤ tolerance · its norm) becomes a zero column. → [G, out, c]."""
    tolerance = rank_tolerance(columns.dtype)
    basis = torch.zeros_like(columns)
    for j in range(int(columns.shape[-1])):
        column = columns[..., j : j + 1]
        residual = column
        for _ in range(2):  # re-orthogonalise once: classical Gram–Schmidt loses orthogonality
            residual = residual - basis @ (basis.mT @ residual)
        norm = residual.norm(dim=-2, keepdim=True)
        independent = norm > tolerance * column.norm(dim=-2, keepdim=True)
        basis[..., j : j + 1] = torch.where(independent, residual / norm.clamp_min(1e-300), 0.0)
    return basis


class SvdCur(MergeMethod[SvdCurParams]):
    name = "svd_cur"
    summary = "SVD + CUR hybrid: KnOTS-TIES mixed with a column-basis TIES merge (low rank)"
    exact_low_rank = True
    params_type = SvdCurParams

    def merge(self, tasks: TaskSet, params: SvdCurParams, target_rank: int) -> LowRank:
        count = params.branch_rank or max(int(a.shape[-2]) for a in tasks.a)
        scaling = params.resolved_scaling(0.5)
        rule = params.rule()
        total = torch.stack(
            [frobenius_sq(b, a) for b, a in zip(tasks.b, tasks.a, strict=True)]
        ).sum(dim=0)  # [G]

        basis, coefficients = shared_basis(tasks)
        basis, kept = basis[..., :count], coefficients[:, :, :count]
        merged_svd = merge_elementwise(kept, tasks, rule, scaling)
        residual_svd = (total - kept.square().sum(dim=(1, 2, 3))).clamp_min(0)

        columns = cur_columns(tasks, count)
        projected = torch.stack(
            [(columns.mT @ b) @ a for b, a in zip(tasks.b, tasks.a, strict=True)], dim=1
        )
        merged_cur = merge_elementwise(projected, tasks, rule, scaling)
        residual_cur = (total - projected.square().sum(dim=(1, 2, 3))).clamp_min(0)

        if params.mix is not None:
            alpha = torch.full_like(total, params.mix)
        else:
            m_svd, m_cur = residual_svd.sqrt(), residual_cur.sqrt()
            both = m_svd + m_cur
            alpha = torch.where(both > 0, m_svd / both.clamp_min(1e-30), 0.5)
        b = torch.cat([alpha[:, None, None] * basis, (1 - alpha)[:, None, None] * columns], dim=-1)
        return LowRank.exact(b, torch.cat([merged_svd, merged_cur], dim=-2))
