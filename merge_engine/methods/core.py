"""Core Space merging: merge in the R × R space spanned by the pool's own bases.

U_B = left singular vectors of B_cat, V_A = right singular vectors of A_cat (scales folded in).
The core factors U_Bᵀ B_t and A_t V_Aᵀ are lossless (U_B M_t V_A = B_t A_t); any rule (TA,
TIES, TSV-M, DARE) merges them there, and the result maps back as b = U_B b_core,
a = a_core V_A. Core-space TA equals full-space TA exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from ..errors import InvalidParameterError
from ..linalg import LowRank, tall_svd
from ..sparsify import MajoritySign
from .base import MergeMethod, MethodParams, TaskSet, check_choice

InnerRule = Literal["ta", "ties", "tsvm", "dare_linear", "dare_ties"]
INNER_RULES: tuple[str, ...] = get_args(InnerRule)


def inner_method(name: str) -> MergeMethod[Any]:
    """The registered method that `core` applies in its space (the one registry)."""
    from .registry import METHODS  # the registry lists `core` itself: resolved at call time

    return METHODS.get(name)


@dataclass(frozen=True)
class CoreParams(MethodParams):
    """`inner` is the rule applied in the core space; the other fields are passed to it
    (None: the inner rule's default). `scaling` is the inner rule's λ."""

    inner: InnerRule = "ta"
    density: float | None = None
    drop_rate: float | None = None
    majority_sign: MajoritySign | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("inner", self.inner, INNER_RULES)
        self.inner_params()  # validate the combination now, not at merge time

    def inner_params(self) -> MethodParams:
        given = {
            "scaling": self.scaling,
            "density": self.density,
            "drop_rate": self.drop_rate,
            "majority_sign": self.majority_sign,
            "seed": self.seed,
        }
        values = {name: value for name, value in given.items() if value is not None}
        try:
            params: MethodParams = inner_method(self.inner).parse_params(values)
        except InvalidParameterError as err:
            raise InvalidParameterError(
                err.field, f"{err} (core with inner={self.inner!r})"
            ) from None
        return params


def core_bases(tasks: TaskSet) -> tuple[torch.Tensor, torch.Tensor]:
    """U_B [G, out, p] (left singular vectors of B_cat) and V_A [G, p', in] (right singular
    vectors of A_cat, as rows), both from QR + SVD of small cores."""
    u_b, _, _ = tall_svd(torch.cat(tasks.b, dim=-1))
    v_a, _, _ = tall_svd(torch.cat(tasks.a, dim=-2).mT)
    return u_b, v_a.mT


class Core(MergeMethod[CoreParams]):
    name = "core"
    summary = "Core Space: any rule (ta/ties/tsvm/dare) in the R × R core space (exact low rank)"
    exact_low_rank = True
    params_type = CoreParams

    def merge(self, tasks: TaskSet, params: CoreParams, target_rank: int) -> LowRank:
        u_b, v_a = core_bases(tasks)
        core_tasks = tasks.replace(
            b=tuple(u_b.mT @ b for b in tasks.b), a=tuple(a @ v_a.mT for a in tasks.a)
        )
        full_rank = min(int(u_b.shape[-1]), int(v_a.shape[-2]))
        merged = inner_method(params.inner).merge(core_tasks, params.inner_params(), full_rank)
        return merged.with_factors(u_b @ merged.b, merged.a @ v_a)
