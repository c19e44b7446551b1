"""KnOTS: align the task updates in one shared SVD basis, merge the coefficients.

[ΔW_1 | … | ΔW_n] (concatenated along the input axis) = U Σ [V_1ᵀ … V_nᵀ]; per task
X_t = Σ V_tᵀ so that U X_t = ΔW_t exactly. TIES or DARE-TIES merge the X_t (R × in, not
out × in); the result is the exact LoRA b = U, a = X_merged. Computed on the factors as the
factored SVD of B_cat · blockdiag(s_1 A_1, …, s_n A_n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from ..linalg import LowRank, block_diagonal, factored_svd, rank_tolerance
from .base import MergeMethod, TaskSet
from .rules import DareTiesParams, ElementwiseRule, TiesParams, merge_elementwise


def shared_basis(tasks: TaskSet) -> tuple[torch.Tensor, torch.Tensor]:
    """KnOTS's joint basis. → U [G, out, q] and X [G, n, q, in] with U @ X[:, t] = ΔW_t.

    Components with σ below the relative tolerance are zeroed (they carry no energy).
    """
    u, s, v = factored_svd(torch.cat(tasks.b, dim=-1), block_diagonal(tasks.a))
    s = s * (s > rank_tolerance(s.dtype) * s[..., :1])
    x = s[..., None] * v.mT  # [G, q, n·in]
    x = x.reshape(*x.shape[:-1], len(tasks.a), -1)  # [G, q, n, in]
    return u, x.movedim(-2, 1)


def merge_in_shared_basis(tasks: TaskSet, rule: ElementwiseRule, scaling: float) -> LowRank:
    basis, coefficients = shared_basis(tasks)
    return LowRank.exact(basis, merge_elementwise(coefficients, tasks, rule, scaling))


@dataclass(frozen=True)
class KnotsTiesParams(TiesParams):
    """KnOTS-TIES; defaults are the authors' Llama-3-8B ones (top-K 100%, λ 0.5)."""

    density: float = 1.0


@dataclass(frozen=True)
class KnotsDareTiesParams(DareTiesParams):
    """KnOTS-DARE-TIES; defaults are the authors' (top-K 100%, p 0.1, λ 0.7)."""

    drop_rate: float = 0.1


P = TypeVar("P", KnotsTiesParams, KnotsDareTiesParams)


class _Knots(MergeMethod[P]):
    exact_low_rank = True
    default_scaling: ClassVar[float]

    def merge(self, tasks: TaskSet, params: P, target_rank: int) -> LowRank:
        scaling = params.resolved_scaling(self.default_scaling)
        return merge_in_shared_basis(tasks, params.rule(), scaling)


class KnotsTies(_Knots[KnotsTiesParams]):
    name = "knots_ties"
    summary = "KnOTS: TIES on the coefficients of a shared SVD basis (exact low rank)"
    params_type = KnotsTiesParams
    default_scaling = 0.5


class KnotsDareTies(_Knots[KnotsDareTiesParams]):
    name = "knots_dare_ties"
    summary = "KnOTS: DARE-TIES on the coefficients of a shared SVD basis (exact low rank)"
    params_type = KnotsDareTiesParams
    default_scaling = 0.7
