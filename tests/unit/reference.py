"""Dense fp64 reference implementations of the published merge formulas.

Written straight from ../shared/spec/merge-methods.md, one module at a time, with full d × k
matrices and plain dense SVDs: slow and obvious, the opposite of the engine. Each function takes
the dense task updates ΔW_t (LoRA scale included) of one module and returns the merged ΔW.
"""

from __future__ import annotations

import hashlib

import torch

Tensor = torch.Tensor


def svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s, vh


def truncate(m: Tensor, rank: int) -> tuple[Tensor, float]:
    """Best rank-`rank` approximation and its retained energy fraction."""
    u, s, vh = svd(m)
    kept = (u[:, :rank] * s[:rank]) @ vh[:rank]
    total = float((s**2).sum())
    return kept, float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0


def weights(rho: list[float], pool_size: int, scaling: float) -> list[float]:
    return [scaling * pool_size * r for r in rho]


def ta(deltas: list[Tensor], rho: list[float], pool_size: int, scaling: float) -> Tensor:
    return sum(w * d for w, d in zip(weights(rho, pool_size, scaling), deltas, strict=True))


def trim(x: Tensor, density: float) -> Tensor:
    """Keep |x| ≥ the k-th largest |x|, k = max(1, ⌊density · numel⌋)."""
    k = max(1, int(density * x.numel()))
    threshold = x.abs().flatten().sort(descending=True).values[k - 1]
    return x * (x.abs() >= threshold)


def dare_seed(seed: int, module: str, task: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{module}\0{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare(x: Tensor, p: float, seed: int, module: str, task: str) -> Tensor:
    """Drop each entry with probability p (the documented per-(module, task) draw), rescale."""
    generator = torch.Generator().manual_seed(dare_seed(seed, module, task))
    keep = torch.rand(x.shape, generator=generator, dtype=torch.float32) >= p
    return x * keep / (1 - p)


def significant_sign(t: Tensor) -> Tensor:
    """sign, with |t| ≤ 64 ε max|t| (rounding noise of an exact zero) counted as 0."""
    return torch.where(t.abs() > 64 * torch.finfo(t.dtype).eps * t.abs().max(), torch.sign(t), 0.0)


def ties_combine(
    taus: list[Tensor], rho: list[float], scaling: float, sign_rule: str = "total"
) -> Tensor:
    """Sign election and ρ-weighted disjoint mean, times λ."""
    if sign_rule == "total":
        gamma = torch.sign(sum(r * t for r, t in zip(rho, taus, strict=True)))
    else:
        gamma = torch.sign(sum(significant_sign(t) for t in taus))
    numerator = torch.zeros_like(taus[0])
    denominator = torch.zeros_like(taus[0])
    for r, t in zip(rho, taus, strict=True):
        agree = ((significant_sign(t) == gamma) & (gamma != 0)).double()
        numerator += r * t * agree
        denominator += r * agree
    mean = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0.0)
    return scaling * mean


def ties(taus: list[Tensor], rho: list[float], scaling: float, density: float, sign: str) -> Tensor:
    return ties_combine([trim(t, density) for t in taus], rho, scaling, sign)


def tsvm(deltas: list[Tensor], lambdas: list[float]) -> Tensor:
    d, k = deltas[0].shape
    keep = max(1, min(d, k) // len(deltas))
    us, ss, vs = [], [], []
    for delta, lam in zip(deltas, lambdas, strict=True):
        u, s, vh = svd(delta)
        rank = int((s > 1e-10 * s[0]).sum())
        count = min(keep, rank)
        us.append(u[:, :count])
        ss.append(lam * s[:count])
        vs.append(vh[:count].T)

    def polar(x: Tensor) -> Tensor:
        p, _, qh = svd(x)
        return p @ qh

    return polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T


def knots_space(deltas: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """[ΔW_1 | … | ΔW_n] = U Σ [V_1ᵀ … V_nᵀ] → U, X_t = Σ V_tᵀ (σ > tol)."""
    k = deltas[0].shape[1]
    u, s, vh = svd(torch.cat(deltas, dim=1))
    keep = s > 1e-10 * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    return u, [s[:, None] * vh[:, t * k : (t + 1) * k] for t in range(len(deltas))]


def tara(deltas: list[Tensor], phi: Tensor) -> Tensor:
    """TARA Variant B, eq. 9: Σ_i Σ_{k ≤ R} φ_ik σ_k u_k v_kiᵀ with [ΔW_1 | … | ΔW_n] = U Σ Vᵀ
    and v_ki the i-th block of v_k. phi: [n, R]."""
    k = deltas[0].shape[1]
    u, s, vh = svd(torch.cat(deltas, dim=1))
    merged = torch.zeros_like(deltas[0])
    for i in range(len(deltas)):
        for c in range(phi.shape[1]):
            merged += phi[i, c] * s[c] * torch.outer(u[:, c], vh[c, i * k : (i + 1) * k])
    return merged


def core_space(bs: list[Tensor], scaled_as: list[Tensor]) -> tuple[Tensor, Tensor]:
    """U_B (left singular vectors of B_cat) and V_A (right singular vectors of A_cat, rows)."""
    u_b, _, _ = svd(torch.cat(bs, dim=1))
    _, _, v_a = svd(torch.cat(scaled_as, dim=0))
    return u_b, v_a


def svd_cur(
    deltas: list[Tensor],
    rho: list[float],
    scaling: float,
    density: float,
    count: int,
    mix: float | None,
) -> Tensor:
    """α = `mix`, or eq. 33's residual rule when `mix` is None."""
    total = sum(float((d**2).sum()) for d in deltas)
    u, xs = knots_space(deltas)
    u, xs = u[:, :count], [x[:count] for x in xs]
    merged_svd = u @ ties(xs, rho, scaling, density, "total")
    residual_svd = total - sum(float((x**2).sum()) for x in xs)

    concatenated = torch.cat(deltas, dim=1)
    norms = (concatenated**2).sum(dim=0)
    chosen = norms.argsort(descending=True)[:count]
    c = torch.zeros(concatenated.shape[0], len(chosen), dtype=concatenated.dtype)
    for j, index in enumerate(chosen.tolist()):  # Gram–Schmidt; dependent columns stay 0
        column = concatenated[:, index]
        residual = column - c @ (c.T @ column)
        residual = residual - c @ (c.T @ residual)
        if torch.linalg.norm(residual) > 1e-10 * torch.linalg.norm(column):
            c[:, j] = residual / torch.linalg.norm(residual)
    xs_cur = [c.T @ d for d in deltas]
    merged_cur = c @ ties(xs_cur, rho, scaling, density, "total")
    residual_cur = total - sum(float((x**2).sum()) for x in xs_cur)

    m_svd, m_cur = max(residual_svd, 0) ** 0.5, max(residual_cur, 0) ** 0.5
    residual_rule = m_svd / (m_svd + m_cur) if m_svd + m_cur > 0 else 0.5
    alpha = mix if mix is not None else residual_rule
    return alpha * merged_svd + (1 - alpha) * merged_cur


def svc(merged: Tensor, tasks: list[Tensor], alpha: float = 1.0) -> Tensor:
    """σ_j ← σ_j / η_j, η_j = max(mean_t s_jt, α) if all s_jt > 0 else 1."""
    u, s, vh = svd(merged)
    new = s.clone()
    for j in range(len(s)):
        if s[j] <= 1e-10 * s[0]:
            continue
        row_m = u[:, j] @ merged
        ratios = []
        for w in tasks:
            row_t = u[:, j] @ w
            ratios.append(float(row_m @ row_t) / max(float(row_t @ row_t), 1e-12))
        eta = max(sum(ratios) / len(ratios), alpha) if all(r > 0 for r in ratios) else 1.0
        new[j] = s[j] / eta
    return (u * new) @ vh


def pico_calibrate(bs: list[Tensor], deltas: list[Tensor]) -> list[Tensor]:
    """The authors' calibrate_layer: ΔW_t' = ΔW_t + U diag(a − 1) Uᵀ ΔW_t."""
    n = len(bs)
    if n <= 1:
        return deltas
    u, sigma, _ = svd(torch.cat(bs, dim=1))
    c = sigma**2 / (sigma**2).sum().clamp_min(1e-12)
    a = 1.0 / (1.0 + (n - 1) * c)
    return [d + u @ ((a - 1)[:, None] * (u.T @ d)) for d in deltas]


def pico_compensate(merged: Tensor, originals: list[Tensor], rho: list[float]) -> Tensor:
    target = sum(r * float(torch.linalg.norm(d)) for r, d in zip(rho, originals, strict=True))
    norm = float(torch.linalg.norm(merged))
    return merged if norm <= 0 else merged * (target / max(norm, 1e-8))


def regmean(
    taus: list[Tensor], rho: list[float], grams: list[Tensor], scaling: float, off_diagonal: float
) -> Tensor:
    """RegMean (Jin et al. 2023) with ρ-weighted tasks and off-diagonal shrinkage α:
    λ (Σ ρ_t ΔW_t G̃_t)(Σ ρ_t G̃_t + εI)⁻¹, G̃ = α G + (1 − α) diag(G), ε = 1e-6 · mean diag."""
    shrunk = [off_diagonal * g + (1 - off_diagonal) * torch.diag(torch.diag(g)) for g in grams]
    total = sum(r * g for r, g in zip(rho, shrunk, strict=True))
    total = total + 1e-6 * torch.diag(total).mean() * torch.eye(total.shape[0], dtype=total.dtype)
    numerator = sum(r * t @ g for r, t, g in zip(rho, taus, shrunk, strict=True))
    return scaling * numerator @ torch.linalg.inv(total)


def osrm_init(features: list[Tensor], rank: int) -> Tensor:
    """OSRM's A-init (Zhang et al. 2025, Eq. 2–3): H stacks the feature rows [k_j, in] of the
    other tasks; Ã = the `rank` eigenvectors of S = HᵀH / (k − 1) with the smallest eigenvalues,
    as rows. → [rank, in]"""
    h = torch.cat(features)
    s = h.T @ h / (h.shape[0] - 1)
    _, vectors = torch.linalg.eigh(s)
    return vectors[:, :rank].T


def osrm_project(delta: Tensor, a_tilde: Tensor) -> Tensor:
    """OSRM on an existing update (§5.4): B̂ = argmin_B ‖B Ã − ΔW‖_F (least squares),
    ΔŴ = B̂ Ã. → [out, in]"""
    b_hat = torch.linalg.lstsq(a_tilde.T, delta.T).solution.T  # solves Ãᵀ B̂ᵀ = ΔWᵀ
    return b_hat @ a_tilde
