"""Elementwise primitives of TIES and DARE on dense stacks of task matrices.

These act on a dense space: the full update (TIES/DARE in full space), the KnOTS coefficient
space or the Core Space. Shapes: τ is [G, n, m, k] (G modules, n tasks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch

MajoritySign = Literal["total", "frequency"]


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` fraction of entries of each task matrix by magnitude.

    tau: [G, n, m, k] → bool mask of the same shape, True where |τ| ≥ the k-th largest |τ| of
    its (module, task) matrix, k = max(1, ⌊density · m·k⌋). Ties at the threshold are kept.
    """
    if density >= 1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    flat = tau.abs().flatten(start_dim=-2)
    count = flat.shape[-1]
    keep = max(1, int(density * count))
    threshold = flat.kthvalue(count - keep + 1, dim=-1, keepdim=True).values
    return (flat >= threshold).view_as(tau)


def task_seed(seed: int, module: str, task: str) -> int:
    """A 63-bit seed for one (module, task) draw: independent of batching and pool order."""
    digest = hashlib.sha256(f"{seed}\0{module}\0{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_keep_mask(
    shape: torch.Size,
    drop_rate: float,
    seed: int,
    modules: Sequence[str],
    tasks: Sequence[str],
    device: torch.device,
) -> torch.Tensor:
    """DARE's Bernoulli keep mask: each entry kept with probability 1 − `drop_rate`.

    shape is [G, n, m, k]; the draw for (module g, task t) comes from its own generator seeded
    by `task_seed(seed, modules[g], tasks[t])`, so it does not depend on the batch layout. A
    draw u ~ U[0, 1) keeps the entry when u ≥ drop_rate.
    """
    g_count, n_count, rows, cols = shape
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    for g in range(g_count):
        for t in range(n_count):
            generator = torch.Generator(device=device)
            generator.manual_seed(task_seed(seed, modules[g], tasks[t]))
            draw = torch.rand((rows, cols), generator=generator, device=device)
            mask[g, t] = draw >= drop_rate
    return mask


def significant_sign(tau: torch.Tensor) -> torch.Tensor:
    """sign(τ), with entries at rounding-noise level (|τ| ≤ 64 ε · max|τ| of their (module,
    task) matrix) counted as 0: exact-arithmetic zeros must not vote or count as agreeing.
    tau: [G, n, m, k] → [G, n, m, k]."""
    noise = 64 * torch.finfo(tau.dtype).eps * tau.abs().amax(dim=(-2, -1), keepdim=True)
    return torch.where(tau.abs() > noise, torch.sign(tau), 0.0)


def elect_sign(tau: torch.Tensor, rho: torch.Tensor, method: MajoritySign) -> torch.Tensor:
    """TIES sign election per entry. tau: [G, n, m, k], rho: [n] → γ ∈ {−1, 0, 1}: [G, m, k].

    "total": sign of the ρ-weighted sum; "frequency": sign of the count of positive minus
    negative entries.
    """
    if method == "total":
        return torch.sign((tau * rho[:, None, None]).sum(dim=1))
    return torch.sign(significant_sign(tau).sum(dim=1))


def disjoint_mean(tau: torch.Tensor, rho: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """ρ-weighted mean over the tasks whose entry is non-zero and agrees with `sign`
    (non-zero as `significant_sign` decides).

    tau: [G, n, m, k], rho: [n] (positive), sign: [G, m, k] → [G, m, k]
    out = Σ_t ρ_t τ_t [sign(τ_t) = γ] / Σ_t ρ_t [sign(τ_t) = γ]  (0 where no task agrees).
    With uniform ρ this is TIES's disjoint mean; with one task it returns that task.
    """
    agree = (significant_sign(tau) == sign[:, None]) & (sign[:, None] != 0)
    weights = rho[:, None, None] * agree
    numerator = (tau * weights).sum(dim=1)
    denominator = weights.sum(dim=1)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), 0.0)
