"""Batched linear algebra on LoRA factors, never forming the out × in update.

Every function takes a leading batch axis G (modules of one shape) and works on all of them
with one batched QR / SVD / matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """A batch of low-rank updates in factored form: ΔW[g] = b[g] @ a[g].

    `retained_energy[g]` is the fraction of ‖ΔW[g]‖²_F kept by every truncation applied on the
    way here (1 where the result is exact).
    """

    b: torch.Tensor  # [G, out, r]
    a: torch.Tensor  # [G, r, in]
    retained_energy: torch.Tensor  # [G]

    @classmethod
    def exact(cls, b: torch.Tensor, a: torch.Tensor) -> LowRank:
        return cls(b, a, torch.ones(b.shape[0], device=b.device, dtype=b.dtype))

    @property
    def rank(self) -> int:
        return int(self.a.shape[-2])

    def with_factors(self, b: torch.Tensor, a: torch.Tensor) -> LowRank:
        return LowRank(b, a, self.retained_energy)


def rank_tolerance(dtype: torch.dtype) -> float:
    """Relative singular-value threshold below which a component counts as numerical zero."""
    return 1e3 * torch.finfo(dtype).eps


def tall_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of tall matrices x [G, m, R] (m ≥ R) by one QR and the SVD of the R × R factor:
    the one QR + small-SVD primitive every method builds on.

    → U [G, m, p], S [G, p] (descending), Vᴴ [G, p, R] with p = min(m, R) and x = U diag(S) Vᴴ.
    Cost O(m R² + R³) per module.
    """
    q, r = torch.linalg.qr(x)  # [G, m, p], [G, p, R]
    u_small, s, vh = torch.linalg.svd(r, full_matrices=False)
    return q @ u_small, s, vh


def factored_svd(
    b: torch.Tensor, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of M = b @ a from the factors (P1), never forming M.

    b: [G, out, R], a: [G, R, in] → U [G, out, q], S [G, q] (descending), V [G, in, q] with
    q = min(out, in, R) and M = U diag(S) Vᵀ. With a = Rₐᵀ Qₐᵀ (QR of aᵀ), M = (b Rₐᵀ) Qₐᵀ and
    the tall SVD of b Rₐᵀ gives U, S and V = Qₐ Vᴴᵀ. Cost O((out + in) R² + R³) per module.
    """
    qa, ra = torch.linalg.qr(a.mT)  # [G, in, p], [G, p, R]
    u, s, vh = tall_svd(b @ ra.mT)  # U [G, out, q], Vᴴ [G, q, p]
    return u, s, qa @ vh.mT


def block_diagonal(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """blockdiag(a_1, …, a_n) per module: a_t [G, r_t, in_t] → [G, Σ r_t, Σ in_t]."""
    rows = sum(int(a.shape[-2]) for a in blocks)
    cols = sum(int(a.shape[-1]) for a in blocks)
    first = blocks[0]
    out = first.new_zeros(first.shape[0], rows, cols)
    row = col = 0
    for a in blocks:
        r, c = int(a.shape[-2]), int(a.shape[-1])
        out[:, row : row + r, col : col + c] = a
        row, col = row + r, col + c
    return out


def frobenius_sq(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖b @ a‖²_F per module (P2: tr((bᵀb)(aaᵀ))). b: [G, out, R], a: [G, R, in] → [G]."""
    return ((b.mT @ b) * (a @ a.mT)).sum(dim=(-2, -1)).clamp_min(0)


def polar(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor P Qᵀ of x = P Σ Qᵀ (the nearest matrix with orthonormal columns
    or rows). x: [G, m, n] → [G, m, n]."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    factor: torch.Tensor = p @ qh
    return factor


def spectral_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, rank: int | None = None
) -> LowRank:
    """Balanced LoRA factors from an SVD, dropping numerical zeros and truncating to `rank`.

    u: [G, out, q], s: [G, q], v: [G, in, q] → b = U √S, a = √S Vᵀ with r ≤ q columns, where r
    is the largest count of non-negligible singular values over the batch (at most `rank`).
    `retained_energy` is the kept share of Σ s² per module.
    """
    tolerance = rank_tolerance(s.dtype) * s.amax(dim=-1, keepdim=True)
    nonzero = int((s > tolerance).sum(dim=-1).max()) if s.numel() else 0
    keep = max(1, min(nonzero, rank if rank is not None else nonzero))
    energy = s.square()
    total = energy.sum(dim=-1)
    kept = energy[..., :keep].sum(dim=-1)
    retained = torch.where(total > 0, kept / total.clamp_min(torch.finfo(s.dtype).tiny), 1.0)
    root = s[..., :keep].clamp_min(0).sqrt()
    b = u[..., :keep] * root[..., None, :]
    a = (v[..., :keep] * root[..., None, :]).mT
    return LowRank(b, a.contiguous(), retained)


def compact(update: LowRank, rank: int | None = None) -> LowRank:
    """Re-factor an update as balanced SVD factors of the smallest exact rank (≤ `rank`).

    Multiplies the retained energy of any truncation into `update.retained_energy`.
    """
    u, s, v = factored_svd(update.b, update.a)
    out = spectral_factors(u, s, v, rank)
    return LowRank(out.b, out.a, out.retained_energy * update.retained_energy)


def truncate_dense(delta: torch.Tensor, rank: int) -> LowRank:
    """Best rank-`rank` approximation of dense updates via a thin SVD (Eckart–Young).

    delta: [G, out, in] → factors of rank ≤ `rank` and the retained energy fraction per module.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return spectral_factors(u, s, vh.mT, rank)


def pad_rank(update: LowRank, rank: int) -> LowRank:
    """The same update with zero components appended up to `rank` (≥ update.rank)."""
    extra = rank - update.rank
    if extra <= 0:
        return update
    b = torch.nn.functional.pad(update.b, (0, extra))
    a = torch.nn.functional.pad(update.a, (0, 0, 0, extra))
    return update.with_factors(b, a)


def concat_batches(pieces: Sequence[LowRank]) -> LowRank:
    """Join batches of updates along the module axis, padding them to a common rank."""
    rank = max(piece.rank for piece in pieces)
    padded = [pad_rank(piece, rank) for piece in pieces]
    return LowRank(
        torch.cat([p.b for p in padded]),
        torch.cat([p.a for p in padded]),
        torch.cat([p.retained_energy for p in padded]),
    )
