"""What every merge method is: a name, a frozen parameter dataclass, and `merge()`."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch

from ..errors import InvalidParameterError
from ..linalg import LowRank

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class SiteMoments:
    """The merged tasks' input moments E[x xᵀ], once per input site of one input width.

    Modules that read the same input (q_proj and v_proj of one layer) share a site, also across
    module groups. One object serves every group of a merge that reads inputs of this width, so
    what a rule derives from the moments for the merge's ρ is computed once (`derive`).
    """

    moments: tuple[torch.Tensor, ...]  # per task: [S, in, in]
    _derived: dict[Hashable, object] = field(default_factory=dict, repr=False)

    def derive(self, key: Hashable, compute: Callable[[], T]) -> T:
        """`compute()`, evaluated on the first call with `key` (for this merge only)."""
        if key not in self._derived:
            self._derived[key] = compute()
        return cast(T, self._derived[key])


@dataclass(frozen=True)
class TaskStatistics:
    """The input statistics of one module group's tasks, for rules that need them (RegMean).

    E[x xᵀ] of module g's input on task t's prompts is `sites.moments[t][site[g]]`.
    """

    sites: SiteMoments
    site: torch.Tensor  # [G] long: each module's input site
    in_order: bool  # site == 0, 1, …, S − 1
    products: tuple[torch.Tensor, ...]  # per task: [G, in, r_t], E[x xᵀ] a_tᵀ of each module

    def rows(self, per_site: torch.Tensor) -> torch.Tensor:
        """Each module's row of a per-site stack [S, ...]: [G, ...] (no copy when in order)."""
        return per_site if self.in_order else per_site[self.site]


@dataclass(frozen=True)
class TaskSet:
    """The tasks of one module group that take part in a merge, in factored form.

    ΔW_t[g] = b[t][g] @ a[t][g] with the LoRA scale already folded into `a` (and Pico's
    calibration already applied to `b` when it is on). Only tasks with weight > 0 are here.
    """

    names: tuple[str, ...]  # n adapter names
    modules: tuple[str, ...]  # G module keys
    b: tuple[torch.Tensor, ...]  # per task: [G, out, r_t]
    a: tuple[torch.Tensor, ...]  # per task: [G, r_t, in]
    rho: torch.Tensor  # [n] preference restricted to these tasks, sums to 1
    statistics: TaskStatistics | None = None  # only for rules that need them (RegMean)
    phi: torch.Tensor | None = None  # [G, n, R]: TARA's tuned weights, for methods that take φ

    @property
    def out_features(self) -> int:
        return int(self.b[0].shape[1])

    @property
    def in_features(self) -> int:
        return int(self.a[0].shape[2])

    @property
    def count(self) -> int:
        """N, the number of adapters merged (those with ρ_t > 0), not the pool size."""
        return len(self.names)

    @property
    def total_rank(self) -> int:
        return sum(int(a.shape[1]) for a in self.a)

    def weights(self, scaling: float) -> torch.Tensor:
        """Task weights λ_t = λ · N · ρ_t with N the number of merged adapters (uniform ρ gives
        every task λ; a zero-weight adapter in the pool changes nothing). → [n]"""
        return scaling * self.count * self.rho

    def dense(self) -> torch.Tensor:
        """The dense task updates. → [G, n, out, in] (only for methods that need them)."""
        return torch.stack([b @ a for b, a in zip(self.b, self.a, strict=True)], dim=1)

    def replace(self, b: tuple[torch.Tensor, ...], a: tuple[torch.Tensor, ...]) -> TaskSet:
        """Other factors, without the statistics (their products with A would not hold)."""
        return dataclasses.replace(self, b=b, a=a, statistics=None)

    def batch(self, start: int, stop: int) -> TaskSet:
        """The modules start..stop of the batch."""
        return dataclasses.replace(
            self,
            modules=self.modules[start:stop],
            b=tuple(b[start:stop] for b in self.b),
            a=tuple(a[start:stop] for a in self.a),
            statistics=None,  # rules that read statistics merge every module at once
            phi=None if self.phi is None else self.phi[start:stop],
        )


@dataclass(frozen=True)
class MethodParams:
    """Base of the methods' parameter dataclasses; fields are validated on construction.

    `scaling` is the rule's λ; None means the method's published default.
    """

    scaling: float | None = None

    def __post_init__(self) -> None:
        if self.scaling is not None:
            check_finite("scaling", self.scaling)

    def resolved_scaling(self, default: float) -> float:
        return default if self.scaling is None else self.scaling


def check_finite(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameterError(field, f"must be a finite number, got {value!r}")


def check_fraction(field: str, value: float, *, low_open: bool, high_open: bool) -> None:
    """Require value in (0, 1], [0, 1) ... as the flags say."""
    check_finite(field, value)
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise InvalidParameterError(field, f"must be in {interval}, got {value!r}")


def check_positive_int(field: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(field, f"must be an integer ≥ 1, got {value!r}")


def check_seed(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidParameterError("seed", f"must be an integer in [0, 2^63), got {value!r}")


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidParameterError(field, f"must be one of {', '.join(choices)}; got {value!r}")


P = TypeVar("P", bound=MethodParams)


class MergeMethod(ABC, Generic[P]):
    """A merge rule over the tasks of one module group.

    `merge` returns the merged update in factored form. Methods that the factors allow
    (`exact_low_rank`) never form an out × in matrix; the others form the dense update and
    truncate it with a thin SVD, reporting the retained energy.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    exact_low_rank: ClassVar[bool]
    needs_statistics: ClassVar[bool] = False
    """Whether the rule reads the adapters' input statistics (`TaskSet.statistics`)."""
    takes_phi: ClassVar[bool] = False  # TARA's per-(task, component) weights (MergeSpec.phi)
    params_type: type[P]

    @abstractmethod
    def merge(self, tasks: TaskSet, params: P, target_rank: int) -> LowRank:
        """Merge `tasks` into one update. → LowRank with b [G, out, r], a [G, r, in].

        `target_rank` is the rank a method that forms a dense update truncates to; exact
        methods return their exact rank and leave any truncation to the caller.
        """

    def parse_params(self, values: Mapping[str, Any]) -> P:
        """Build this method's parameters from a mapping, rejecting names it does not take."""
        names = [f.name for f in dataclasses.fields(self.params_type)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise InvalidParameterError(
                f"params.{unknown[0]}",
                f"method {self.name!r} takes no parameter {unknown[0]!r} "
                f"(it takes: {', '.join(names)})",
            )
        return self.params_type(**values)
