"""TIES, DARE and DARE-TIES in the full weight space.

Elementwise rules destroy low rank, so these form the dense out × in update of each task,
merge entry by entry, and truncate the result to the target rank with a thin SVD (the retained
energy is reported). Modules are processed in chunks so the dense tensors stay within a bound.
"""

from __future__ import annotations

from ..linalg import LowRank, concat_batches, truncate_dense
from .base import MergeMethod, TaskSet
from .rules import (
    DareLinearParams,
    DareTiesParams,
    ElementwiseParams,
    TiesParams,
    merge_elementwise,
)

# Largest dense task stack (n × out × in entries per chunk of modules) formed at once.
DENSE_CHUNK_ELEMENTS = 1 << 26


class _FullSpace(MergeMethod[ElementwiseParams]):
    exact_low_rank = False
    default_scaling_is_mean = False  # True: default λ = 1/N (a weighted average)

    def merge(self, tasks: TaskSet, params: ElementwiseParams, target_rank: int) -> LowRank:
        default = 1.0 / tasks.count if self.default_scaling_is_mean else 1.0
        scaling = params.resolved_scaling(default)
        per_module = len(tasks.names) * tasks.out_features * tasks.in_features
        step = max(1, DENSE_CHUNK_ELEMENTS // per_module)
        pieces = []
        for start in range(0, len(tasks.modules), step):
            chunk = tasks.batch(start, start + step)
            delta = merge_elementwise(chunk.dense(), chunk, params.rule(), scaling)
            pieces.append(truncate_dense(delta, target_rank))
        return concat_batches(pieces)


class Ties(_FullSpace):
    name = "ties"
    summary = "TIES in full space (trim, elect sign, disjoint mean), truncated by SVD"
    params_type = TiesParams


class DareLinear(_FullSpace):
    name = "dare_linear"
    summary = "DARE random drop and rescale, then weighted sum, truncated by SVD"
    params_type = DareLinearParams
    default_scaling_is_mean = True


class DareTies(_FullSpace):
    name = "dare_ties"
    summary = "DARE random drop and rescale, then TIES sign election, truncated by SVD"
    params_type = DareTiesParams
