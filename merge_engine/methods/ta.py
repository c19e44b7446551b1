"""Task Arithmetic: ΔW = Σ_t λ_t ΔW_t, exactly the rank-R LoRA [B_1 | … | B_n] [λ_1 A_1; …]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import LowRank
from .base import MergeMethod, MethodParams, TaskSet


@dataclass(frozen=True)
class TaskArithmeticParams(MethodParams):
    """`scaling` λ; the default 1/N makes λ_t = ρ_t, the preference-weighted average."""


def task_arithmetic(tasks: TaskSet, weights: torch.Tensor) -> LowRank:
    """Σ_t weights[t] · b_t @ a_t as one LoRA of rank Σ r_t (P3). weights: [n]."""
    b = torch.cat(tasks.b, dim=-1)
    a = torch.cat([w * a for w, a in zip(weights, tasks.a, strict=True)], dim=-2)
    return LowRank.exact(b, a)


class TaskArithmetic(MergeMethod[TaskArithmeticParams]):
    name = "ta"
    summary = "Task Arithmetic: weighted sum of the updates, exact on the factors"
    exact_low_rank = True
    params_type = TaskArithmeticParams

    def merge(self, tasks: TaskSet, params: TaskArithmeticParams, target_rank: int) -> LowRank:
        scaling = params.resolved_scaling(1.0 / tasks.count)
        return task_arithmetic(tasks, tasks.weights(scaling))
