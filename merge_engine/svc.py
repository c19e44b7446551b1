"""SVC: spectral over-accumulation calibration, a post-stage on any merged update.

For the merged W_m = U diag(σ) Vᵀ and each task update W_t (the tasks that took part, as the
rule saw them), s_{j,t} = ⟨u_jᵀ W_m, u_jᵀ W_t⟩ / ‖u_jᵀ W_t‖². As in the authors' code
(lyymuwu/SVC, `coef_cal_multi_ranks`): η_j = max(mean_t s_{j,t}, α) when every s_{j,t} > 0,
else η_j = 1; then σ_j ← σ_j / η_j (α = 1: shrink only). All on the factors: u_jᵀ W_t is a
row of (Uᵀ B_t) A_t, and every quantity is an r × r product.
"""

from __future__ import annotations

import torch

from .linalg import LowRank, factored_svd, spectral_factors
from .methods.base import TaskSet


def svc(merged: LowRank, tasks: TaskSet, alpha: float = 1.0) -> LowRank:
    """Rescale the singular values of `merged` by SVC. → LowRank of the same rank or lower."""
    u, s, v = factored_svd(merged.b, merged.a)  # U [G, out, q], s [G, q], V [G, in, q]
    ratios = []
    for b, a in zip(tasks.b, tasks.a, strict=True):
        projected = u.mT @ b  # [G, q, r_t]: rows u_jᵀ B_t
        inner = s * torch.diagonal(projected @ (a @ v), dim1=-2, dim2=-1)  # ⟨σ_j v_j, u_jᵀW_t⟩
        norm_sq = torch.diagonal(projected @ (a @ a.mT) @ projected.mT, dim1=-2, dim2=-1)
        ratios.append(inner / norm_sq.clamp_min(1e-12))
    ratio = torch.stack(ratios, dim=-1)  # [G, q, n]
    eta = torch.where(
        (ratio > 0).all(dim=-1), ratio.mean(dim=-1).clamp_min(alpha), torch.ones_like(s)
    )
    out = spectral_factors(u, s / eta, v)
    return LowRank(out.b, out.a, merged.retained_energy)
