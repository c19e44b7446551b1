"""The elementwise rules (TIES, DARE, DARE-TIES) as one configurable task-arithmetic core.

`merge_elementwise` works in whatever dense space it is given: the full update, KnOTS's
coefficient space or the Core Space. The parameter classes here are shared by every method that
applies these rules in some space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..sparsify import (
    MajoritySign,
    disjoint_mean,
    elect_sign,
    magnitude_mask,
    random_keep_mask,
)
from .base import MethodParams, TaskSet, check_choice, check_fraction, check_seed

SIGNS: tuple[MajoritySign, ...] = ("total", "frequency")


@dataclass(frozen=True)
class ElementwiseRule:
    """How task matrices are sparsified and combined, entry by entry."""

    sparsify: Literal["none", "magnitude", "random"]
    density: float = 1.0  # magnitude: share of entries kept per task
    drop_rate: float = 0.0  # random: probability of dropping an entry
    seed: int = 0  # random: base seed of the per-(module, task) draws
    consensus: MajoritySign | None = None  # None: weighted sum; else TIES sign election


@dataclass(frozen=True)
class TiesParams(MethodParams):
    """TIES: trim each task to its top `density` share by magnitude, elect a sign per entry
    (`majority_sign`), take the ρ-weighted mean of the agreeing entries, times `scaling`."""

    density: float = 0.2
    majority_sign: MajoritySign = "total"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("density", self.density, low_open=True, high_open=False)
        check_choice("majority_sign", self.majority_sign, SIGNS)

    def rule(self) -> ElementwiseRule:
        return ElementwiseRule("magnitude", density=self.density, consensus=self.majority_sign)


@dataclass(frozen=True)
class DareLinearParams(MethodParams):
    """DARE: drop each entry with probability `drop_rate` (seeded), rescale the kept ones by
    1 / (1 − drop_rate), then sum with the task weights λ_t = scaling · N · ρ_t."""

    drop_rate: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("drop_rate", self.drop_rate, low_open=False, high_open=True)
        check_seed(self.seed)

    def rule(self) -> ElementwiseRule:
        return ElementwiseRule("random", drop_rate=self.drop_rate, seed=self.seed)


@dataclass(frozen=True)
class DareTiesParams(MethodParams):
    """DARE's random drop and rescale, then TIES's sign election and disjoint mean."""

    drop_rate: float = 0.5
    majority_sign: MajoritySign = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("drop_rate", self.drop_rate, low_open=False, high_open=True)
        check_choice("majority_sign", self.majority_sign, SIGNS)
        check_seed(self.seed)

    def rule(self) -> ElementwiseRule:
        return ElementwiseRule(
            "random", drop_rate=self.drop_rate, seed=self.seed, consensus=self.majority_sign
        )


ElementwiseParams = TiesParams | DareLinearParams | DareTiesParams


def merge_elementwise(
    tau: torch.Tensor, tasks: TaskSet, rule: ElementwiseRule, scaling: float
) -> torch.Tensor:
    """Apply `rule` to dense task matrices. tau: [G, n, m, k] → merged [G, m, k].

    Without consensus the result is Σ_t λ_t τ̂_t with λ_t = scaling · N · ρ_t. With consensus it
    is scaling · (ρ-weighted disjoint mean), so uniform ρ gives the published TIES rule and a
    single task gives that task's sparsified matrix times `scaling`.
    """
    if rule.sparsify == "magnitude":
        tau = tau * magnitude_mask(tau, rule.density)
    elif rule.sparsify == "random":
        keep = random_keep_mask(
            tau.shape, rule.drop_rate, rule.seed, tasks.modules, tasks.names, tau.device
        )
        tau = tau * keep / (1.0 - rule.drop_rate)
    if rule.consensus is None:
        weights = tasks.weights(scaling).to(tau.dtype)
        return (tau * weights[:, None, None]).sum(dim=1)
    rho = tasks.rho.to(tau.dtype)
    sign = elect_sign(tau, rho, rule.consensus)
    return scaling * disjoint_mean(tau, rho, sign)
