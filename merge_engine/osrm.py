"""OSRM: LoRA subspaces orthogonal to the other tasks' inputs (Zhang et al., ACL 2025).

When task t's update B_t A_t is merged into a model that also serves task j, it perturbs task
j's outputs by B_t A_t h for j's inputs h. OSRM chooses A_t to minimise ‖A H_¬tᵀ‖_F² =
(k−1) tr(A S_¬t Aᵀ) under A Aᵀ = I, where H_¬t stacks the other tasks' input features at the
module and S_¬t is their (uncentred) covariance; the minimiser Ã_t is the r eigenvectors of
S_¬t with the smallest eigenvalues (paper §4.3). Two uses:

- **init** (paper §4.2–4.4): train task t's LoRA from A = Ã_t, B = 0 (A and B both train).
- **project** (paper §5.4, for adapters that exist): B̂_t = argmin_B ‖B Ã_t − ΔW_t‖_F =
  ΔW_t Ã_tᵀ, the adapter (B̂_t, Ã_t), i.e. ΔŴ_t = ΔW_t Ã_tᵀ Ã_t. On the factors ΔW_t Ã_tᵀ =
  s B (A Ã_tᵀ) is an r×r product: no d×k matrix is formed.

S_¬t comes from the adapters' input statistics (`statistics.InputStatistics`, the second
moment E[x xᵀ] of each module's input on the task's unlabeled prompts): by default the mean of
the other tasks' moments, each task weighing the same ("task"); "token" weighs them by their
token counts, which is the paper's concatenation of all samples. `features="mean"` is the
paper's memory-saving variant (Eq. 4: one mean feature row per task); with few tasks it leaves
a null space far larger than r, so its "smallest" eigenvectors are an arbitrary basis of it.

Everything here works on factors and [in, in] moments, in float64, and returns float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

from .adapter import LoraModule
from .errors import InvalidArgumentError
from .statistics import InputStatistics

Features = Literal["moment", "mean"]
Weighting = Literal["task", "token"]
FEATURES: tuple[Features, ...] = ("moment", "mean")
WEIGHTINGS: tuple[Weighting, ...] = ("task", "token")


@dataclass(frozen=True)
class OsrmBasis:
    """The OSRM subspace of one task: Ã [r, in] with orthonormal rows for each module, and how
    strongly the other tasks' inputs excite it."""

    target: str
    a: Mapping[str, torch.Tensor]  # module → Ã [r, in], float32, orthonormal rows
    interference: Mapping[str, float]
    """module → `relative_interference(Ã, S_¬t)` (S_¬t always the full second moment, also for
    the mean-row variant): 0 = the others' inputs never reach Ã, 1 = as much as a random
    subspace of the same rank."""
    features: Features
    weighting: Weighting


def other_tasks_moment(
    statistics: Mapping[str, InputStatistics],
    target: str,
    module: str,
    *,
    features: Features = "moment",
    weighting: Weighting = "task",
) -> torch.Tensor:
    """S_¬t of `module`: the weighted mean over the tasks other than `target` of E[x xᵀ]
    (`features="moment"`) or of E[x] E[x]ᵀ (`"mean"`). → [in, in] float64"""
    others = [name for name in statistics if name != target]
    if not others:
        raise InvalidArgumentError(
            "adapters", f"OSRM needs the statistics of at least one task other than {target!r}"
        )
    total: torch.Tensor | None = None
    weight_sum = 0.0
    for name in others:
        stats = statistics[name]
        if module not in stats.site_of:
            raise InvalidArgumentError(
                f"statistics[{name!r}]", f"has no input statistics for module {module!r}"
            )
        if features == "moment":
            part = stats.moment(module).double()
        else:
            mean = stats.means[stats.site_of[module]].double()
            part = torch.outer(mean, mean)
        weight = float(stats.tokens) if weighting == "token" else 1.0
        total = part * weight if total is None else total + part * weight
        weight_sum += weight
    assert total is not None
    return total / weight_sum


def smallest_eigenvectors(
    matrix: torch.Tensor,  # [in, in], symmetric PSD
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` eigenvectors of `matrix` with the smallest eigenvalues, as orthonormal rows
    (each signed so that its largest entry is positive), and those eigenvalues ascending.
    → ([rank, in], [rank]) float64"""
    size = int(matrix.shape[0])
    if not 1 <= rank <= size:
        raise InvalidArgumentError("rank", f"must be between 1 and {size}, got {rank}")
    symmetric = (matrix.double() + matrix.double().T) / 2
    values, vectors = torch.linalg.eigh(symmetric)  # ascending
    rows = vectors[:, :rank].T.contiguous()
    peak = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    return rows * torch.sign(peak), values[:rank]


def osrm_basis(
    statistics: Mapping[str, InputStatistics],
    target: str,
    ranks: Mapping[str, int],
    *,
    features: Features = "moment",
    weighting: Weighting = "task",
) -> OsrmBasis:
    """Ã of every module in `ranks` (module → rank) for task `target`, from the input
    statistics of the other tasks in `statistics` (task name → statistics; the target's own
    entry, if present, is not used). Modules that read the same input in every other task's
    statistics (q/k/v of a block) share one eigendecomposition."""
    if features not in FEATURES:
        raise InvalidArgumentError("features", f"must be one of {FEATURES}, got {features!r}")
    if weighting not in WEIGHTINGS:
        raise InvalidArgumentError("weighting", f"must be one of {WEIGHTINGS}, got {weighting!r}")
    others = {name: s for name, s in statistics.items() if name != target}
    bases: dict[str, torch.Tensor] = {}
    interference: dict[str, float] = {}
    solved: dict[tuple[tuple[int, ...], int], tuple[torch.Tensor, float]] = {}
    for module, rank in ranks.items():
        site = tuple(s.site_of.get(module, -1) for s in others.values())
        if (site, rank) not in solved:
            moment = other_tasks_moment(others, target, module, weighting=weighting)
            chosen = moment
            if features == "mean":
                chosen = other_tasks_moment(
                    others, target, module, features="mean", weighting=weighting
                )
            basis, _ = smallest_eigenvectors(chosen, rank)
            solved[site, rank] = (basis.float(), relative_interference(basis, moment))
        bases[module], interference[module] = solved[site, rank]
    return OsrmBasis(
        target=target,
        a=MappingProxyType(bases),
        interference=MappingProxyType(interference),
        features=features,
        weighting=weighting,
    )


def relative_interference(a: torch.Tensor, moment: torch.Tensor) -> float:
    """How strongly inputs with second moment `moment` [in, in] reach the row space of
    `a` [r, in]: (tr(A S Aᵀ) / tr(A Aᵀ)) / (tr(S) / in). A random subspace scores 1 in
    expectation; Ã of OSRM scores its r smallest eigenvalues' mean over the mean eigenvalue."""
    a64, s64 = a.double(), moment.double()
    response = torch.einsum("ri,ij,rj->", a64, s64, a64) / (a64 * a64).sum().clamp_min(1e-300)
    average = torch.diagonal(s64).sum() / s64.shape[0]
    return float(response / average.clamp_min(1e-300))


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [r, in] (rows) of the row space of `a` [r, in] (full rank)."""
    q: torch.Tensor = torch.linalg.qr(a.double().T).Q  # [in, r]
    return q.T.contiguous()


def cross_talk(module: LoraModule, own: torch.Tensor, others: torch.Tensor) -> float:
    """E_¬t ‖ΔW x‖² / E_t ‖ΔW x‖²: the update's output energy on the other tasks' inputs
    (second moment `others` [in, in]) relative to its own task's (`own`), on the factors:
    tr(BᵀB · A S Aᵀ) for each (the LoRA scale cancels)."""
    b, a = module.lora_b.double(), module.lora_a.double()
    gram = b.T @ b  # [r, r]
    numerator = (gram * (a @ others.double() @ a.T)).sum()
    denominator = (gram * (a @ own.double() @ a.T)).sum()
    return float(numerator / denominator.clamp_min(1e-300))


def procrustes_distance(a_final: torch.Tensor, a_init: torch.Tensor) -> float:
    """The paper's change of A during training (§4.4): min over orthogonal Ω [r, r] of
    ‖Ω A_final − A_init‖_F, divided by ‖A_init‖_F. With Y Xᵀ = U Σ Vᵀ (X = A_final,
    Y = A_init) the minimum is at Ω = U Vᵀ and D² = ‖X‖² + ‖Y‖² − 2 Σ σ."""
    x, y = a_final.double(), a_init.double()
    if x.shape != y.shape:
        raise InvalidArgumentError(
            "a_final", f"shape {tuple(x.shape)} differs from a_init's {tuple(y.shape)}"
        )
    singular = torch.linalg.svdvals(y @ x.T)
    squared = (x * x).sum() + (y * y).sum() - 2 * singular.sum()
    return float(squared.clamp_min(0).sqrt() / (y * y).sum().sqrt().clamp_min(1e-300))


def project(module: LoraModule, basis: torch.Tensor) -> LoraModule:
    """The module re-expressed on `basis` Ã [r', in] (orthonormal rows): (B̂, Ã) with
    B̂ = ΔW Ãᵀ = s · B (A Ãᵀ) [out, r'] and scale 1, so ΔŴ = ΔW Ãᵀ Ã. Exact when Ã spans A's
    row space. Works on the factors."""
    if basis.ndim != 2 or int(basis.shape[1]) != module.in_features:
        raise InvalidArgumentError(
            "basis",
            f"expected a [rank, {module.in_features}] basis, got shape {tuple(basis.shape)}",
        )
    a_tilde = basis.double()
    coupling = module.lora_a.double() @ a_tilde.T  # [r, r']
    lora_b = module.scale * (module.lora_b.double() @ coupling)  # [out, r']
    return LoraModule(lora_a=a_tilde.float(), lora_b=lora_b.float(), scale=1.0)


def kept_energy(module: LoraModule, basis: torch.Tensor) -> float:
    """‖ΔW Ãᵀ Ã‖² / ‖ΔW‖²: the share of the update's energy that `project` keeps, from r×r
    Gram matrices."""
    b, a = module.lora_b.double(), module.lora_a.double()
    gram = b.T @ b  # [r, r]
    coupling = a @ basis.double().T  # [r, r']
    kept = (gram * (coupling @ coupling.T)).sum()
    total = (gram * (a @ a.T)).sum()
    return float(kept / total.clamp_min(1e-300))


def project_modules(
    modules: Mapping[str, LoraModule], basis: Mapping[str, torch.Tensor]
) -> dict[str, LoraModule]:
    """`project` every module onto its basis; every module needs one."""
    missing = sorted(set(modules) - set(basis))
    if missing:
        raise InvalidArgumentError(
            "basis", f"no OSRM basis for {len(missing)} module(s), e.g. {missing[0]!r}"
        )
    return {key: project(module, basis[key]) for key, module in modules.items()}


def diagnose(
    modules: Mapping[str, LoraModule],
    statistics: Mapping[str, InputStatistics],
    target: str,
    *,
    init: Mapping[str, torch.Tensor] | None = None,
    weighting: Weighting = "task",
) -> dict[str, float]:
    """OSRM's diagnostics of task `target`'s adapter (`modules`), means over its modules:

    - `interference`: `relative_interference` of its A rows with the other tasks' S_¬t;
    - `cross_talk`: `cross_talk` of its update (other tasks' output energy over its own);
    - with `init` (module → the A it was trained from): `interference_init` of the init and
      `procrustes` (the paper's normalised change of A during training).
    """
    if target not in statistics:
        raise InvalidArgumentError("statistics", f"has no entry for the adapter {target!r}")
    own = statistics[target]
    values: dict[str, list[float]] = {"interference": [], "cross_talk": []}
    if init is not None:
        values.update(interference_init=[], procrustes=[])
    for key, module in modules.items():
        others = other_tasks_moment(statistics, target, key, weighting=weighting)
        values["interference"].append(relative_interference(module.lora_a, others))
        values["cross_talk"].append(cross_talk(module, own.moment(key), others))
        if init is not None:
            values["interference_init"].append(relative_interference(init[key], others))
            values["procrustes"].append(procrustes_distance(module.lora_a, init[key]))
    return {name: sum(items) / len(items) for name, items in values.items()}
