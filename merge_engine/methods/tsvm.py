"""TSV-M (Task Singular Vectors: Merging), the LoRA-correct variant.

Per task, the thin SVD of its update (computed on the factors); keep its leading
k_t = min(r_t, ⌊min(out, in) / n⌋) non-zero components; concatenate U, V and the weighted
singular values of all tasks; replace U and V by their orthogonal polar factors:
ΔW = U⊥ diag(λ_t S_t) V⊥ᵀ → LoRA b = U⊥ diag(λS), a = V⊥ᵀ. Numerically zero components are
zeroed instead of kept, so null-space vectors never enter the polar factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import LowRank, factored_svd, polar, rank_tolerance
from .base import MergeMethod, MethodParams, TaskSet


@dataclass(frozen=True)
class TsvmParams(MethodParams):
    """`scaling` α of the merged update; the default 1.0 is the published one."""


def tsvm(tasks: TaskSet, weights: torch.Tensor) -> LowRank:
    """TSV-M of `tasks` with per-task weights [n] on the singular values."""
    keep = max(1, min(tasks.out_features, tasks.in_features) // len(tasks.names))
    us, ss, vs = [], [], []
    for b, a, weight in zip(tasks.b, tasks.a, weights, strict=True):
        u, s, v = factored_svd(b, a)
        count = min(keep, int(s.shape[-1]))
        u, s, v = u[..., :count], s[..., :count], v[..., :count]
        nonzero = s > rank_tolerance(s.dtype) * s[..., :1]
        us.append(u * nonzero[..., None, :])
        vs.append(v * nonzero[..., None, :])
        ss.append(weight * s * nonzero)
    u_perp = polar(torch.cat(us, dim=-1))
    v_perp = polar(torch.cat(vs, dim=-1))
    b_merged = u_perp * torch.cat(ss, dim=-1)[..., None, :]
    return LowRank.exact(b_merged, v_perp.mT.contiguous())


class Tsvm(MergeMethod[TsvmParams]):
    name = "tsvm"
    summary = "TSV-M: per-task SVD, orthogonalised by polar factors (LoRA-correct)"
    exact_low_rank = True
    params_type = TsvmParams

    def merge(self, tasks: TaskSet, params: TsvmParams, target_rank: int) -> LowRank:
        return tsvm(tasks, tasks.weights(params.resolved_scaling(1.0)))
